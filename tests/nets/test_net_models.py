"""Registration models: outputs on odd sizes, identity at init, the affine+deformable cascade,
the registry, training signal (overfit, gradient flow), autocast and channels-last."""

import hydra.utils
import pytest
import torch
import torch.nn.functional as F

from regnet.nets import (
    MODELS,
    AffineNet,
    AffineVoxelMorph,
    BSplineNet,
    VoxelMorph,
    build_model,
)
from regnet.spatial import (
    affine_to_ddf,
    compose,
    control_grid_shape,
    identity_grid,
    warp,
)

SMALL = {"enc_channels": (8, 8, 8), "dec_channels": (8, 8, 8, 8, 8)}
SHAPES = {2: (27, 35), 3: (13, 17, 11)}


def small_model(name: str, ndim: int, **kwargs):
    options = {} if name == "affine" else dict(SMALL)
    if name == "affine":
        options["enc_channels"] = (8, 8, 8)
    elif name == "affine_voxelmorph":
        options["affine_enc_channels"] = (8, 8, 8)
    return build_model(name, ndim, **options, **kwargs)


def pair(ndim: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[ndim]
    return torch.rand(batch, 1, *shape, generator=gen), torch.rand(batch, 1, *shape, generator=gen)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_untrained_models_give_near_identity_on_odd_sizes(name, ndim):
    torch.manual_seed(0)
    model = build_model(name, ndim)  # default widths
    fixed, moving = pair(ndim)
    out = model(fixed, moving)
    shape = SHAPES[ndim]
    assert out["ddf"].shape == (2, ndim, *shape)
    assert out["ddf"].dtype == torch.float32
    assert out["ddf"].abs().max() < 1e-3
    if "matrix" in out:
        assert torch.equal(out["matrix"], torch.eye(ndim + 1).expand(2, ndim + 1, ndim + 1))
    if name == "affine":
        assert torch.equal(out["ddf"], torch.zeros_like(out["ddf"]))
    if name == "voxelmorph_diff":
        assert out["velocity"].shape == (2, ndim, *shape)
    if name == "bspline":
        assert out["control_points"].shape == (2, ndim, *control_grid_shape(shape, 5.0))
    if name == "affine_voxelmorph":
        assert out["local_ddf"].shape == (2, ndim, *shape)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("head", ["ddf", "svf"])
def test_cascade_equals_slow_composition(ndim, head):
    torch.manual_seed(0)
    model = AffineVoxelMorph(ndim, affine_enc_channels=(8, 8), head=head, **SMALL)
    n_params = model.affine.head.linear.out_features
    with torch.no_grad():  # a visible affine (rotation, scale, shear, shift) and local field
        model.affine.head.linear.bias.copy_(torch.linspace(-0.12, 0.1, n_params))
        model.deformable.head.field.conv.weight.normal_(0.0, 0.3)
    fixed, moving = pair(ndim)
    out = model(fixed, moving)
    matrix, local = out["matrix"], out["local_ddf"]
    shape = SHAPES[ndim]
    assert not torch.allclose(matrix, torch.eye(ndim + 1).expand_as(matrix), atol=0.05)
    assert local.abs().max() > 0.5
    # the deformable stage saw the affinely warped moving image
    affine_ddf = affine_to_ddf(matrix, shape)
    expected_local = model.deformable(fixed, warp(moving, affine_ddf))["ddf"]
    torch.testing.assert_close(local, expected_local)
    # exact composition == slow composition away from the border (where compose clamps)
    slow = compose(affine_ddf, local)
    target = identity_grid(shape) + local
    upper = torch.tensor(shape, dtype=torch.float32).view(1, ndim, *[1] * ndim) - 1
    inside = ((target >= 0) & (target <= upper)).all(dim=1, keepdim=True).expand_as(slow)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(out["ddf"][inside], slow[inside], atol=1e-4, rtol=0)
    # and it differs from simply adding the two fields
    assert (out["ddf"] - (affine_ddf + local)).abs().max() > 0.05


def test_registry_and_presets():
    assert isinstance(build_model("voxelmorph", 2), VoxelMorph)
    assert build_model("voxelmorph_diff", 3).head.int_steps == 7
    assert isinstance(build_model("affine", 2, transform="rigid"), AffineNet)
    assert isinstance(build_model("bspline", 2, control_spacing=6), BSplineNet)
    cascade = build_model("affine_voxelmorph", 3, preset="vm1", head="svf")
    assert [b[0].out_channels for b in cascade.deformable.unet.decoder] == [32, 32, 32, 32, 8, 8]
    assert build_model("voxelmorph", 2, in_channels=3).unet.encoder.blocks[0][0].in_channels == 6


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("transmorph", 3), {}, "unknown model"),
        (("voxelmorph", 4), {}, "ndim"),
        (("voxelmorph", 2), {"preset": "vm3"}, "preset"),
        (("affine", 2), {"preset": "vm1"}, "U-Net"),
        (("voxelmorph", 2), {"preset": "vm1", "enc_channels": (8, 8)}, "enc_channels"),
    ],
)
def test_registry_rejects_bad_requests(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(*args, **kwargs)


def test_hydra_targets_build_the_classes():
    model = hydra.utils.instantiate(
        {
            "_target_": "regnet.nets.VoxelMorph",
            "ndim": 2,
            "in_channels": 1,
            "enc_channels": [8, 8, 8],
            "dec_channels": [8, 8, 8, 8, 8],
            "head": "svf",
            "int_steps": 5,
            "int_downsize": 2,
            "field_downsize": 2,
        }
    )
    assert isinstance(model, VoxelMorph) and model.head.int_steps == 5
    cascade = hydra.utils.instantiate(
        {"_target_": "regnet.nets.AffineVoxelMorph", "ndim": 2, "transform": "rigid", **SMALL}
    )
    out = cascade(*pair(2))
    assert out["matrix"].shape == (2, 3, 3) and out["ddf"].shape == (2, 2, 27, 35)


def test_input_checks():
    model = small_model("voxelmorph", 2)
    fixed, moving = pair(2)
    with pytest.raises(ValueError, match="moving"):
        model(fixed, moving[..., :-1])
    with pytest.raises(ValueError, match="fixed"):
        model(fixed.expand(2, 2, 27, 35), moving)
    with pytest.raises(ValueError, match="spatial dims"):
        model(fixed[..., None], moving[..., None])


def blob_pair(shift):
    """Two Gaussian blobs on a 27x35 grid; the moving one displaced by ``shift`` voxels."""
    grid = identity_grid((27, 35))[0]

    def image(offset):
        i, j = grid[0] - offset[0], grid[1] - offset[1]
        big = torch.exp(-((i - 12) ** 2 + (j - 15) ** 2) / 30)
        small = 0.7 * torch.exp(-((i - 16) ** 2 + (j - 24) ** 2) / 15)
        return (big + small)[None, None]

    return image((0.0, 0.0)), image(shift)


@pytest.mark.parametrize("name", ["voxelmorph", "affine"])
def test_overfits_a_known_translation(name):
    torch.manual_seed(0)
    fixed, moving = blob_pair((2.0, -1.5))
    model = small_model(name, 2)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3 if name == "affine" else 2e-3)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(warp(moving, model(fixed, moving)["ddf"]), fixed)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    if name == "affine":  # the displacement at the main blob approaches the true shift
        shift = model(fixed, moving)["ddf"][0, :, 12, 15]
        torch.testing.assert_close(shift, torch.tensor([2.0, -1.5]), atol=0.6, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = small_model(name, 2)
    fixed, moving = blob_pair((1.0, -1.0))
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-2)
    # the affine output layer starts at zero, so the encoder gets gradient from the second step
    for _ in range(2):
        loss = F.mse_loss(warp(moving, model(fixed, moving)["ddf"]), fixed)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert silent == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_autocast_keeps_geometry_in_float32(name):
    torch.manual_seed(0)
    model = small_model(name, 3)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "field"):
                module.field.conv.weight.normal_(0.0, 0.2)
            if hasattr(module, "linear"):
                module.linear.bias.normal_(0.0, 0.05)
    fixed, moving = pair(3, batch=1)
    reference = model(fixed, moving)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(fixed, moving)
    assert out["ddf"].dtype == torch.float32
    scale = reference["ddf"].abs().max()
    assert scale > 0.1
    assert (out["ddf"] - reference["ddf"]).abs().max() < 0.1 * scale
    if "matrix" in out:
        assert out["matrix"].dtype == torch.float32


@pytest.mark.parametrize("name", ["voxelmorph_diff", "bspline"])
def test_channels_last_gives_the_same_field(name):
    torch.manual_seed(0)
    model = small_model(name, 3)
    with torch.no_grad():
        model.head.field.conv.weight.normal_(0.0, 0.05)
    fixed, moving = pair(3, batch=1)
    reference = model(fixed, moving)["ddf"]
    model = model.to(memory_format=torch.channels_last_3d)
    fixed, moving = (t.contiguous(memory_format=torch.channels_last_3d) for t in (fixed, moving))
    torch.testing.assert_close(model(fixed, moving)["ddf"], reference, atol=1e-5, rtol=1e-4)
