"""Sample-quality metrics: distribution distances, paired student-vs-teacher errors, 2-D checkerboard support."""

from kdm_pipe.metrics.checkerboard import checkerboard_mask, off_support_fraction
from kdm_pipe.metrics.distribution import (
    feature_stats,
    frechet_distance,
    frechet_distance_between,
    mmd_rbf,
    precision_recall,
    sliced_wasserstein,
)
from kdm_pipe.metrics.paired import paired_errors

__all__ = [
    "checkerboard_mask",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_between",
    "mmd_rbf",
    "off_support_fraction",
    "paired_errors",
    "precision_recall",
    "sliced_wasserstein",
]
