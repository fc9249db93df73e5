"""The trainer at scale: image students with the discriminator, exact resume of all of it, latent probes,
TensorBoard, 2-process DDP under torchrun equal to one process, and SIGTERM → checkpoint → resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact

from kdm_pipe.config import TrainConfig
from kdm_pipe.manifest import load_manifest
from kdm_pipe.probes import load_probes
from kdm_pipe.trained import latest_checkpoint, student_for
from kdm_pipe.training import discriminator_for, ema_decay, train

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
TINY_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
SMALL_MLP = {"hidden": 32, "depth": 2, "latent_dim": 16}


def weights_equal(a, b, part):
    return all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def image_cfg(data, out, **kw):
    return TrainConfig.model_validate({"data": data, "out": out, "batch": 16, "loader_workers": 0, "shuffle_buffer": 32,
                                       "log_every": 1, "ckpt_every": 3, "probe_every": 2, "probe_pairs": 20,
                                       "student": {**TINY_UNET, "w_adv": 1.0}, **kw})


def test_image_kdm_with_discriminator_resumes_exactly(digit_pairs, tmp_path):
    a = assert_resume_is_exact(lambda out, steps: image_cfg(digit_pairs, out, steps=steps), tmp_path, steps=6,
                               stop=3, parts=("model", "ema", "disc"))
    assert {"disc", "opt_d"} <= set(a)
    # the discriminator really trained (every one of its tensors moved from the seeded init) and the student felt it
    torch.manual_seed(0)
    cfg = image_cfg(digit_pairs, tmp_path / "full", steps=6)
    student_for(cfg, load_manifest(digit_pairs))
    init = discriminator_for(cfg, load_manifest(digit_pairs)).state_dict()
    params = [k for k in init if k.endswith(("weight", "bias"))]
    assert params and all(not torch.equal(init[k], a["disc"][k]) for k in params)
    rows = [json.loads(line) for line in (tmp_path / "full" / "train.jsonl").read_text().splitlines()]
    assert all({"adv", "disc", "latent", "rec", "push"} <= set(r) for r in rows)
    probes = load_probes(tmp_path / "full" / "latents.zarr")
    assert probes["step"].tolist() == [2, 4, 6]
    assert probes["z_T/mean"].shape == (3, 64) and probes["eigenvalues"].shape == (3, 64, 2)
    resumed = load_probes(tmp_path / "half" / "latents.zarr")
    assert resumed["step"].tolist() == [2, 3, 4, 6]           # the first run probed its last step, 3
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "full" / "tensorboard").iterdir())


def test_update_orders(digit_pairs, tmp_path):
    """One step from the same init: the discriminator steps on the same samples in either order (same weights
    after), but only disc-first (the default, official) scores the student with the updated discriminator."""
    states = {}
    for order in ("disc-first", "student-first"):
        train(image_cfg(digit_pairs, tmp_path / order, steps=1, update_order=order), progress=False)
        states[order] = torch.load(latest_checkpoint(tmp_path / order), weights_only=True)
    a, b = states["disc-first"], states["student-first"]
    params = [k for k in a["disc"] if "running" not in k]     # BN running stats see the passes in another order
    assert all(torch.equal(a["disc"][k], b["disc"][k]) for k in params)
    assert not weights_equal(a, b, "model")
    assert TrainConfig().update_order == "disc-first"


def test_ema_warms_up_with_the_steps_taken():
    cfg = TrainConfig(ema=0.999, ema_rampup=0.05)
    assert ema_decay(cfg, 1) < 1e-6                           # the first update copies the weights
    assert ema_decay(cfg, 1000) == pytest.approx(0.5 ** (1 / 50))   # half-life 5% of the steps so far
    assert ema_decay(cfg, 10**6) == pytest.approx(0.999)      # capped by the configured decay
    assert [ema_decay(cfg, s) for s in (10, 100, 1000)] == sorted(ema_decay(cfg, s) for s in (10, 100, 1000))
    assert ema_decay(TrainConfig(ema=0.99, ema_rampup=0), 1) == 0.99


def test_kd_image_baseline_trains(digit_pairs, tmp_path):
    out = train(image_cfg(digit_pairs, tmp_path / "kd", steps=2, student={**TINY_UNET, "kind": "kd", "w_adv": 0.0}),
                progress=False)
    assert out["status"] == "done"
    state = torch.load(latest_checkpoint(tmp_path / "kd"), weights_only=True)
    assert "disc" not in state and any(k.startswith("net.") for k in state["model"])
    assert set(load_probes(tmp_path / "kd" / "latents.zarr")) == {"step", "paired_mse"}


def cli_train(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--batch", "64", "--device", "cpu", "--threads", "1",
            "--ckpt-every", "10", "--quiet", *extra]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(vector_pairs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    small = ["--preset", "checkerboard"]          # the official 2-D student, shortened below
    args = ["--steps", "20", "--no-tensorboard"]
    subprocess.run(CLI + cli_train(vector_pairs, tmp_path / "one", "--loader-workers", "2", *args, *small),
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "kdm_pipe.cli"] + cli_train(vector_pairs, tmp_path / "ddp", "--loader-workers", "0", *args, *small),
                   check=True, env=env, timeout=300)
    a = torch.load(latest_checkpoint(tmp_path / "one"), weights_only=True)
    b = torch.load(latest_checkpoint(tmp_path / "ddp"), weights_only=True)
    assert a["step"] == b["step"] == 20
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), k
    assert not weights_equal(a, torch.load(sorted((tmp_path / "one" / "checkpoints").glob("*.pt"))[0],
                                           weights_only=True), "model")


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes_the_same_run(vector_pairs, tmp_path):
    common = ["--loader-workers", "1", "--no-tensorboard", "--steps", "3000"]
    proc = subprocess.Popen(CLI + cli_train(vector_pairs, tmp_path / "pre", *common, "--preset", "checkerboard"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpts = tmp_path / "pre" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("ckpt-*.pt")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)        # as SLURM does: every process of the job, loader workers too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in out
    stopped = torch.load(latest_checkpoint(tmp_path / "pre"), weights_only=True)["step"]
    assert 10 <= stopped < 3000
    n = stopped + 20
    subprocess.run(CLI + cli_train(vector_pairs, tmp_path / "pre", *common[:-1], str(n), "--resume",
                                   "--preset", "checkerboard"), check=True, timeout=300)
    subprocess.run(CLI + cli_train(vector_pairs, tmp_path / "ref", *common[:-1], str(n), "--preset", "checkerboard"),
                   check=True, timeout=300)
    a = torch.load(latest_checkpoint(tmp_path / "pre"), weights_only=True)
    b = torch.load(latest_checkpoint(tmp_path / "ref"), weights_only=True)
    assert a["step"] == b["step"] == n
    assert weights_equal(a, b, "model") and weights_equal(a, b, "ema")


def test_bf16_autocast_trains_the_image_student(digit_pairs, tmp_path):
    out = train(image_cfg(digit_pairs, tmp_path / "bf16", steps=2, amp="bf16"), progress=False)
    state = torch.load(latest_checkpoint(tmp_path / "bf16"), weights_only=True)
    assert out["status"] == "done" and all(v.dtype == torch.float32 for v in state["model"].values()
                                           if v.is_floating_point())    # autocast: fp32 weights, bf16 compute
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "train.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["total"]) for r in rows)


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(vector_pairs, tmp_path):
    small = {"student": SMALL_MLP, "batch": 128, "loader_workers": 0, "log_every": 1, "tensorboard": False}
    for name, flag in (("eager", False), ("compiled", True)):
        train(TrainConfig.model_validate({"data": vector_pairs, "out": tmp_path / name, "steps": 5, "compile": flag,
                                          **small}), progress=False)
    a, b = (torch.load(latest_checkpoint(tmp_path / n), weights_only=True) for n in ("eager", "compiled"))
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-4), k
