"""Pooled similarities (MI, NCC) of the affine stage at lattice voxels."""

import pytest
import torch
from phantoms import brain_labels, render

from regnet.losses import build_loss
from regnet.optimize import register
from regnet.optimize.sampled import SampledPooled
from regnet.spatial import affine_matrix, apply_affine, identity_grid, sample
from regnet.spatial.smooth import gaussian_smooth


def textured(shape, seed):
    noise = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    image = gaussian_smooth(noise, 2.0)
    return (image - image.min()) / (image.max() - image.min())


def turn(ndim, degrees, shift, shape):
    rotation = torch.tensor([[degrees]] if ndim == 2 else [[degrees, -degrees / 2, degrees / 3]])
    centre = [(n - 1) / 2 for n in shape]
    translation = torch.tensor([shift] * ndim, dtype=torch.float32)[None]
    return affine_matrix(translation, torch.deg2rad(rotation), ndim=ndim, centre=centre)


@pytest.mark.parametrize("term", ["mi", "nmi", "ncc"])
@pytest.mark.parametrize("shape", [(36, 30), (22, 20, 18)])
def test_stride_one_equals_the_loss_of_the_whole_warped_image(shape, term):
    ndim = len(shape)
    fixed, moving = textured(shape, 0), textured(shape, 1)
    mask = (torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    matrix = turn(ndim, 12.0, 1.5, shape)
    loss = build_loss(term)
    warped = sample(moving, apply_affine(matrix, identity_grid(shape)))
    dense = loss({"fixed": fixed, "warped": warped, "fixed_mask": mask})[0]
    sampled = SampledPooled(fixed, moving, mask, loss, stride=1)
    torch.testing.assert_close(sampled(matrix), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(36, 30), (22, 20, 18)])
def test_stride_two_cycles_through_every_voxel_and_ranks_alignments_as_every_voxel_does(shape):
    ndim = len(shape)
    fixed = textured(shape, 0)
    moving = 1.0 - fixed  # another contrast: MI still peaks at the identity
    loss = build_loss("mi")
    sampled = SampledPooled(fixed, moving, None, loss, stride=2)
    counts = [index.numel() for index, _, _ in sampled.lattice.samples]
    assert sum(counts) == fixed.numel() and len(counts) == 2**ndim
    identity = torch.eye(ndim + 1)[None]
    offsets = [turn(ndim, 0.0, shift, shape) for shift in (0.0, 1.0, 2.0)]
    for _ in range(2**ndim):  # at every lattice offset, the true alignment scores best
        values = [float(sampled(m)) for m in [identity, *offsets[1:]]]
        assert values[0] < values[1] < values[2]


def test_affine_stages_on_lattice_voxels_recover_a_rotation_across_contrasts(monkeypatch):
    """A 3D head phantom against its inverted-contrast copy turned by 10 degrees and shifted
    2 voxels: the MI pre-stage of an SVF registration, evaluated on lattice voxels on its
    finer level, finds the matrix (the deformable stage skipped), and so does an affine
    registration on its own."""
    labels = brain_labels((32, 32, 32))
    fixed = torch.from_numpy(render(labels))[None, None]
    inverted = torch.from_numpy(render(labels, inverted=True, seed=1))[None, None]
    shape = fixed.shape[2:]
    truth = turn(3, 10.0, 2.0, shape)
    moving = sample(inverted, apply_affine(torch.linalg.inv(truth), identity_grid(shape)))
    calls = []
    original = SampledPooled.__call__
    monkeypatch.setattr(
        SampledPooled, "__call__", lambda self, m: calls.append(1) or original(self, m)
    )
    result = register(
        fixed,
        moving,
        transform="svf",
        loss="mind",
        affine_loss="mi",
        levels=2,
        iterations=(0, 0),
        affine_iterations=(100, 60),
        init="search",
        affine_sampling=True,
    )
    assert len(calls) == 60  # the finer level's steps, all on the lattice
    points = identity_grid(shape)
    error = (apply_affine(result.matrix, points) - apply_affine(truth, points)).norm(dim=1)
    inside = torch.from_numpy(labels > 0)[None]
    assert float(error[inside].mean()) < 0.35
    # an affine transform on its own samples its stage the same way, its finest level included
    calls.clear()
    result = register(
        fixed,
        moving,
        transform="affine",
        loss="mi",
        levels=2,
        iterations=(100, 60),
        init="search",
        affine_sampling=True,
    )
    assert len(calls) == 60
    error = (apply_affine(result.matrix, points) - apply_affine(truth, points)).norm(dim=1)
    assert float(error[inside].mean()) < 0.35


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3), (1, 9, 2)])
def test_lattice_voxel_indices_are_torch_unravel_index(shape):
    from regnet.optimize.sampled import _unravel

    index = torch.arange(torch.Size(shape).numel()).flip(0)[::2]
    expected = torch.stack(torch.unravel_index(index, shape))
    assert torch.equal(_unravel(index, shape), expected)
