# CPU image serving one trained anomap model with `anomap serve` (PyTorch .safetensors or exported .onnx).
#
#   docker build -t anomap-serve --build-arg MODEL=runs/demo/model.safetensors .
#   docker run --rm -p 8000:8000 -e ANOMAP_API_KEY=change-me anomap-serve
#
# For an ONNX model add --build-arg MODEL_NAME=model.onnx (the backend follows the suffix).
# MODEL is a path inside the build context. Building the image is not part of CI; see docs/deploy.md.
FROM python:3.11-slim

ARG MODEL=model.safetensors
ARG MODEL_NAME=model.safetensors
# CPU-only torch wheels (the default Linux wheel pulls several GB of CUDA libraries).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

WORKDIR /opt/anomap
RUN pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve,deploy]" && rm -rf /opt/anomap/src

RUN useradd --system --uid 10001 --no-create-home anomap
COPY ${MODEL} /model/${MODEL_NAME}
ENV ANOMAP_MODEL=/model/${MODEL_NAME}
USER anomap
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# Limits and concurrency: append flags to `docker run ... anomap-serve` only by overriding this CMD, e.g.
#   docker run ... anomap-serve anomap serve /model/model.safetensors --host 0.0.0.0 --max-bytes 8M
CMD ["sh", "-c", "exec anomap serve \"$ANOMAP_MODEL\" --host 0.0.0.0 --port 8000"]
