"""Inference backends: one interface over a PyTorch detector and an exported ONNX model.

The CLI (``anomap predict``) and the service (``anomap serve``) score images through a :class:`Backend`
and never care which runtime sits behind it::

    backend = load_backend("model.onnx")                # or "model.safetensors" (PyTorch)
    res = backend.score([image], threshold=backend.calibration.threshold)
    res.scores[0], res.maps[0], res.is_anomalous[0]     # map at the image's own (H, W)

Both go through :func:`anomap.inference.score_images` (the path ``Detector.predict`` takes too); a
backend only supplies the model, :meth:`Backend.predict_prepared`. Scores and maps are the method's
*raw* values; calibration (threshold and the heat-map range ``map_low``..``map_scale``) is exposed as
:attr:`Backend.calibration`, never applied silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomap._version import __version__
from anomap.detector import Detector
from anomap.errors import CheckpointError, ConfigError, ImageError
from anomap.inference import ImageInput, Scored, prepare_image, score_images
from anomap.train.checkpoint import read_metadata
from anomap.types import Calibration

BACKENDS = ("torch", "onnx")
DEFAULT_BATCH = 16
# metadata_props keys of an anomap ONNX file (all values are JSON text; see docs/deploy.md)
ONNX_FORMAT_KEY = "anomap_format"
ONNX_FORMAT = "anomap-onnx/1"
ONNX_INPUT = "images"
ONNX_OUTPUTS = ("scores", "maps")


def normalise_map(amap: np.ndarray, calibration: Calibration) -> np.ndarray:
    """``(map - map_low) / (map_scale - map_low)``: 0 = typical normal pixel, 1 = top of normal pixels.

    Without calibration statistics the map is returned unchanged (as float32).
    """
    amap = np.asarray(amap, dtype=np.float32)
    low, top = calibration.map_low, calibration.map_scale
    if low is None or top is None:
        return amap
    span = max(float(top) - float(low), 1e-12)
    return (amap - np.float32(low)) / np.float32(span)


class Backend:
    """Common interface of :class:`TorchBackend` and :class:`OnnxBackend`.

    Attributes:
        name: "torch" or "onnx".
        method: the method's registered name (ssl_ae, isstad, gtrans).
        channels: 1 (grey) or 3 (colour): what the model reads.
        image_size: the config's working size S.
        work_hw: the working shape (h, w) images are resized to: (S, S), or the fit images' aspect ratio
            (``aspect=fit``).
        calibration: threshold, target_fpr and the heat-map range from held-out normal images.
        meta: JSON-able description: method, config, calibration, info, anomap_version.
        path: the model file (None for an in-memory detector).
        source: the file the model was converted from at start-up (an ONNX export of a ``.safetensors``
            model made by ``anomap serve``), else None.
        batch_size: images per model call in :meth:`score`.
    """

    name: str = ""
    method: str
    channels: int
    image_size: int
    _work_hw: tuple[int, int] | None = None  # None: (image_size, image_size)
    calibration: Calibration
    meta: dict[str, Any]
    path: Path | None = None
    source: Path | None = None
    batch_size: int = DEFAULT_BATCH

    @property
    def work_hw(self) -> tuple[int, int]:
        return self._work_hw or (self.image_size, self.image_size)

    def predict_prepared(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (B,) float32 and raw maps (B, h, w) float32 for uint8 (B, h, w, C) at the working shape."""
        raise NotImplementedError

    def prepare(self, image: ImageInput) -> np.ndarray:
        """One image (path, PIL image or array, any size) -> uint8 (h, w, C) at the working shape.

        Raises:
            ImageError: the image cannot be decoded (the message names the file).
        """
        return prepare_image(image, self.channels, self.work_hw)[0]

    def score(self, images: Sequence[ImageInput], *, threshold: float | None, maps: bool = True,
              batch_size: int | None = None) -> Scored:
        """Score images of any size through :func:`anomap.inference.score_images`.

        Args:
            images: uint8 arrays (H, W[, C]), paths or PIL images.
            threshold: gives the verdicts (pass ``calibration.threshold`` for the calibrated one; None:
                no verdicts).
            maps: False skips resizing the raw maps back to each image's (H, W).
            batch_size: images per model call (default :attr:`batch_size`).
        """
        return score_images(images, self.predict_prepared, channels=self.channels, size=self.work_hw,
                            threshold=threshold, batch_size=batch_size or self.batch_size, maps=maps)

    def predict_images(self, images: Sequence[ImageInput]) -> list[tuple[float, np.ndarray]]:
        """One ``(raw score, raw map (H, W) float32)`` per image, in order: :meth:`score` without verdicts."""
        res = self.score(images, threshold=None)
        return [(float(s), m) for s, m in zip(res.scores, res.maps, strict=True)]

    def _check_batch(self, batch_u8: np.ndarray) -> np.ndarray:
        arr = np.asarray(batch_u8)
        want = (*self.work_hw, self.channels)
        if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != want:
            raise ImageError(f"a prepared batch must be uint8 (B, {want[0]}, {want[1]}, {want[2]}); got "
                             f"{arr.dtype} {tuple(arr.shape)}.", fix="pass images through Backend.prepare first")
        return np.ascontiguousarray(arr)

    def describe(self) -> dict[str, Any]:
        """``meta`` plus the backend name, channels and working size (what ``GET /v1/model`` shows)."""
        return {"backend": self.name, "channels": self.channels, "image_size": self.image_size,
                "work_shape": list(self.work_hw), **self.meta}


class TorchBackend(Backend):
    """A trained :class:`anomap.Detector` (PyTorch eager).

    Args:
        path_or_detector: a ``.safetensors`` file written by ``Detector.save`` or a loaded Detector.
        device: cpu, cuda, cuda:N or auto (default: the saved config's device).
        batch_size: images per model call.
        compile: score with ``torch.compile`` (:mod:`anomap.compiled`): compiled now for ``batch_size``
            images per call, tens of seconds once, then about 1.3-1.5x faster for gtrans and 1.2x for
            isstad on a 2-core CPU (docs/benchmarks.md); falls back to eager PyTorch with a warning when
            compiling fails.
    """

    name = "torch"

    def __init__(self, path_or_detector: str | Path | Detector, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH, compile: bool = False):
        if isinstance(path_or_detector, Detector):
            det = path_or_detector
            version = __version__
        else:
            self.path = Path(path_or_detector)
            if self.path.suffix.lower() == ".onnx":
                raise CheckpointError("is an ONNX model; the torch backend reads .safetensors files.",
                                      path=self.path, fix="use --backend onnx (or load_backend(path, 'onnx'))")
            det = Detector.load(self.path, device=device)
            version = read_metadata(self.path).get("anomap_version", __version__)
        det.require_model()
        self.detector = det
        self.method = det.method_name
        self.channels = int(det.channels or 3)
        self.image_size = int(det.config.image_size)
        self._work_hw = det.config.work_hw
        self.calibration = det.calibration
        self.batch_size = batch_size
        if compile:
            det.compile(max(1, batch_size))
        cfg = json.loads(det.describe())
        self.meta = {"method": self.method, "config": cfg["config"], "calibration": cfg["calibration"],
                     "info": cfg["info"], "anomap_version": version}

    def predict_prepared(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = self._check_batch(batch_u8)
        scores, maps = self.detector.predict_raw(arr, batch_size=max(1, len(arr)))
        return scores.astype(np.float32, copy=False), maps.astype(np.float32, copy=False)


class OnnxBackend(Backend):
    """An ONNX file written by ``anomap export`` run with onnxruntime (CPU).

    Args:
        path: the ``.onnx`` file; its metadata carries method, config and calibration.
        threads: onnxruntime intra-op threads (0 = onnxruntime's default, all cores).
        batch_size: images per model call.
        providers: onnxruntime execution providers (default: CPU).
        spinning: let idle pool threads busy-wait for work. Off by default: on a small machine they
            would take the cores that decode images or serve requests (measured 2x slower under load).
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int = 2, batch_size: int = DEFAULT_BATCH,
                 providers: Sequence[str] | None = None, spinning: bool = False):
        self.path = Path(path)
        fix = "export the model with `anomap export MODEL.safetensors --format onnx --out model.onnx`"
        if not self.path.is_file():
            raise CheckpointError("ONNX model file not found.", path=self.path, fix=fix)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("the onnx backend needs onnxruntime, which is not installed.",
                              fix="pip install 'anomap[deploy]' (or pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = max(0, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - any loader failure means "not a usable ONNX file"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"not a readable ONNX model ({first[:200]}).", path=self.path, fix=fix) from None
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get(ONNX_FORMAT_KEY) != json.dumps(ONNX_FORMAT):
            raise CheckpointError("is an ONNX model, but not one written by anomap (no anomap metadata).",
                                  path=self.path, fix=fix)
        try:
            meta = {k: json.loads(v) for k, v in props.items()}
            self.method = str(meta["method"])
            self.channels = int(meta["channels"])
            self.image_size = int(meta["image_size"])
            h, w = meta.get("work_shape") or (self.image_size, self.image_size)  # files before aspect=fit: square
            self._work_hw = (int(h), int(w))
            self.calibration = Calibration.from_dict(meta["calibration"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"anomap metadata of the ONNX model is incomplete ({e}).", path=self.path,
                                  fix=fix) from None
        self.threads = threads
        self.batch_size = batch_size
        self.meta = {"method": self.method, "config": meta.get("config", {}),
                     "calibration": meta["calibration"], "info": meta.get("info", {}),
                     "anomap_version": meta.get("anomap_version")}

    def predict_prepared(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = self._check_batch(batch_u8)
        if len(arr) == 0:
            return np.zeros(0, np.float32), np.zeros((0, *self.work_hw), np.float32)
        scores, maps = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: arr})
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def backend_for(model_path: str | Path, backend: str | None = None) -> str:
    """The backend a model file needs: ``backend`` if given, else ``onnx`` for ``.onnx`` files, else ``torch``."""
    if backend is None:
        return "onnx" if Path(model_path).suffix.lower() == ".onnx" else "torch"
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not known.", fix=f"use one of {', '.join(BACKENDS)}")
    return backend


def load_backend(model_path: str | Path, backend: str | None = None, device: str | None = None,
                 threads: int = 2, batch_size: int = DEFAULT_BATCH, compile: bool = False) -> Backend:
    """Open a model file for inference.

    Args:
        model_path: ``.safetensors`` (torch) or ``.onnx`` (onnx) file.
        backend: "torch" or "onnx"; None infers it from the suffix.
        device: torch device (torch backend only; the onnx backend runs on the CPU).
        threads: onnxruntime intra-op threads (onnx backend only).
        batch_size: images per model call.
        compile: torch backend only: compile the scoring pass with ``torch.compile`` (see TorchBackend).

    Raises:
        CheckpointError: the file is missing, foreign, or of the other backend's kind (the message says
            which command or option fixes it).
    """
    path = Path(model_path)
    kind = backend_for(path, backend)
    if kind == "onnx":
        if compile:
            raise ConfigError("--compile applies to the torch backend; onnxruntime optimises its graph itself.",
                              fix="drop --compile, or use --backend torch with a .safetensors model")
        if path.suffix.lower() == ".safetensors":
            raise CheckpointError("is a PyTorch model; the onnx backend needs an exported .onnx file.", path=path,
                                  fix=f"run `anomap export {path} --format onnx --out {path.with_suffix('.onnx')}` "
                                      "or use --backend torch")
        return OnnxBackend(path, threads=threads, batch_size=batch_size)
    return TorchBackend(path, device=device, batch_size=batch_size, compile=compile)
