"""Fault injection on the writing side of the data path: generate, verify and stats. Every case checks the exit
code, the one `error:` line and that nothing was left behind or lost; reading a crafted shard must not allocate
what its headers declare."""

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from faults import CLI, ENV, bless, cli, error_line, flip_byte, kdm, left, small_disk, tree
from handmade import pair_set

import kdm_pipe.shards as shards
from kdm_pipe import integrity, storage
from kdm_pipe.errors import DataError
from kdm_pipe.integrity import VERIFIED, check_shards
from kdm_pipe.locks import directory_lock
from kdm_pipe.manifest import MANIFEST, load_manifest, save_manifest
from kdm_pipe.shards import read_shard
from kdm_pipe.stats import STORE, load_stats

REPAIR = "rerun the `kdm-pipe generate` (or import) command"
SAME = ["--shards", "5", "--pairs-per-shard", "1000", "--batch", "500", "-q"]    # as conftest made vector_pairs


def small_set(d: Path, n: int = 3) -> Path:
    """A pair directory written by hand (no Ray): n shards of 20 two-dimensional pairs."""
    return pair_set(d, [[{"x_T": np.full((10, 2), k, np.float32), "x_0": np.ones((10, 2), np.float32),
                          "seed": np.arange(20 * k + b, 20 * k + b + 10)} for b in (0, 10)] for k in range(n)])




def npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def crafted_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def huge_member_shard(path: Path) -> None:
    """A shard whose x_0 member declares 10^12 float64 values (8 TB) in a 10 kB file."""
    ok = {f: shards._npy_bytes(a) for f, a in
          {"x_T": np.zeros((2, 2), np.float32), "seed": np.arange(2)}.items()}
    crafted_tar(path, {"s0.x_T.npy": ok["x_T"], "s0.x_0.npy": npy_header((10**12,)) + b"\0" * 64,
                       "s0.seed.npy": ok["seed"]})


def without(t: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in t.items() if not any(k.startswith(n) for n in names)}


@pytest.fixture
def pairs(vector_pairs, tmp_path):
    """A private copy of conftest's 5 × 1000 checkerboard pairs (real generate output), free to damage."""
    return Path(shutil.copytree(vector_pairs, tmp_path / "pairs"))


# ---- check_shards: the API the trainer calls ------------------------------------------------------------------

def test_check_shards_catches_same_size_change_with_restored_mtime_and_caches(tmp_path, monkeypatch):
    d = small_set(tmp_path / "d")
    m = load_manifest(d)
    hashed = []
    real = storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert check_shards(d, m) == {} and len(hashed) == 3 and (d / VERIFIED).is_file()
    assert check_shards(d, m) == {} and len(hashed) == 3                 # unchanged: nothing re-hashed
    flip_byte(d / "shard-000001.tar", 700)
    problems = check_shards(d, m)
    assert list(problems) == ["shard-000001.tar"] and "sha256" in problems["shard-000001.tar"]
    assert hashed[3:] == ["shard-000001.tar"]
    assert check_shards(d, m, names=["shard-000002.tar"]) == {}           # a subset, cached
    assert "not a complete shard" in check_shards(d, m, names=["shard-000009.tar"])["shard-000009.tar"]
    (d / "shard-000002.tar").unlink()
    assert check_shards(d, m, names=["shard-000002.tar"]) == {"shard-000002.tar": "missing"}
    err = integrity.bad_shards_error(d, problems)
    assert isinstance(err, DataError) and "shard-000001.tar" in str(err) and REPAIR in str(err)
    assert "\n" not in str(err)


def test_check_shards_without_a_writable_cache(tmp_path):
    d = small_set(tmp_path / "d")
    (d / VERIFIED).mkdir()                              # the cache cannot be written (as in a read-only directory)
    before = tree(d)
    assert check_shards(d, load_manifest(d)) == {}
    flip_byte(d / "shard-000000.tar", 700)
    assert list(check_shards(d, load_manifest(d))) == ["shard-000000.tar"]
    assert without(tree(d), "shard-000000") == without(before, "shard-000000")    # no temp file left behind


# ---- read_shard: structural errors are one DataError line, memory bounded ----------------------------------

def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:1500])


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(4096))


def _pickled(p: Path) -> None:
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    crafted_tar(p, {"s0.x_T.npy": obj.getvalue(), "s0.x_0.npy": obj.getvalue(), "s0.seed.npy": obj.getvalue()})


def _missing_field(p: Path) -> None:
    crafted_tar(p, {"s0.x_T.npy": shards._npy_bytes(np.zeros((2, 2)))})


@pytest.mark.parametrize("damage, what", [(_truncated, "truncated"), (_garbage, "unreadable"),
                                          (huge_member_shard, "1000000000000"), (_pickled, "object"),
                                          (_missing_field, "lacks x_0")])
def test_read_shard_structural_errors(tmp_path, damage, what):
    d = small_set(tmp_path / "d", n=1)
    path = d / "shard-000000.tar"
    damage(path)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            list(read_shard(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(path) in msg and REPAIR in msg and what in msg and "\n" not in msg
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB for a {path.stat().st_size} byte shard"


# ---- verify: bounded memory for crafted members and huge plans ------------------------------------------------

def test_verify_huge_member_reports_it_without_allocating(tmp_path):
    d = small_set(tmp_path / "d")
    huge_member_shard(d / "shard-000001.tar")
    bless(d)
    before = tree(d)
    tracemalloc.start()
    try:
        r = cli("verify", d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    error_line(r, 1, "1 problem", str(d), "rerun")
    assert "BAD" in r.stderr and "shard-000001.tar" in r.stderr and "1000000000000" in r.stderr
    assert peak < 50 * 2**20 and tree(d) == before


def test_verify_a_plan_of_10_to_the_12_shards_is_compact(tmp_path):
    d = small_set(tmp_path / "d")
    m = load_manifest(d)
    m.num_shards = 10**12
    save_manifest(d, m)
    t = time.perf_counter()
    r = cli("verify", d)
    assert time.perf_counter() - t < 10
    error_line(r, 1, "1 problem")
    assert len(r.stderr.strip().splitlines()) == 2 and "999999999997 shards not generated yet" in r.stderr


# ---- generate: refusals before anything is written -----------------------------------------------------------

@pytest.mark.parametrize("args, code, fragments", [
    (["--sigma-min", "100", "--sigma-max", "1"], 2, ["sigma_min", "below sigma_max"]),
    (["--sigma-max", "inf"], 2, ["sigma_max", "finite"]),
    (["--steps", "1000000"], 2, ["steps"]),
    (["--shards", str(10**12), "--pairs-per-shard", "1000"], 2, ["free", "bytes"]),
    (["--shards", str(10**12), "--pairs-per-shard", str(10**11)], 2, ["2^63"]),
    (["--shards", "2", "--pairs-per-shard", str(10**10)], 2, ["limit", "--pairs-per-shard"]),
    (["--batch", str(10**8), "--pairs-per-shard", str(10**8)], 2, ["--batch"]),
])
def test_generate_refuses_before_writing(tmp_path, args, code, fragments):
    tracemalloc.start()
    try:
        r = cli("generate", "--out", tmp_path / "out", "-q", *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    error_line(r, code, *fragments)
    assert not (tmp_path / "out").exists() and peak < 100 * 2**20


def test_generate_out_is_a_file_and_empty_preset(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    error_line(cli("generate", "--out", f, "-q"), 2, "not a directory")
    assert f.read_text() == "keep me"
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    error_line(cli("generate", "--preset", tmp_path / "empty.yaml", "--out", tmp_path / "o", "-q"), 2, "empty")
    assert not (tmp_path / "o").exists()


def test_generate_into_a_directory_of_unrelated_files_is_refused(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not pairs")
    (out / "notes").mkdir()
    before = tree(out)
    error_line(cli("generate", "--out", out, "--shards", "1", "--pairs-per-shard", "8", "-q"), 2,
               "not empty and not a pair set", "holiday.jpg", "choose an empty")
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == ["holiday.jpg", "notes"]


def test_second_generate_is_refused_and_leaves_the_first_runs_files(pairs):
    tmp = pairs / ".shard-000003.tar.tmp-0123456789abcdef"       # the first run's shard in flight
    tmp.write_bytes(b"half a shard")
    with directory_lock(pairs, "generate --out first"):
        before = tree(pairs)
        r = cli("generate", "--out", pairs, *SAME)
        error_line(r, 2, "in use by", "generate --out first", f"pid {os.getpid()}")
        assert tree(pairs) == before
        r = cli("stats", pairs, "-q")
        error_line(r, 2, "in use by")
        assert tree(pairs) == before and not (pairs / STORE).exists()


def test_garbage_manifest_has_a_way_out_that_keeps_the_shards(pairs):
    (pairs / MANIFEST).write_text("{garbage")
    shard_files = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in pairs.glob("shard-*.tar")}
    before = tree(pairs)
    line = error_line(cli("generate", "--out", pairs, *SAME), 2, "not a valid kdm-pipe manifest", "mv")
    assert tree(pairs) == before and "generate.jsonl" in line
    (pairs / MANIFEST).rename(pairs / "manifest.json.bad")               # what the message says to do
    r = cli("generate", "--out", pairs, *SAME)
    assert r.returncode == 0, r.stderr
    assert "rebuilt the manifest with 5 complete shards" in r.stderr and "all 5 shards complete" in r.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in pairs.glob("shard-*.tar")} == shard_files
    assert integrity.verify(pairs) == {}


# ---- stats: checked first, all or nothing ---------------------------------------------------------------------

def test_stats_catches_same_size_corruption_on_rerun(tmp_path):
    pairs = small_set(tmp_path / "pairs")
    # Set up in-process; commands that start Ray are tested in a subprocess (`kdm`): Ray's logger would keep the
    # stream of the first in-process CLI invocation, which the CLI runner closes.
    from kdm_pipe.config import StatsConfig
    from stages import stats
    stats.run(StatsConfig(data=pairs, workers=1), progress=False)
    assert "up to date" in cli("stats", pairs, "-q").stdout                 # no Ray needed: nothing to compute
    before = load_stats(pairs)
    flip_byte(pairs / "shard-000002.tar", 700)
    snapshot = tree(pairs)
    r = cli("stats", pairs, "-q")
    error_line(r, 1, "shard-000002.tar", "sha256", REPAIR)
    assert without(tree(pairs), VERIFIED) == without(snapshot, VERIFIED)      # the store untouched
    np.testing.assert_array_equal(load_stats(pairs)["x_0"]["mean"], before["x_0"]["mean"])


@pytest.mark.slow
def test_stats_on_a_crafted_shard_writes_no_store(tmp_path):
    pairs = small_set(tmp_path / "pairs")
    huge_member_shard(pairs / "shard-000001.tar")
    bless(pairs)
    before = tree(pairs)
    r = kdm("stats", pairs, "-q", "--workers", "1", timeout=120)
    error_line(r, 1, "shard-000001.tar", "1000000000000", REPAIR)
    assert not (pairs / STORE).exists() and not list(pairs.glob(f".{STORE}*"))
    assert without(tree(pairs), VERIFIED) == without(before, VERIFIED)


@pytest.mark.parametrize("command", ["stats", "generate"])
def test_unwritable_directory(tmp_path, command):
    """stats into / generate under a directory we cannot write: exit 2 before anything is written. Root writes
    through permissions, so as root the directory is made read-only by a bind mount private to the command."""
    pairs = small_set(tmp_path / "pairs")
    before = tree(pairs)
    args = ["stats", str(pairs)] if command == "stats" else ["generate", "--out", str(pairs / "new"), "--shards", "1"]
    cmd = CLI + args + ["-q"]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare: cannot make a directory unwritable")
        d = shlex.quote(str(pairs))
        cmd = ["unshare", "-m", "sh", "-c", f"mount --make-rprivate / && mount --bind {d} {d} && "
               f"mount -o remount,ro,bind {d} && exec {shlex.join(cmd)}"]
    else:
        os.chmod(pairs, 0o555)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    finally:
        os.chmod(pairs, 0o755)
    if os.geteuid() == 0 and "mount" in r.stderr and "error:" not in r.stderr:
        pytest.skip(f"no private read-only mount here: {r.stderr.strip()}")
    error_line(r, 2, "cannot write", str(pairs))
    assert tree(pairs) == before and not (pairs / "new").exists()


# ---- signals ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_generate_exits_143_clean_and_resumable(tmp_path):
    out = tmp_path / "k"
    args = ["generate", "--out", str(out), "--shards", "4", "--pairs-per-shard", "2000", "--batch", "500",
            "--workers", "1", "-q"]
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120                       # a shard is recorded once the driver has its result: wait
    while time.time() < deadline and not (out.joinpath("manifest.json").exists() and load_manifest(out).shards):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    r = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    error_line(r, 143, "SIGTERM", "rerun the same command")
    assert "SIGTERM received" not in stderr and "*** " not in stderr        # no C++ failure-handler dump
    assert not list(out.glob(".*tmp*")) and not (out / ".kdm-pipe.lock").exists()
    m = load_manifest(out)                                             # consistent: what it lists is whole
    assert 1 <= len(m.shards) < 4 and all(integrity.check_shard(out / s.name, s) is None for s in m.shards)
    r = kdm(*args)
    assert r.returncode == 0, r.stderr
    assert integrity.verify(out) == {} and len(load_manifest(out).shards) == 4


def test_a_signal_python_drops_during_ray_init_still_stops_the_session(monkeypatch):
    """ray.init forks while Ray's handler (sys.exit(15)) is installed; a SIGTERM landing in an at-fork hook raises
    there, Python prints "Exception ignored" and goes on. Made deterministic: a handler's exception raised inside a
    __del__ is dropped the same way; the session must still end in Terminated, with Ray shut down and nothing
    printed about the dropped exception."""
    import ray

    from kdm_pipe import raypool
    from kdm_pipe.interrupts import Terminated

    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):              # the handler runs (and its SystemExit is dropped) in here
                pass

    def init(*_):
        signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(signum))     # what ray.init installs
        Dropped()                                                              # the signal lands in a __del__

    printed: list = []                                                         # what Python would print
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    monkeypatch.setattr(raypool, "_init", init)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as stopped:
        with raypool.ray_session(None, 1):
            pytest.fail("the body ran although SIGTERM arrived during init")
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is before and not ray.is_initialized()
    assert printed == []


def test_a_full_disk_inside_a_ray_task_is_one_line(tmp_path):
    """The disk fills up after the free-space check (here: a tmpfs out of inodes, so the check on bytes passes): the
    ENOSPC inside a Ray task comes out as one line with where and how much, not Ray's traceback."""
    disk = tmp_path / "disk"
    r = small_disk(disk, "size=4m,nr_inodes=6", *CLI, "generate", "--out", disk / "p", "--shards", "3",
                   "--pairs-per-shard", "500", "--workers", "1", "-q")
    line = error_line(r, 1, f"disk full at {disk / 'p'}:", "need ~", "MB free")
    assert "ray::" not in r.stderr and "Unhandled error" not in r.stderr, r.stderr
    assert not [f for f in left(r) if ".tmp" in f], left(r)             # no temp file left behind
    assert {"./p/manifest.json", "./p/shard-000000.tar"} <= set(left(r)), line   # the shards made so far are kept


def test_diffusers_folders_refused_with_one_line(tmp_path):
    from diffusers_fixture import save_model

    ok = save_model(tmp_path / "ok", "vp")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "scheduler_config.json"):
        (bad / f).write_bytes((ok / f).read_bytes())
    (bad / "diffusion_pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    out = tmp_path / "pairs"
    cases = [(tmp_path / "missing", "not a directory"), (bad, "never unpickled")]
    for folder, fragment in cases:
        error_line(cli("generate", "--teacher", "diffusers", "--checkpoint", folder, "--out", out, "-q"), 2,
                   "diffusers model", fragment)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    error_line(cli("generate", "--teacher", "diffusers", "--checkpoint", bad, "--out", out, "-q"), 2,
               "cannot load diffusers model")
    cfg = json.loads((ok / "scheduler_config.json").read_text())
    (ok / "scheduler_config.json").write_text(json.dumps({**cfg, "_class_name": "ScoreSdeVeScheduler"}))
    error_line(cli("generate", "--teacher", "diffusers", "--checkpoint", ok, "--out", out, "-q"), 2,
               "ScoreSdeVeScheduler", "not supported")
    (ok / "scheduler_config.json").write_text(json.dumps({**cfg, "beta_schedule": "bogus"}))
    error_line(cli("generate", "--teacher", "diffusers", "--checkpoint", ok, "--out", out, "-q"), 2,
               "scheduler config is not valid")
    (ok / "scheduler_config.json").unlink()
    error_line(cli("generate", "--teacher", "diffusers", "--checkpoint", ok, "--out", out, "-q"), 2,
               "scheduler_config.json is missing")
    (ok / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    error_line(cli("generate", "--teacher", "diffusers", "--checkpoint", ok, "--out", out, "-q"), 2,
               "UNet2DConditionModel")
    assert tree(out) == {}


def test_latent_folders_refused_with_one_line(tmp_path):
    from diffusers_fixture import save_dit_pipeline, save_latent_pipeline, save_model

    from kdm_pipe.generation import _TEACHERS

    out = tmp_path / "pairs"
    gen = lambda folder, *more: cli("generate", "--teacher", "diffusers", "--checkpoint", folder,  # noqa: E731
                                    "--out", out, "-q", *more)
    root = save_latent_pipeline(tmp_path / "pipe")
    vae = root / "vae"
    weights = vae / "diffusion_pytorch_model.safetensors"
    weights.rename(vae / "diffusion_pytorch_model.bin")
    error_line(gen(root), 2, "diffusers VAE", "never unpickled")
    (vae / "diffusion_pytorch_model.bin").rename(weights)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "_class_name": "VQModel"}))
    error_line(gen(root), 2, "VQModel", "AutoencoderKL")
    (vae / "config.json").write_text(json.dumps({**config, "latents_mean": [0, 0, 0, 0]}))
    error_line(gen(root), 2, "latents_mean", "not supported")
    (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": -1}))
    error_line(gen(root), 2, "scaling_factor", "positive")
    (vae / "config.json").write_text(json.dumps({**config, "latent_channels": 3}))
    error_line(gen(root), 2, "3-channel latents", "takes 4 channels")
    (vae / "config.json").write_text(json.dumps(config))
    error_line(gen(root, "--vae", tmp_path / "nowhere"), 2, "--vae", "not a directory")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderTiny"]}))
    error_line(gen(root), 2, "AutoencoderTiny")
    (root / "model_index.json").write_text(json.dumps(index))
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")     # safetensors that do not load
    error_line(gen(root), 2, "cannot load VAE")
    shutil.rmtree(vae)
    _TEACHERS.clear()              # as a new process: the teacher checks its folder again (cached in this one)
    error_line(gen(root), 2, "diffusers VAE", "not a directory")
    error_line(gen(save_model(tmp_path / "unet", "vp", classes=3), "--guidance", "2"), 2, "null class", "DiT")
    dit = save_dit_pipeline(tmp_path / "dit") / "transformer"
    config = json.loads((dit / "config.json").read_text())
    (dit / "config.json").write_text(json.dumps({**config, "out_channels": 5}))
    error_line(gen(dit.parent), 2, "5 output channels", "learned variance")
    (dit / "config.json").write_text(json.dumps({**config, "norm_type": "ada_norm_single"}))
    error_line(gen(dit.parent), 2, "not a class-conditional DiT")
    (dit / "config.json").write_text(json.dumps({**config, "sample_size": 9}))
    error_line(gen(dit.parent), 2, "not a multiple of patch_size")
    assert tree(out) == {}
