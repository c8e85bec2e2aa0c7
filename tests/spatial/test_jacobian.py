"""Jacobian determinant of large 3D fields, taken slab by slab."""

import importlib

import torch

jacobian = importlib.import_module("regnet.spatial.jacobian")


def test_large_3d_fields_go_slab_by_slab_with_the_same_values(monkeypatch):
    """Above the size threshold the determinant is taken piece by piece (one neighbouring plane
    either side): equal to the whole-volume computation, the first and last planes included."""
    gen = torch.Generator().manual_seed(0)
    ddf = torch.randn(2, 3, 37, 9, 8, generator=gen, dtype=torch.float64)
    whole = jacobian._determinant(ddf)
    monkeypatch.setattr(jacobian, "SLAB_PLANES", 5)
    monkeypatch.setattr(jacobian, "SLAB_MIN_VOXELS", 100)
    sliced = jacobian.jacobian_determinant(ddf)
    assert sliced.shape == (2, 37, 9, 8)
    assert torch.equal(sliced, whole)


def test_affine_field_has_the_matrix_determinant_in_every_slab(monkeypatch):
    monkeypatch.setattr(jacobian, "SLAB_PLANES", 4)
    monkeypatch.setattr(jacobian, "SLAB_MIN_VOXELS", 100)
    linear = torch.tensor(
        [[0.2, 0.1, 0.0], [0.0, -0.3, 0.05], [0.1, 0.0, 0.4]], dtype=torch.float64
    )
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (20, 6, 5)], indexing="ij")
    )
    ddf = torch.einsum("ca,a...->c...", linear, grid)[None]
    expected = torch.linalg.det(torch.eye(3, dtype=torch.float64) + linear)
    torch.testing.assert_close(jacobian.jacobian_determinant(ddf), expected.expand(1, 20, 6, 5))
