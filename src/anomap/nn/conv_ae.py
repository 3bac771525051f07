"""Dilated-convolution autoencoder (GLCIC-style, Iizuka et al. 2017) used by ``ssl_ae``.

Fully convolutional, output size = input size, no skip connections (they would let anomalies pass
straight through). Pure module: ``forward(x)`` only.
"""

from __future__ import annotations

from torch import Tensor, nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DilatedConvAE(nn.Module):
    """Encoder (two stride-2 stages) -> dilated middle -> decoder (two transposed convs) -> sigmoid.

    Args:
        channels: image channels in and out (1 or 3).
        width: base width ``w``; the middle runs at ``4w`` channels and 1/4 resolution.
        dilations: dilation rates of the middle blocks.
        full: the paper-scale layout (two plain 4w blocks before and two after the dilated ones);
            False gives the shorter CPU middle (none before, one after).
    """

    def __init__(self, channels: int = 3, width: int = 32, dilations: tuple[int, ...] = (2, 4, 8, 16),
                 full: bool = False):
        super().__init__()
        w = width
        enc: list[nn.Module] = [_cbr(channels, w, k=5), _cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w),
                                _cbr(2 * w, 4 * w, stride=2)]
        if full:
            enc += [_cbr(4 * w, 4 * w), _cbr(4 * w, 4 * w)]
        mid: list[nn.Module] = [_cbr(4 * w, 4 * w, dilation=d) for d in dilations]
        mid.append(_cbr(4 * w, 4 * w))
        if full:
            mid.append(_cbr(4 * w, 4 * w))
        dec: list[nn.Module] = [
            _up(4 * w, 2 * w),
            _cbr(2 * w, 2 * w),
            _up(2 * w, w),
            _cbr(w, max(8, w // 2)),
            nn.Conv2d(max(8, w // 2), channels, 3, padding=1),
            nn.Sigmoid(),
        ]
        self.encoder = nn.Sequential(*enc)
        self.middle = nn.Sequential(*mid)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.middle(self.encoder(x)))
