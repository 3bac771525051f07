"""Model export: the ONNX writer with its parity check (``anomap export``)."""
