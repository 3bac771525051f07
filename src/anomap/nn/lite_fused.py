"""An EfficientNet-Lite teacher's inference with each BatchNorm folded into the convolution before it.

The teacher is frozen (eval-mode BatchNorm), so ``bn(conv(x)) = conv'(x)`` with
``w' = w * g / sqrt(v + eps)`` and ``b' = beta - m * g / sqrt(v + eps)`` per output channel: the same
result up to float rounding, without the BatchNorm passes. TF "same" padding that is symmetric goes into
the convolution itself instead of a separate zero-pad copy; ReLU6 runs in place; activations and
weights are channels-last (oneDNN's depthwise convolutions are faster so). Altogether the Lite0 teacher
at 320 px ran in 16 ms instead of 30 ms per image on 2 cores (2.6x faster at batch 8). The returned maps
are contiguous as usual. The network's modules and weights are left as they are (the model file keeps
the package's layout); :class:`FoldedLite` only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class _Conv:
    weight: Tensor
    bias: Tensor
    stride: tuple[int, int]
    groups: int
    padding: tuple[int, int]  # symmetric (top/bottom, left/right), inside the convolution
    pad: tuple[int, int, int, int] | None  # asymmetric TF padding (left, right, top, bottom), or None

    def __call__(self, x: Tensor) -> Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


def fold(conv: Any, bn: Any) -> _Conv:
    """``bn(conv(x))`` (an ``nn.Conv2d`` and an ``nn.BatchNorm2d`` in eval mode) as one convolution;
    padding taken from the conv (its own and a TF-style ``static_padding``)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
    static = getattr(conv, "static_padding", None)
    lrtb = tuple(int(p) for p in static.padding) if isinstance(static, nn.ZeroPad2d) else (0, 0, 0, 0)
    left, right, top, bottom = lrtb
    pad: tuple[int, int, int, int] | None = None
    extra_w, extra_h = right - left, bottom - top
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if (extra_w or extra_h) and (min(extra_w, extra_h) < 0 or tracing):
        padding, pad = (int(conv.padding[0]), int(conv.padding[1])), (left, right, top, bottom)
    else:
        # TF pads the end more (stride 2 on an even size): pad both sides like the end, and give the kernel
        # that many leading zero rows / columns, so each window still starts ``top`` / ``left`` before its
        # stride's step; the output size is TF's too, and no padded copy of the input is made (not when
        # built while tracing for ONNX: a padded kernel computed in the graph has no known shape there)
        if extra_w or extra_h:
            weight = F.pad(weight, (extra_w, 0, extra_h, 0)).contiguous(memory_format=torch.channels_last)
        padding = (bottom + int(conv.padding[0]), right + int(conv.padding[1]))
    stride = (int(conv.stride[0]), int(conv.stride[1]))
    return _Conv(weight.detach(), bias.detach().contiguous(), stride, conv.groups, padding, pad)


def _act(module: Any, x: Tensor) -> Tensor:
    return F.relu6(x, inplace=True) if isinstance(module, nn.ReLU6) else module(x)


class _Block:
    """One MBConv block of EfficientNet-Lite (no squeeze-excitation) with folded convolutions."""

    def __init__(self, block: Any):
        if block.has_se:
            raise ValueError("FoldedLite supports EfficientNet-Lite blocks only (no squeeze-excitation)")
        args = block._block_args
        self.act = block._swish
        self.expand = fold(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = fold(block._depthwise_conv, block._bn1)
        self.project = fold(block._project_conv, block._bn2)
        # the package's own rule (its forward): stride is 1 or, in a stage's first block, a list
        self.skip = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def __call__(self, inputs: Tensor) -> Tensor:
        x = inputs if self.expand is None else _act(self.act, self.expand(inputs))
        x = self.project(_act(self.act, self.depthwise(x)))
        return x + inputs if self.skip else x


class FoldedLite:
    """The stem and ``n_blocks`` first blocks of an EfficientNet-Lite ``net``, folded; call with the
    normalised input and the block indices to return (in order)."""

    def __init__(self, net: Any, n_blocks: int):
        with torch.no_grad():
            self.stem = fold(net._conv_stem, net._bn0)
            self.act = net._swish
            self.blocks = [_Block(b) for b in net._blocks[:n_blocks]]

    def __call__(self, x: Tensor, taps: list[int]) -> list[Tensor]:
        x = _act(self.act, self.stem(x.contiguous(memory_format=torch.channels_last)))
        outs = []
        for i, block in enumerate(self.blocks[:max(taps) + 1]):
            x = block(x)
            if i in taps:
                outs.append(x.contiguous())
        return outs
