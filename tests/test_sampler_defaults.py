"""The teacher's sampler defaults are a config layer: model defaults < teacher < preset < flags, resolved once by
generate and recorded (with the σ schedule actually run) in the manifest. EDM's choices (generate.py / README):
σ ∈ [0.002, 80] clipped to the network's range — VP keeps [0.002, 80], VE starts at 0.02 — and 18 Heun steps at
32 px, 40 at 64 px."""

import json

import pytest
import torch
from faults import cli, error_line

from kdm_pipe.config import ConfigError, SamplerConfig, generate_config
from kdm_pipe.generation import _TEACHERS, with_teacher_defaults
from kdm_pipe.manifest import Manifest
from kdm_pipe.networks import build_network
from kdm_pipe.sampling import edm_sigmas
from kdm_pipe.shards import read_shard
from kdm_pipe.teachers.edm_checkpoint import save_state_dict_checkpoint

SMALL = dict(img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1], num_blocks=1,
             attn_resolutions=[], dropout=0.0)


def checkpoint(tmp_path, precond: str, resolution: int):
    path = tmp_path / f"{precond}-{resolution}.pt"
    spec = dict(SMALL, img_resolution=resolution)
    save_state_dict_checkpoint(build_network(precond, **spec), precond, spec, path)
    return path


@pytest.fixture(autouse=True)
def fresh_teachers():
    _TEACHERS.clear()          # each test's checkpoints are new files: no teacher cached from another test
    yield
    _TEACHERS.clear()


@pytest.mark.parametrize("precond, resolution, want", [
    ("VPPrecond", 32, (18, 0.002, 80.0)),       # EDM's CIFAR-10 VP: the network covers [0.001, 152]
    ("VEPrecond", 32, (18, 0.02, 80.0)),        # VE: [0.02, 100]
    ("VPPrecond", 64, (40, 0.002, 80.0)),       # 64 px: EDM's FFHQ / AFHQv2 setting
    ("VEPrecond", 64, (40, 0.02, 80.0)),
])
def test_generate_runs_edms_choices(tmp_path, precond, resolution, want):
    cfg = generate_config(None, {"out": tmp_path / "pairs", "teacher": {
        "name": "edm", "checkpoint": checkpoint(tmp_path, precond, resolution)}})
    s = with_teacher_defaults(cfg).sampler
    assert (s.solver, s.rho) == ("heun", 7.0)
    assert (s.steps, s.sigma_min, s.sigma_max) == pytest.approx(want)


def test_dry_run_shows_the_sampler_that_would_run(tmp_path):
    r = cli("generate", "--teacher", "edm", "--checkpoint", checkpoint(tmp_path, "VEPrecond", 64),
            "--out", tmp_path / "pairs", "--rho", "5", "--dry-run")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["sampler"]
    assert (s["steps"], s["sigma_min"], s["rho"]) == (40, 0.02, 5.0) and not (tmp_path / "pairs").exists()


def test_layers_model_teacher_preset_flags(tmp_path):
    teacher = {"steps": 40, "sigma_min": 0.02, "sigma_max": 80.0, "rho": 7.0, "solver": "heun"}
    assert SamplerConfig().over(teacher) == SamplerConfig(**teacher)                   # teacher > model defaults
    assert SamplerConfig().over({}) == SamplerConfig()                                  # no teacher layer: EDM's
    preset = tmp_path / "p.yaml"
    preset.write_text("generate:\n  sampler:\n    steps: 18\n    rho: 5.0\n")
    cfg = generate_config(str(preset), {"sampler": {"rho": 3.0}})
    s = cfg.sampler.over(teacher)
    assert (s.steps, s.rho, s.sigma_min, s.sigma_max) == (18, 3.0, 0.02, 80.0)    # preset > teacher; flag > preset
    # A preset stating a model default still wins over the teacher: set is set.
    assert SamplerConfig(sigma_min=0.002).over(teacher).sigma_min == 0.002
    # Resolved is resolved: over() again keeps every field.
    assert s.over({"steps": 99, "sigma_min": 1.0}) == s


def test_a_setting_the_teachers_range_contradicts_is_refused():
    with pytest.raises(ConfigError, match="sigma_min.*teacher's defaults"):
        SamplerConfig(sigma_max=0.01).over({"sigma_min": 0.02, "sigma_max": 80.0})


@pytest.mark.usefixtures("ray_cluster")
def test_manifest_records_the_schedule_run(tmp_path):
    ve = checkpoint(tmp_path, "VEPrecond", 8)
    out = tmp_path / "pairs"
    args = ["generate", "--teacher", "edm", "--checkpoint", ve, "--out", out, "--shards", "1", "--pairs-per-shard",
            "4", "--batch", "4", "--steps", "3", "--workers", "1", "-q"]
    assert cli(*args).returncode == 0
    m = Manifest.model_validate_json((out / "manifest.json").read_text())
    want = edm_sigmas(3, 0.02, 80.0, 7.0).tolist()        # VE's σ_min, not the model default 0.002
    assert m.sigmas == want and m.sigma_max == 80.0 and m.nfe == 5
    assert m.source["identity"]["sampler"] == {"solver": "heun", "steps": 3, "sigma_min": 0.02, "sigma_max": 80.0,
                                               "rho": 7.0}
    recorded = json.loads((out / "generate.config.json").read_text())["sampler"]
    assert recorded == m.source["identity"]["sampler"]
    # The same command again: the same resolution, so the set is complete, not "generated with other settings".
    again = cli(*args)
    assert again.returncode == 0 and "all 1 shards complete" in again.stdout
    # Another explicit σ_min is another pair set.
    error_line(cli(*args, "--sigma-min", "0.05"), 2, "different settings", "sampler")
    # The x_T the workers drew is σ_max·z with the recorded σ_max (80, not VE's network maximum 100).
    x_T = next(read_shard(out / m.shards[0].name))["x_T"]
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(torch.from_numpy(x_T[0]), 80.0 * torch.randn((1, 8, 8), generator=g))
