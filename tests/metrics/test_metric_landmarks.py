"""Target registration error."""

import numpy as np
import pytest
import torch

from regnet.metrics import tre


def test_tre_distances_and_mean():
    fixed = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    warped = fixed + np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 2.0, 2.0]])
    result = tre(fixed, torch.from_numpy(warped))
    np.testing.assert_allclose(result.distances, [5.0, 0.0, 3.0])
    assert result.mean == pytest.approx(8.0 / 3.0)
    distances, mean = tre(fixed[:, :2], warped[:, :2])
    np.testing.assert_allclose(distances, [5.0, 0.0, np.sqrt(5.0)])


def test_tre_shape_errors():
    with pytest.raises(ValueError, match="fixed_points_mm"):
        tre(np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="warped_points_mm"):
        tre(np.zeros((3, 3)), np.zeros((2, 3)))
