"""Small 3D head phantoms with the differences real scans have: a brain with asymmetric internal
structure and labels, optionally inside a scalp/skull/CSF shell with a neck (as an unstripped
T1), optionally with inverted contrast. Arrays are ``(X, Y, Z)`` numpy, voxel index order."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LABELS = {"white": 1, "grey": 2, "ventricle": 3, "cerebellum": 4}
T1 = {"white": 1.0, "grey": 0.6, "ventricle": 0.15, "cerebellum": 0.8}
"""T1-like tissue intensities (white matter 1)."""
SHELL = {"csf": 0.1, "skull": 0.05, "marrow": 0.35, "scalp": 1.05}


def _ellipsoid(grid: np.ndarray, centre, radii) -> np.ndarray:
    offset = (grid - np.asarray(centre, float)[:, None, None, None]) / np.asarray(radii, float)[
        :, None, None, None
    ]
    return (offset**2).sum(0)


def brain_labels(shape=(40, 40, 40)) -> np.ndarray:
    """Label map (:data:`LABELS`): a grey-matter ellipsoid around white matter, two unequal
    ventricles left of centre and a cerebellum low at the back, so no rotation maps it onto
    itself."""
    grid = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2 + np.array([0.0, 0.0, 2.0])
    labels = np.zeros(shape, np.int16)
    labels[_ellipsoid(grid, c, (12, 14.5, 10)) <= 1] = LABELS["grey"]
    labels[_ellipsoid(grid, c, (9, 11.5, 7.5)) <= 1] = LABELS["white"]
    labels[_ellipsoid(grid, c + np.array([-3.0, 2.0, 1.0]), (2.0, 5.0, 2.5)) <= 1] = LABELS[
        "ventricle"
    ]
    labels[_ellipsoid(grid, c + np.array([2.5, 3.0, 1.0]), (1.5, 3.0, 2.0)) <= 1] = LABELS[
        "ventricle"
    ]
    labels[_ellipsoid(grid, c + np.array([0.0, -10.0, -9.0]), (7, 4.5, 3.5)) <= 1] = LABELS[
        "cerebellum"
    ]
    return labels


def render(labels: np.ndarray, skull: bool = False, inverted: bool = False, seed: int = 0):
    """T1-like image of ``labels`` with a tissue texture (the same for every ``seed``: it is part
    of the anatomy) and noise (drawn from ``seed``); ``skull`` adds CSF, skull (dark tables,
    brighter marrow) and bright scalp shells and a neck below; ``inverted`` maps every
    intensity ``v`` to ``1.1 - v`` inside the object (a T2-like contrast). float32."""
    image = np.zeros(labels.shape, np.float32)
    for name, value in T1.items():
        image[labels == LABELS[name]] = value
    texture = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(labels.shape), 1.5)
    generator = np.random.default_rng(seed)
    brain = labels > 0
    image = image * (1 + 0.4 * texture / texture.std()) * brain
    inside = brain.copy()
    if skull:
        distance = ndimage.distance_transform_edt(~brain)
        x, y, z = np.indices(labels.shape)
        centre = (np.asarray(labels.shape) - 1) / 2
        neck = ((x - centre[0]) ** 2 / 49 + (y - centre[1] + 2) ** 2 / 64 <= 1) & (z < centre[2])
        shells = [
            ("csf", distance <= 1.5),
            ("skull", distance <= 2.5),
            ("marrow", distance <= 3.5),
            ("skull", distance <= 4.5),
            ("scalp", distance <= 6.5),
        ]
        for name, region in reversed(shells):
            image[region & ~brain] = SHELL[name]
        image[neck & (distance > 6.5)] = 0.7
        inside = brain | (distance <= 6.5) | neck
    if inverted:
        image = np.where(inside, 1.1 - image, 0.0)
    image = image + 0.02 * generator.standard_normal(labels.shape) * inside
    return ndimage.gaussian_filter(image, 0.5).astype(np.float32)


def rigid_matrix(angles_degrees, shift, centre) -> np.ndarray:
    """``(4, 4)`` voxel map ``x -> R (x - c) + c + shift``, ``R`` rotations about axes 0, 1, 2
    in that order."""
    matrix = np.eye(3)
    for axis, angle in enumerate(np.radians(angles_degrees)):
        a, b = [k for k in range(3) if k != axis]
        rotation = np.eye(3)
        rotation[a, a] = rotation[b, b] = np.cos(angle)
        rotation[a, b], rotation[b, a] = -np.sin(angle), np.sin(angle)
        matrix = rotation @ matrix
    result = np.eye(4)
    result[:3, :3] = matrix
    result[:3, 3] = np.asarray(centre) + np.asarray(shift) - matrix @ np.asarray(centre)
    return result


def resample(volume: np.ndarray, matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """``out(x) = volume(matrix @ x)`` (backward map), zero outside."""
    return ndimage.affine_transform(volume, matrix, order=order, mode="constant", cval=0.0)
