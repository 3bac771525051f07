"""The deployment runtime: inference backends (PyTorch, ONNX) and batch prediction (``anomap predict``)."""
