"""Trajectories reach the student: stored states through shards → loader (with their pair, after shuffling, across
workers and resume), importers keeping every state, the operator's time parametrisation, trajectory-supervised
training, few-step sampling, and the refusals."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_pairs
from faults import cli, error_line, tree

from kdm_pipe.config import EvaluateConfig, StudentConfig, TrainConfig, TrajectoryConfig
from kdm_pipe.evaluation import apply, evaluate, sampler
from kdm_pipe.loader import batches
from kdm_pipe.manifest import load_manifest
from kdm_pipe.shards import read_pairs, read_shard
from kdm_pipe.student.koopman import KoopmanOperator
from kdm_pipe.student.vector import VectorKDM
from kdm_pipe.trained import latest_checkpoint, load_weights
from kdm_pipe.training import train, trained_fields
from stages.generate import bytes_per_pair

SMALL = {"hidden": 64, "depth": 3, "latent_dim": 32}


@pytest.fixture(scope="module")
def traj_pairs(tmp_path_factory):
    """4 shards × 500 checkerboard pairs, 6 Heun steps, states every 2 steps: σ_max, two interior states, 0."""
    return make_pairs(tmp_path_factory.mktemp("traj"), shards=4, pairs_per_shard=500, batch=250,
                      sampler={"steps": 6}, trajectory="every-2")


@pytest.fixture(scope="module")
def traj_digits(tmp_path_factory):
    """3 shards × 64 pairs from the shipped digits teacher, 6 Heun steps, states every 2 steps."""
    return make_pairs(tmp_path_factory.mktemp("traj-digits"), teacher={"name": "digits"}, shards=3,
                      pairs_per_shard=64, batch=64, sampler={"steps": 6}, trajectory="every-2")


def by_seed(directory):
    recs = [r for s in load_manifest(directory).shards for r in read_shard(directory / s.name)]
    return {int(s): t for r in recs for s, t in zip(r["seed"], r["traj"])}


def test_states_ride_with_their_pair_through_the_shuffle_workers_and_resume(traj_pairs):
    m = load_manifest(traj_pairs)
    assert m.trajectory_steps == [0, 2, 4, 6] and m.trajectory_sigmas[0] == 80 and m.trajectory_sigmas[-1] == 0
    truth = by_seed(traj_pairs)
    shards = [(s.name, s.pairs) for s in m.shards]
    stream = batches(traj_pairs, shards, 200, 300, seed=3, workers=2)
    try:
        got = [next(stream) for _ in range(14)]       # more than an epoch: shuffled across shards and workers
    finally:
        stream.close()
    for b in got:
        assert b["traj"].shape == (200, 4, 2)
        want = np.stack([truth[int(s)] for s in b["seed"]])
        np.testing.assert_array_equal(b["traj"].numpy(), want)
        np.testing.assert_array_equal(b["traj"][:, 0].numpy(), b["x_T"].numpy())
        np.testing.assert_array_equal(b["traj"][:, -1].numpy(), b["x_0"].numpy())
    assert len({int(b["seed"][0]) for b in got}) == len(got)
    resumed = batches(traj_pairs, shards, 200, 300, seed=3, workers=2, start=11)
    try:
        for b in got[11:]:
            r = next(resumed)
            assert all(torch.equal(r[f], b[f]) for f in b)
    finally:
        resumed.close()
    assert "traj" in read_pairs(traj_pairs, [shards[0][0]], 10, traj=True)
    assert "traj" not in read_pairs(traj_pairs, [shards[0][0]], 10)
    # generate's storage report: x_T, x_0 (2 × 2 float32), 4 states (4 × 2 float32), an int64 seed
    assert bytes_per_pair(m) == "56 bytes per pair with 4 trajectory states, 24 without (2.3×)"


def test_the_trainer_is_shipped_trajectories_only_when_it_reads_them(traj_pairs):
    m = load_manifest(traj_pairs)
    shards = [(s.name, s.pairs) for s in m.shards]
    truth = {r["x_T"][i].tobytes(): r["traj"][i] for s in m.shards for r in read_shard(traj_pairs / s.name)
             for i in range(len(r["x_T"]))}
    for trajectory in (None, {}):
        cfg = tcfg(traj_pairs, traj_pairs / "unused", student={**SMALL, "trajectory": trajectory})
        stream = batches(traj_pairs, shards, 200, 300, seed=3, workers=2, start=3, fields=trained_fields(cfg))
        try:
            got = [next(stream) for _ in range(8)]    # past an epoch, from a resume, across two workers
        finally:
            stream.close()
        for b in got:
            assert set(b) == ({"x_0", "x_T", "traj"} if trajectory is not None else {"x_0", "x_T"})
            if trajectory is not None:
                want = np.stack([truth[x.tobytes()] for x in b["x_T"].numpy()])
                np.testing.assert_array_equal(b["traj"].numpy(), want)
                np.testing.assert_array_equal(b["traj"][:, -1].numpy(), b["x_0"].numpy())


def stack(t=5, n=600, seed=0):
    """(T, N, 2) like a flow-matching stack: x at t = 1 … 0 between N(0, I) noise and a non-Gaussian board."""
    rng = np.random.default_rng(seed)
    z, x0 = rng.standard_normal((n, 2)), rng.integers(-2, 2, (n, 2)) + rng.random((n, 2))
    ts = np.linspace(1, 0, t)
    return np.stack([t_ * z + (1 - t_) * x0 for t_ in ts]).astype(np.float32)


def test_import_keeps_every_state_of_a_stack_with_its_times(tmp_path):
    s = stack()
    np.save(tmp_path / "fm.npy", s)
    assert cli("import", tmp_path / "fm.npy", "--format", "npy", "--out", tmp_path / "a", "-q").returncode == 0
    m = load_manifest(tmp_path / "a")
    assert m.trajectory_steps == [0, 1, 2, 3, 4] and m.trajectory_sigmas == [1.0, 0.75, 0.5, 0.25, 0.0]
    p = read_pairs(tmp_path / "a", [x.name for x in m.shards], 600, traj=True)
    np.testing.assert_array_equal(p["traj"], np.moveaxis(s, 0, 1))
    # x_0 first in the source, times stated in the source's order: both come out ordered from x_T to x_0
    np.save(tmp_path / "rev.npy", s[::-1])
    assert cli("import", tmp_path / "rev.npy", "--format", "npy", "--out", tmp_path / "b", "--times",
               "0,0.2,0.5,0.9,1", "-q").returncode == 0
    m = load_manifest(tmp_path / "b")
    assert m.trajectory_sigmas == [1.0, 0.9, 0.5, 0.2, 0.0]
    np.testing.assert_array_equal(read_pairs(tmp_path / "b", [m.shards[0].name], 600, traj=True)["traj"],
                                  np.moveaxis(s, 0, 1))
    assert cli("import", tmp_path / "fm.npy", "--format", "npy", "--out", tmp_path / "c", "--ends-only",
               "-q").returncode == 0
    assert load_manifest(tmp_path / "c").trajectory_steps is None


def test_kdm_npz_importer_keeps_intermediate_states(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    states = []
    for i in range(40):
        x_T, x_0 = 80 * rng.standard_normal((1, 4, 4)), rng.uniform(-1, 1, (1, 4, 4)).round(1)
        arr = np.stack([x_T, x_T / 2 + x_0 / 2, x_0])
        states.append(arr)
        np.savez(tmp_path / "src" / f"{i}.npz", arr_0=arr)
    assert cli("import", tmp_path / "src", "--format", "kdm-npz", "--out", tmp_path / "o", "--times", "80,40,0",
               "-q", "--x-0-dtype", "float64", "--x-T-dtype", "float64").returncode == 0
    m = load_manifest(tmp_path / "o")
    assert m.trajectory_sigmas == [80, 40, 0]
    np.testing.assert_array_equal(read_pairs(tmp_path / "o", [s.name for s in m.shards], 40, traj=True)["traj"],
                                  np.stack(states))


@pytest.mark.parametrize("args,fragment", [
    (["--times", "1,0.5,0"], "5 states"),                  # one time per state
    (["--times", "1,0.5,0.6,0.2,0"], "strictly"),          # not falling
])
def test_bad_times_exit_2_and_write_nothing(tmp_path, args, fragment):
    np.save(tmp_path / "fm.npy", stack())
    before = tree(tmp_path)
    error_line(cli("import", tmp_path / "fm.npy", "--format", "npy", "--out", tmp_path / "o", *args), 2, fragment)
    assert tree(tmp_path) == before


def test_fractional_powers_of_the_decomposed_operator_compose():
    torch.manual_seed(0)
    k = KoopmanOperator(8, "decomposed")
    z = torch.randn(5, 8, dtype=torch.float64)
    k = k.double()
    assert torch.equal(k.carry(z, 1.0), k(z))                                   # K(1) = K, bit for bit
    lam = lambda t: torch.complex(*k.op.eigen_parts(t))                         # noqa: E731
    torch.testing.assert_close(lam(0.3) * lam(0.45), lam(0.75))                 # Λ^a Λ^b = Λ^(a+b)
    with torch.no_grad():                                                        # P⁻¹ = P's inverse (what the
        P = torch.complex(*(r / r.norm(dim=-1, keepdim=True) for r in (k.op.P_re, k.op.P_im)))  # inverse loss asks)
        inv = torch.linalg.inv(P)
        k.op.P_inv_re.copy_(inv.real)
        k.op.P_inv_im.copy_(inv.imag)
    torch.testing.assert_close(k.carry(z, 0.0), z)                              # K(0) = I
    # The applied real map Re(P Λ^τ P⁻¹) composes exactly when it is the real part of a real operator: real P and
    # eigenvalues (the phases exp(θ) ≈ 0); complex phases have no conjugate partner under fractional powers.
    with torch.no_grad():
        k.op.P_im.zero_()
        k.op.theta.fill_(-30.0)
        inv = torch.linalg.inv(k.op.P_re / k.op.P_re.norm(dim=-1, keepdim=True))
        k.op.P_inv_re.copy_(inv)
        k.op.P_inv_im.zero_()
    torch.testing.assert_close(k.carry(k.carry(z, 0.3), 0.45), k.carry(z, 0.75))
    assert not torch.allclose(k.carry(z, 0.3), k.carry(z, 0.75))


def test_dense_operator_powers_of_one_interval():
    torch.manual_seed(0)
    one, three = KoopmanOperator(6, "affine"), KoopmanOperator(6, "affine", intervals=3)
    three.load_state_dict(one.state_dict())
    z = torch.randn(4, 6)
    assert torch.equal(one.carry(z, 1.0), one(z))
    assert torch.equal(three.carry(z, 2 / 3), three(three(z)))
    assert torch.equal(three.carry(z, 1.0), three(three(three(z))))
    assert torch.equal(three.carry(z, 0.0), z)
    with pytest.raises(ValueError, match="whole number"):
        three.carry(z, 0.5)
    # What analysis plots is the one-step map C³, not the one-interval C.
    linear = KoopmanOperator(6, "linear", intervals=3).double()
    z = z.double()
    torch.testing.assert_close(linear.carry(z, 1.0), z @ linear.matrix().T)
    lam, lam_one = linear.eigenvalues().detach(), torch.linalg.eigvals(linear.op.weight.detach())
    torch.testing.assert_close(torch.sort(lam.abs()).values, torch.sort(lam_one.abs() ** 3).values)
    torch.testing.assert_close(torch.sort(lam.abs()).values,
                               torch.sort(torch.linalg.eigvals(linear.matrix().detach()).abs()).values)


def test_one_step_is_the_old_sampler_when_trajectory_supervision_is_off():
    torch.manual_seed(0)
    model = VectorKDM(StudentConfig(**SMALL).for_data(image=False), 2, 0, 80.0).eval()
    x = 80 * torch.randn(64, 2)
    assert torch.equal(model.sample(x, None, 1), model.decode(model.koopman(model.encode_T(x))))
    with pytest.raises(ValueError, match="trajectory-supervised"):
        model.sample(x, None, 2)


def tcfg(data, out, **kw):
    return TrainConfig.model_validate({"data": data, "out": out, "batch": 200, "log_every": 10, "ckpt_every": 10,
                                       "loader_workers": 1, "shuffle_buffer": 1000, "tensorboard": False,
                                       "student": {**SMALL, "trajectory": {}}, **kw})


def test_trajectory_run_beats_untrained_and_steps_1_is_one_step(traj_pairs, tmp_path):
    run = tmp_path / "r"
    train(tcfg(traj_pairs, run, steps=200, lr=2e-3, ema=0.99, ckpt_every=200), progress=False)
    cfg = json.loads((run / "config.json").read_text())["student"]["trajectory"]
    assert cfg["taus"] == [0, 1 / 3, 2 / 3, 1] and cfg["intervals"] == 3 and cfg["sigmas"][0] == 80
    rows = [json.loads(r) for r in (run / "train.jsonl").read_text().splitlines()]
    assert {"traj_latent", "traj_rec"} <= set(rows[-1]) and rows[-1]["total"] < 0.5 * rows[0]["total"]
    one = evaluate(EvaluateConfig(run=run, num=600))
    model = load_weights(run, one["weights"])[0]
    report = read_pairs(traj_pairs, ["shard-000003.tar"], 500)
    x = torch.as_tensor(report["x_T"][:100])
    assert torch.equal(model.sample(x, None, 1), model(x))                     # S = 1 is the one-step sampler
    assert one["speed"]["student_network_passes"] == 2
    two = evaluate(EvaluateConfig(run=run, num=600, steps=2))
    assert two["speed"]["student_network_passes"] == 4 and (run / "eval-2steps.json").is_file()
    for res in (one, two):
        assert res["student"]["sliced_wasserstein"] < 0.4 * res["untrained"]["sliced_wasserstein"]
        assert res["student"]["mse"] < 0.2 * res["untrained"]["mse"]
    np.testing.assert_array_equal(apply(model, report["x_T"][:100], None, "cpu"),
                                  apply(lambda a, b: model.sample(a, b, 1), report["x_T"][:100], None, "cpu"))
    with pytest.raises(Exception, match="distinct intermediate times"):
        evaluate(EvaluateConfig(run=run, num=600, steps=4))                    # only 2 interior states


UNETS = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def test_image_trajectory_run_beats_untrained_and_steps_1_is_one_step(traj_digits, tmp_path):
    run = tmp_path / "r"                     # 40 steps: the student is far from trained, but far from untrained
    train(tcfg(traj_digits, run, steps=40, batch=16, lr=5e-3, ema=0.9, ckpt_every=40, holdout_shards=1,
               student={**UNETS, "w_adv": 0.0, "distance": "l2", "trajectory": {}}), progress=False)
    cfg = json.loads((run / "config.json").read_text())["student"]["trajectory"]
    assert cfg["taus"] == [0, 1 / 3, 2 / 3, 1] and cfg["intervals"] == 3 and cfg["sigmas"][0] == 80
    row = json.loads((run / "train.jsonl").read_text().splitlines()[-1])
    assert {"traj_latent", "traj_rec"} <= set(row)
    res = evaluate(EvaluateConfig(run=run, num=32))
    assert res["student"]["mse"] < 0.65 * res["untrained"]["mse"]
    assert res["student"]["fd_teacher"] < 0.6 * res["untrained"]["fd_teacher"]
    model = load_weights(run, res["weights"])[0]
    held = read_pairs(traj_digits, ["shard-000002.tar"], 64)
    x = torch.as_tensor(held["x_T"])
    assert torch.equal(model.sample(x, None, 1), model(x))                     # S = 1 is the one-step sampler
    assert torch.equal(model(x), model.decode(model.koopman.carry(model.encode_T(x), 1.0)))
    two = apply(sampler(model, 2), held["x_T"], None, "cpu")                   # decode and re-encode at τ = 1/3
    assert ((two - held["x_0"]) ** 2).mean() < 0.65 * res["untrained"]["mse"]


@pytest.mark.parametrize("data, student, batch, steps", [
    ("traj_pairs", {**SMALL, "operator": "decomposed"}, 200, 30),
    pytest.param("traj_digits", {**UNETS, "w_adv": 1.0}, 32, 3,   # the discriminator's state resumes too
                 marks=pytest.mark.slow),
])
def test_trajectory_run_resumes_bit_exactly(data, student, batch, steps, request, tmp_path):
    data = request.getfixturevalue(data)
    every_term = {"student": {**student, "trajectory": {"w_push": 1.0, "w_onward": 1.0}}, "batch": batch}
    train(tcfg(data, tmp_path / "full", steps=steps, loader_workers=2, **every_term), progress=False)
    train(tcfg(data, tmp_path / "half", steps=steps * 2 // 3, loader_workers=2, **every_term), progress=False)
    train(tcfg(data, tmp_path / "half", steps=steps, loader_workers=2, **every_term), resume=True, progress=False)
    a, b = (torch.load(latest_checkpoint(tmp_path / n), weights_only=True) for n in ("full", "half"))
    assert a["step"] == b["step"] == steps
    row = json.loads((tmp_path / "full" / "train.jsonl").read_text().splitlines()[-1])
    assert {"traj_latent", "traj_rec", "traj_push", "traj_onward"} <= set(row)
    assert all(torch.equal(a[p][k], b[p][k]) for p in a if p in ("model", "ema", "disc") for k in a[p])


@pytest.mark.parametrize("data, student", [("vector_pairs", "hidden: 16, depth: 2, latent_dim: 8"),
                                           ("digit_pairs", "model_channels: 8, channel_mult: [1, 2]")])
def test_trajectory_settings_on_pairs_without_trajectories_exit_2(data, student, request, tmp_path):
    data = request.getfixturevalue(data)
    preset = tmp_path / "t.yaml"
    preset.write_text(f"train:\n  student: {{{student}, trajectory: {{w_rec: 0.5}}}}\n")
    before = tree(data)
    r = cli("train", "--preset", preset, "--data", data, "--out", tmp_path / "run", "--steps", "2")
    error_line(r, 2, "keeps no trajectory states", "--trajectory every-K")
    after = tree(data)
    after.pop(".kdm-verified.json", None)              # the shard-hash cache every train leaves in the pair set
    assert not (tmp_path / "run").exists() and after == {k: v for k, v in before.items() if k != ".kdm-verified.json"}


def test_steps_on_an_endpoint_only_run_exit_2(vector_pairs, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--data", vector_pairs, "--out", run, "--steps", "2", "--batch", "64",
               "--no-tensorboard", "-q").returncode == 0
    before = tree(run)
    error_line(cli("evaluate", run, "--steps", "2"), 2, "--steps 2", "trajectory-supervised")
    error_line(cli("sample", run, "--out", tmp_path / "s", "--steps", "2"), 2, "--steps 2")
    assert tree(run) == before and not (tmp_path / "s").exists()


def test_trajectory_config_is_validated():
    with pytest.raises(ValueError):
        TrajectoryConfig(w_rec=-1)
    assert math.isclose(TrajectoryConfig().w_latent, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("data, student", [
    ("traj_pairs", "hidden: 32, depth: 2, latent_dim: 16"),
    ("traj_digits", "model_channels: 8, channel_mult: [1, 2], dropout: 0, w_adv: 0"),   # dropout differs by rank
])
def test_two_process_ddp_trajectory_run_equals_one_process(data, student, request, tmp_path):
    data = request.getfixturevalue(data)
    preset = tmp_path / "t.yaml"
    preset.write_text(f"train:\n  student: {{{student}, trajectory: {{w_push: 1.0}}}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--data", data, "--batch", "64", "--device", "cpu", "--threads", "1", "--steps", "10",
              "--no-tensorboard", "--quiet", "--preset", preset]
    common = [str(a) for a in common]
    subprocess.run([sys.executable, "-m", "kdm_pipe.cli", "train", "--out", str(tmp_path / "one"),
                    "--loader-workers", "2", *common], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "kdm_pipe.cli", "train", "--out", str(tmp_path / "ddp"), "--loader-workers", "0", *common],
                   check=True, env=env, timeout=300)
    a, b = (torch.load(latest_checkpoint(tmp_path / n), weights_only=True) for n in ("one", "ddp"))
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
