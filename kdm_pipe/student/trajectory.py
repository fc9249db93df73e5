"""Trajectory supervision's times, read from the pair set: which stored state sits where along the flow.

The progress of stored state k is τ_k = step_k / step_last (0 at x_T, 1 at x_0), uniform in solver steps: the
teacher's schedule (EDM's ρ = 7 spacing, a flow-matching grid) already spreads its steps where the flow changes,
so equal τ intervals are equal amounts of the teacher's work, and a dense operator can stand for one interval of
step_last / gcd(steps) equal ones. σ_k (or a flow-matching t_k) is kept to scale each state to unit size.
"""
from __future__ import annotations

import math

from kdm_pipe.config import StudentConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.manifest import Manifest


def with_trajectory_times(cfg: StudentConfig, manifest: Manifest, data: str) -> StudentConfig:
    """`cfg` with its trajectory times filled in from `manifest`; ConfigError when the pairs or the student cannot
    be trained with trajectory supervision. Unchanged when it is off."""
    t = cfg.trajectory
    if t is None:
        return cfg
    fix = "or drop the student's trajectory settings"
    if not manifest.trajectory_steps or not manifest.trajectory_sigmas:
        raise ConfigError(f"--data {data} keeps no trajectory states, but the student has trajectory settings; "
                          f"generate pairs with --trajectory every-K (or import a (T, N, ...) stack) {fix}")
    if cfg.kind != "kdm" or (len(manifest.shape) == 1 and cfg.mlp != "official"):
        raise ConfigError(f"trajectory supervision needs a KDM student with time-conditioned networks (student.kind: "
                          f"kdm; for vector pairs mlp: official); {fix}")
    if manifest.label_dim and cfg.koopman_control:
        raise ConfigError(f"trajectory supervision does not carry the Koopman control B·y along the flow; set "
                          f"student.koopman_control: false for labelled pairs {fix}")
    steps = manifest.trajectory_steps
    if len(steps) < 3:
        raise ConfigError(f"--data {data} keeps only x_T and x_0 (steps {steps}); trajectory supervision needs states "
                          f"between them (generate with --trajectory every-K, K < the sampler's steps) {fix}")
    filled = {"taus": [s / steps[-1] for s in steps], "sigmas": list(manifest.trajectory_sigmas),
              "intervals": steps[-1] // math.gcd(*steps)}
    given = {k: getattr(t, k) for k in filled if getattr(t, k) is not None}
    if any(given[k] != filled[k] for k in given):
        raise ConfigError(f"student.trajectory {', '.join(given)} are filled in from --data {data}'s manifest and "
                          f"differ from it; leave them unset")
    return cfg.model_copy(update={"trajectory": t.model_copy(update=filled)})
