"""Sample-quality metrics: distribution distances, image metrics (FID, IS), paired student-vs-teacher errors,
2-D checkerboard support."""

from kdm_pipe.metrics.checkerboard import checkerboard_mask, off_support_fraction
from kdm_pipe.metrics.detectors import FeatureNet, PixelFeatures, embed, features, load_detector, to_uint8
from kdm_pipe.metrics.distribution import (
    feature_stats,
    frechet_distance,
    frechet_distance_between,
    mmd_rbf,
    precision_recall,
    sliced_wasserstein,
)
from kdm_pipe.metrics.fid import (
    FeatureStats,
    fid_from_stats,
    image_metrics,
    image_source,
    inception_score,
    load_ref_stats,
    reference_stats,
    save_ref_stats,
)
from kdm_pipe.metrics.paired import paired_errors

__all__ = [
    "FeatureNet",
    "FeatureStats",
    "PixelFeatures",
    "checkerboard_mask",
    "embed",
    "feature_stats",
    "features",
    "fid_from_stats",
    "frechet_distance",
    "frechet_distance_between",
    "image_metrics",
    "image_source",
    "inception_score",
    "load_detector",
    "load_ref_stats",
    "mmd_rbf",
    "off_support_fraction",
    "paired_errors",
    "precision_recall",
    "reference_stats",
    "save_ref_stats",
    "sliced_wasserstein",
    "to_uint8",
]
