"""VoxelMorph-style U-Net backbone for 2D and 3D registration networks.

Layout of Balakrishnan et al. (CVPR 2018, TMI 2019): the encoder is a stack of stride-2
3x3(x3) convolutions, each followed by LeakyReLU(0.2), so encoder level ``i`` runs at
``1/2**(i+1)`` resolution. With ``L = len(enc_channels)`` the decoder is:

* ``dec_channels[:L-1]``: one convolution per level, each followed by x2 nearest upsampling
  and concatenation of the encoder features of that resolution (skip connection);
* ``dec_channels[L-1:L+1]``: two convolutions at half resolution;
* x2 upsampling and concatenation of the input itself;
* ``dec_channels[L+1:]``: convolutions at full resolution.

VoxelMorph-1 is ``enc (16, 32, 32, 32)``, ``dec (32, 32, 32, 32, 8, 8)``; VoxelMorph-2 is
``dec (32, 32, 32, 32, 32, 16, 16)`` (see :data:`PRESETS`).

``field_downsize = 2**d`` drops the last ``d`` upsampling steps: the remaining convolutions run
at ``1/field_downsize`` resolution, so a field predicted from the output is coarser and cheaper.

Any input size works: the input is padded at the end of each axis to a multiple of ``2**L``
(replicate padding by default) and the output covers the padded grid; callers crop back (see
:meth:`UNet.padded_shape`). MONAI's ``VoxelMorphUNet`` is not used because it needs sizes
divisible by ``2**L``, defaults to the later max-pooling layout, and has no coarse output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "vm1": {"enc_channels": (16, 32, 32, 32), "dec_channels": (32, 32, 32, 32, 8, 8)},
    "vm2": {"enc_channels": (16, 32, 32, 32), "dec_channels": (32, 32, 32, 32, 32, 16, 16)},
}
_PAD_MODES = ("replicate", "constant")


def conv_layer(ndim: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """A 3x3 (2D) or 3x3x3 (3D) convolution with 'same' padding (for stride 1)."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)


class ConvBlock(nn.Sequential):
    """Convolution (kernel 3, given stride) followed by LeakyReLU(0.2)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            conv_layer(ndim, in_channels, out_channels, stride), nn.LeakyReLU(0.2, inplace=True)
        )


class Encoder(nn.Module):
    """Stride-2 conv blocks; ``forward`` returns the features of every level, finest first.

    Input ``(B, in_channels, *S)``; level ``i`` has ``enc_channels[i]`` channels and spatial size
    ``ceil(S / 2**(i+1))``. Works on any size (no padding needed).
    """

    def __init__(self, ndim: int, in_channels: int, enc_channels: Sequence[int]) -> None:
        super().__init__()
        channels = _positive_list(enc_channels, "enc_channels")
        self.ndim = ndim
        self.out_channels = channels[-1]
        self.blocks = nn.ModuleList()
        prev = in_channels
        for nf in channels:
            self.blocks.append(ConvBlock(ndim, prev, nf, stride=2))
            prev = nf

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class UNet(nn.Module):
    """VoxelMorph U-Net: ``(B, in_channels, *S)`` -> ``(B, out_channels, *P / field_downsize)``.

    ``P = padded_shape(S)`` is ``S`` rounded up to a multiple of ``2**len(enc_channels)``; the
    padding is appended at the end of each axis, so output voxel ``p`` (for
    ``field_downsize == 1``) lies at input voxel ``p`` and ``output[..., :S]`` covers the input.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: channels of the input (e.g. fixed and moving concatenated).
        enc_channels: widths of the stride-2 encoder convolutions.
        dec_channels: widths of the decoder convolutions, at least ``len(enc_channels) + 2``
            (layout in the module docstring).
        field_downsize: resolution divisor of the output, a power of two up to ``2**L``.
        pad_mode: ``"replicate"`` or ``"constant"`` (zeros) padding of the input.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        enc_channels: Sequence[int] = PRESETS["vm2"]["enc_channels"],
        dec_channels: Sequence[int] = PRESETS["vm2"]["dec_channels"],
        field_downsize: int = 1,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        enc = _positive_list(enc_channels, "enc_channels")
        dec = _positive_list(dec_channels, "dec_channels")
        levels = len(enc)
        if len(dec) < levels + 2:
            raise ValueError(
                f"dec_channels needs at least len(enc_channels) + 2 = {levels + 2} entries "
                f"(one per upsampling level, two at half resolution, one at full), got {len(dec)}"
            )
        skipped = _log2(field_downsize, "field_downsize")
        if skipped > levels:
            raise ValueError(
                f"field_downsize must be at most 2**len(enc_channels) = {2**levels}, "
                f"got {field_downsize}"
            )
        if pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
        self.ndim = ndim
        self.levels = levels
        self.field_downsize = field_downsize
        self.pad_mode = pad_mode
        self.out_channels = dec[-1]
        self.encoder = Encoder(ndim, in_channels, enc)

        # skip features available at each upsampling step, coarse to fine; the last is the input
        skip_channels = [*enc[-2::-1], in_channels]
        # decoder conv index after which each upsampling step happens
        up_after = [*range(levels - 1), levels]
        kept_ups = len(up_after) - skipped
        self._upsample_after = dict(zip(up_after[:kept_ups], range(kept_ups), strict=True))
        self.decoder = nn.ModuleList()
        prev = enc[-1]
        for index, nf in enumerate(dec):
            self.decoder.append(ConvBlock(ndim, prev, nf))
            prev = nf
            if index in self._upsample_after:
                prev += skip_channels[self._upsample_after[index]]

    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Input size ``shape`` rounded up to a multiple of ``2**levels`` per axis."""
        multiple = 2**self.levels
        return tuple(-(-int(n) // multiple) * multiple for n in shape)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the output for an input of spatial size ``shape``."""
        return tuple(n // self.field_downsize for n in self.padded_shape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(
                f"UNet input must have shape (B, C, *spatial) with {self.ndim} spatial dims, "
                f"got {tuple(x.shape)}"
            )
        x = self._pad(x)
        skips = [x, *self.encoder(x)]
        y = skips.pop()
        for index, block in enumerate(self.decoder):
            y = block(y)
            if index in self._upsample_after:
                y = F.interpolate(y, scale_factor=2.0, mode="nearest")
                y = torch.cat([y, skips.pop()], dim=1)
        return y

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[2:]
        target = self.padded_shape(shape)
        if tuple(shape) == target:
            return x
        pad: list[int] = []
        for n, p in zip(reversed(shape), reversed(target), strict=True):
            pad += [0, p - n]
        return F.pad(x, pad, mode=self.pad_mode)


def _positive_list(values: Sequence[int], name: str) -> list[int]:
    channels = [int(v) for v in values]
    if not channels or any(v < 1 for v in channels):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {list(values)}")
    return channels


def _log2(value: int, name: str) -> int:
    """Exponent of a power of two, or a ValueError naming ``name``."""
    if int(value) != value or value < 1 or int(value) & (int(value) - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, ...), got {value}")
    return int(value).bit_length() - 1
