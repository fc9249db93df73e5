"""Local diffusers models as teachers: the wrapped denoiser against diffusers' own scheduler steps (DDIM η = 0 for
VP models with ε-, x0- and v-prediction; the flow-matching Euler step), the sampler defaults taken from the model,
labels, determinism, refusals, and generate → verify → train → evaluate on tiny random models."""

import hashlib
import sys

import pytest
import torch
from diffusers_fixture import save_model, scheduler, shard_twice
from faults import cli

from kdm_pipe.config import DiffusersTeacherConfig, EvaluateConfig, GenerateConfig, TrainConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.generation import _TEACHERS, with_teacher_defaults
from kdm_pipe.manifest import Manifest
from kdm_pipe.sampling import solve
from kdm_pipe.shards import read_shard
from kdm_pipe.teachers import build_teacher

CPU = torch.device("cpu")


def teacher_for(path):
    return build_teacher(DiffusersTeacherConfig(checkpoint=path))


@pytest.fixture(autouse=True)
def fresh_teachers():
    _TEACHERS.clear()          # model folders are new per test: no teacher cached from another one
    yield
    _TEACHERS.clear()


def diffusers_loop(teacher, sched, z: torch.Tensor) -> torch.Tensor:
    """diffusers' own sampling loop: the scheduler's step on the teacher's UNet, from z over its timesteps."""
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(teacher.unet(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_vp_denoiser_steps_as_ddim(tmp_path, prediction):
    teacher = teacher_for(save_model(tmp_path, "vp", prediction))
    ddim = scheduler("vp", prediction)
    ddim.set_timesteps(10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = diffusers_loop(teacher, ddim, z)
    # The schedule made of the scheduler's own σ's, then 0 (set_alpha_to_one: ᾱ = 1 after the last step).
    sigmas = torch.cat([teacher.sigmas[ddim.timesteps], torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(teacher.timestep(sigmas[3]), ddim.timesteps[3].double())   # exactly t on the training σ's
    ours, _ = solve(teacher.denoise, z.double() * (1 + sigmas[0] ** 2).sqrt(), sigmas, None, "euler")
    torch.testing.assert_close(ours, x.double(), rtol=2e-6, atol=2e-6 * x.abs().max().item())
    # Heun on the same σ's is another solver: not the DDIM path.
    heun, _ = solve(teacher.denoise, z.double() * (1 + sigmas[0] ** 2).sqrt(), sigmas, None, "heun")
    assert not torch.allclose(heun, x.double(), rtol=1e-3, atol=1e-3)


def test_flow_denoiser_steps_as_flow_match_euler(tmp_path):
    teacher = teacher_for(save_model(tmp_path, "flow"))
    flow = scheduler("flow")
    flow.set_timesteps(8)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x = diffusers_loop(teacher, flow, z)
    ours, _ = solve(teacher.denoise, z.double(), flow.sigmas.double(), None, "euler")
    torch.testing.assert_close(ours, x.double(), rtol=2e-6, atol=2e-6 * x.abs().max().item())


def test_learned_time_embedding_takes_the_nearest_timestep(tmp_path):
    teacher = teacher_for(save_model(tmp_path, "vp", time_embedding_type="learned", num_train_timesteps=1000))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    between = (teacher.sigmas[500] * teacher.sigmas[501]).sqrt()         # t = 500.5 in log σ
    assert teacher.timestep(between).item() == pytest.approx(500.5)
    with torch.no_grad():
        want = teacher.unet(x.float() / (1 + between ** 2).sqrt().float(), torch.tensor([500, 500])).sample
    torch.testing.assert_close(teacher.denoise(x, between, None), x - between * want.double(), rtol=1e-5, atol=1e-4)


def test_sampler_defaults_come_from_the_model(tmp_path):
    vp = teacher_for(save_model(tmp_path / "vp", "vp"))
    # Linear β in [1e-4, 0.02] over 1000 steps: the network covers σ ∈ [0.0100, 157.4]; EDM's rule clips [0.002, 80].
    assert vp.sigmas[0].item() == pytest.approx(0.0100013, rel=1e-4) and vp.sigmas[-1].item() == pytest.approx(157.4,
                                                                                                               abs=0.1)
    assert vp.sampler_defaults == {"solver": "heun", "steps": 18, "rho": 7.0, "sigma_min": vp.sigmas[0].item(),
                                   "sigma_max": 80.0}
    big = teacher_for(save_model(tmp_path / "vp64", "vp", size=64, width=4))
    assert big.sampler_defaults["steps"] == 40 and big.shape == (1, 64, 64)
    flow = teacher_for(save_model(tmp_path / "flow", "flow"))
    assert flow.sampler_defaults == {"solver": "heun", "steps": 18, "sigma_min": 1 / 18, "sigma_max": 1.0, "rho": 1.0}
    cfg = with_teacher_defaults(GenerateConfig(teacher={"name": "diffusers", "checkpoint": tmp_path / "flow"},
                                               sampler={"steps": 4}))
    assert (cfg.sampler.steps, cfg.sampler.sigma_max, cfg.sampler.rho) == (4, 1.0, 1.0)
    assert flow.fingerprint["params"]["prediction_type"] == "flow_velocity"
    assert vp.fingerprint["params"]["prediction_type"] == "epsilon"
    assert vp.weights_sha256 == hashlib.sha256((tmp_path / "vp" / "diffusion_pytorch_model.safetensors")
                                               .read_bytes()).hexdigest()


def test_pipeline_folder_and_labels(tmp_path):
    root = save_model(tmp_path, "vp", pipeline=True, classes=3)
    assert (root / "model_index.json").is_file() and (root / "unet" / "config.json").is_file()
    teacher = teacher_for(root)
    assert teacher.label_dim == 3
    seeds = [0, 1, 2, 3]
    sampler = GenerateConfig(sampler={"steps": 3}).sampler.over(teacher.sampler_defaults)
    pairs = teacher.sample(sampler, seeds, None, CPU)
    for i, s in enumerate(seeds):                    # the label is drawn from the seed's generator after the latent
        g = torch.Generator().manual_seed(s)
        z = torch.randn((1, 8, 8), generator=g)
        assert pairs["label"][i].argmax().item() == torch.randint(3, (1,), generator=g).item()
        assert torch.equal(pairs["x_T"][i], sampler.sigma_max * z.double())
    x, sigma = pairs["x_T"][:1], torch.tensor(5.0, dtype=torch.float64)
    outs = [teacher.denoise(x, sigma, torch.eye(3)[k:k + 1]) for k in range(3)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_pairs_are_a_function_of_the_seed(tmp_path):
    cfg = GenerateConfig(teacher={"name": "diffusers", "checkpoint": save_model(tmp_path / "m", "flow")},
                         sampler={"steps": 3}, out=tmp_path / "a", shards=1, pairs_per_shard=6, batch=3)
    cfg = with_teacher_defaults(cfg)
    first = shard_twice(cfg)
    recs = list(read_shard(tmp_path / "a" / first.name))
    assert recs[0]["x_T"].std() == pytest.approx(1.0, abs=0.3)              # flow: x_T = ε, σ_max = 1
    assert not (recs[0]["x_0"] == recs[1]["x_0"]).all()


def test_missing_diffusers_names_the_extra(tmp_path, monkeypatch):
    folder = save_model(tmp_path, "vp")
    monkeypatch.setitem(sys.modules, "diffusers", None)          # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "kdm_pipe.teachers.diffusers_model", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'kdm-pipe\[diffusers\]'"):
        teacher_for(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_generate_verify_train_evaluate(tmp_path, kind):
    from kdm_pipe.training import train
    from stages import evaluate

    model = save_model(tmp_path / "model", kind, prediction="v_prediction")
    pairs, run = tmp_path / "pairs", tmp_path / "run"
    args = ["generate", "--teacher", "diffusers", "--checkpoint", model, "--out", pairs, "--shards", "3",
            "--pairs-per-shard", "16", "--batch", "8", "--steps", "4", "--workers", "2", "-q"]
    assert cli(*args).returncode == 0
    m = Manifest.model_validate_json((pairs / "manifest.json").read_text())
    assert m.teacher["name"] == "diffusers" and m.teacher["weights_sha256"]
    assert m.teacher["params"]["prediction_type"] == ("flow_velocity" if kind == "flow" else "v_prediction")
    assert m.source["identity"]["sampler"]["solver"] == "heun" and m.nfe == 7
    assert m.sigma_max == (1.0 if kind == "flow" else 80.0) and m.sigmas[0] == m.sigma_max and m.sigmas[-1] == 0
    # A shard lost and made again by another Ray worker is the same bytes.
    (pairs / m.shards[1].name).unlink()
    assert cli(*args).returncode == 0 and cli("verify", pairs).returncode == 0
    assert Manifest.model_validate_json((pairs / "manifest.json").read_text()).shards[1].sha256 == m.shards[1].sha256
    student = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    train(TrainConfig.model_validate({"data": pairs, "out": run, "steps": 4, "batch": 8, "loader_workers": 0,
                                      "holdout_shards": 1, "tensorboard": False, "student": student}), progress=False)
    res = evaluate.run(EvaluateConfig(run=run, num=16, batch=8, fid_num=16, set_num=16))
    assert res["speed"]["teacher_network_passes"] == 7 and res["student"]["fd_teacher"] >= 0
