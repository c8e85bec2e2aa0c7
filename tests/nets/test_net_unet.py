"""U-Net backbone: the VoxelMorph paper layout, presets, any-size padding, coarse output."""

import pytest
import torch
from torch import nn

from regnet.nets import PRESETS, UNet, build_model, count_parameters


def conv_params(ndim: int, layers: list[tuple[int, int]]) -> int:
    """Parameters of 3x3(x3) convolutions with bias, from (in, out) channel pairs."""
    return sum(3**ndim * cin * cout + cout for cin, cout in layers)


# (in, out) channels of every convolution of the paper's networks for one-channel images:
# encoder on the 2-channel pair, decoder with skip concatenations, then the flow convolution.
PAPER_LAYERS = {
    "vm1": [
        (2, 16), (16, 32), (32, 32), (32, 32),
        (32, 32), (64, 32), (64, 32), (48, 32), (32, 8), (10, 8),
        (8, "ndim"),
    ],
    "vm2": [
        (2, 16), (16, 32), (32, 32), (32, 32),
        (32, 32), (64, 32), (64, 32), (48, 32), (32, 32), (34, 16), (16, 16),
        (16, "ndim"),
    ],
}  # fmt: skip


def conv_channels(module: nn.Module) -> list[tuple[int, int]]:
    return [
        (m.in_channels, m.out_channels)
        for m in module.modules()
        if isinstance(m, nn.Conv2d | nn.Conv3d)
    ]


@pytest.mark.parametrize("preset", ["vm1", "vm2"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_presets_follow_the_paper_layout(preset, ndim):
    model = build_model("voxelmorph", ndim, preset=preset)
    expected = [(cin, ndim if cout == "ndim" else cout) for cin, cout in PAPER_LAYERS[preset]]
    assert conv_channels(model) == expected
    assert count_parameters(model) == conv_params(ndim, expected)


def test_preset_parameter_counts():
    # 3D VoxelMorph-1 ~0.26 M, VoxelMorph-2 ~0.30 M parameters (one-channel images)
    counts = {p: count_parameters(build_model("voxelmorph", 3, preset=p)) for p in PRESETS}
    assert counts == {"vm1": 259_675, "vm2": 300_547}
    assert PRESETS["vm1"]["dec_channels"] == (32, 32, 32, 32, 8, 8)
    assert PRESETS["vm2"]["dec_channels"] == (32, 32, 32, 32, 32, 16, 16)


def decoder_output_shapes(unet: UNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Spatial shapes of the outputs of every decoder convolution block."""
    shapes: list[tuple[int, ...]] = []
    hooks = [
        block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[2:])))
        for block in unet.decoder
    ]
    unet(x)
    for hook in hooks:
        hook.remove()
    return shapes


def test_decoder_resolutions_follow_the_paper():
    shapes = decoder_output_shapes(UNet(3, 2, **PRESETS["vm2"]), torch.zeros(1, 2, 32, 16, 16))
    # 1/16, 1/8, 1/4, then two convs at 1/2, then full resolution
    assert [s[0] for s in shapes] == [2, 4, 8, 16, 16, 32, 32]


@pytest.mark.parametrize("shape", [(27, 35), (13, 17, 11)])
def test_any_size_is_padded_to_a_multiple(shape):
    unet = UNet(len(shape), 2, (8, 8, 8), (8, 8, 8, 8, 4))
    out = unet(torch.randn(1, 2, *shape))
    padded = unet.padded_shape(shape)
    assert all(p % 8 == 0 and 0 <= p - n < 8 for p, n in zip(padded, shape, strict=True))
    assert out.shape == (1, 4, *padded)


def test_replicate_padding_keeps_the_image_region_of_the_input():
    unet = UNet(2, 1, (4, 4), (4, 4, 4, 4))
    x = torch.randn(1, 1, 5, 6)
    padded = unet._pad(x)
    assert padded.shape[2:] == (8, 8)
    assert torch.equal(padded[..., :5, :6], x)
    assert torch.equal(padded[..., 7, :6], x[..., 4, :])  # end rows repeat the last row


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_field_downsize_output_shape(factor):
    unet = UNet(2, 2, (8, 8, 8), (8, 8, 8, 8, 4), field_downsize=factor)
    out = unet(torch.randn(1, 2, 27, 35))
    assert out.shape[2:] == unet.output_shape((27, 35)) == (32 // factor, 40 // factor)


def test_field_downsize_saves_full_resolution_work():
    x = torch.randn(1, 2, 32, 32, 32)
    full = decoder_output_shapes(UNet(3, 2, **PRESETS["vm2"]), x)
    half = decoder_output_shapes(UNet(3, 2, **PRESETS["vm2"], field_downsize=2), x)
    # the two full-resolution convolutions now run at half resolution, the rest is unchanged
    assert full[-2:] == [(32, 32, 32)] * 2
    assert half[-2:] == [(16, 16, 16)] * 2
    assert half[:-2] == full[:-2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dec_channels": (8, 8, 8)}, "dec_channels"),
        ({"field_downsize": 3}, "field_downsize"),
        ({"field_downsize": 16}, "field_downsize"),
        ({"enc_channels": ()}, "enc_channels"),
        ({"pad_mode": "reflect"}, "pad_mode"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    options = {"enc_channels": (8, 8, 8), "dec_channels": (8, 8, 8, 8, 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        UNet(2, 2, **options)
