"""Evaluation metrics, kept apart from the training losses: label overlap (Dice), surface
distance (HD95, mm), landmark error (TRE, mm) and Jacobian statistics (% folding, SDlogJ).

All accept numpy arrays or torch tensors, 2D or 3D, and return Python floats (or numpy arrays).
"""

from regnet.metrics.jacobian import jacobian_stats
from regnet.metrics.labels import dice_per_label, hd95
from regnet.metrics.landmarks import TRE, tre

__all__ = ["TRE", "dice_per_label", "hd95", "jacobian_stats", "tre"]
