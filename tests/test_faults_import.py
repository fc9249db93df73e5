"""Fault injection for `import`, `teacher train` and `stats ref` (issue 10): each case runs the CLI and asserts the
exit code, a single one-line message naming what, where and how to fix, and that nothing was left behind (or, for
an existing import, lost). Signals and the directory lock need real processes (`kdm`, with a timeout); the other
cases run the same CLI entry point (its `user_errors` boundary included) in this process, since a fresh interpreter
costs 5–10 s of imports on a busy 2-core machine."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from faults import CLI, ENV, error_line, kdm, tree
from typer.testing import CliRunner

from kdm_pipe.cli import app


def cli(*args):
    """`kdm-pipe ARGS` in this process: exit code and stderr as `kdm` returns them."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def pairs(n=400, d=64, seed=0):
    """EDM-like pairs: x_T = 80·z, x_0 uniform in [−1, 1]."""
    rng = np.random.default_rng(seed)
    return 80 * rng.standard_normal((n, d)), rng.uniform(-1, 1, (n, d))


def save(folder: Path, **arrays) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)
    return {name: folder / f"{name}.npy" for name in arrays}


def npy_header(shape, descr="<f8") -> bytes:
    """A version 1.0 .npy header declaring `shape` (the data after it is whatever the caller appends)."""
    text = ("{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))).encode()
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def npy_import(src: dict[str, Path], out: Path, *extra, run=cli):
    return run("import", "--format", "npy", "--x-T", src["xT"], "--x-0", src["x0"], "--out", out, "-q", *extra)


# ---- all or nothing -------------------------------------------------------------------------------------------

def test_non_finite_late_in_source_leaves_nothing_and_the_fixed_source_imports(tmp_path):
    x_T, x_0 = pairs(n=2000)
    bad = x_0.copy()
    bad[1500, 7] = np.nan                       # past the orientation check's 1024 pairs: found while writing
    src = save(tmp_path / "src", xT=x_T, x0=bad)
    out = tmp_path / "new" / "out"              # two levels created by the run: both removed again
    error_line(npy_import(src, out, "--pairs-per-shard", "500", run=kdm), 2, "x0.npy", "non-finite x_0", "pair 1500",
               "fix or drop")
    assert not (tmp_path / "new").exists()

    save(tmp_path / "src", x0=x_0)              # fixed: the rerun is not refused as "another import"
    ok = npy_import(src, out, "--pairs-per-shard", "500")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("shard-")) == [f"shard-{k:06d}.tar"
                                                                                   for k in range(4)]


def test_existing_import_untouched_by_a_failing_run(tmp_path):
    x_T, x_0 = pairs(n=2000)
    src = save(tmp_path / "src", xT=x_T, x0=x_0)
    out = tmp_path / "out"
    assert npy_import(src, out, "--pairs-per-shard", "500").returncode == 0
    before = tree(out)
    bad = x_0.copy()
    bad[1999, 0] = np.inf
    other = save(tmp_path / "other", xT=x_T, x0=bad)
    error_line(npy_import(other, out, "--pairs-per-shard", "500"), 2, str(out), "another import", "another --out")
    error_line(npy_import(other, tmp_path / "out2"), 2, "non-finite x_0", "pair 1999")
    assert tree(out) == before and not (tmp_path / "out2").exists()


def write_npz_folder(folder: Path, x_T, x_0):
    folder.mkdir()
    for i in range(len(x_0)):
        np.savez(folder / f"{i}.npz", arr_0=np.stack([x_0[i], x_T[i]]))       # FFHQ layout [x_0, x_T]


def test_failed_repair_restores_the_import_it_found(tmp_path):
    """kdm-npz sets are fingerprinted by names and sizes: a same-size change passes as the same import, and the
    repair of a lost shard then meets NaN. The directory is left exactly as found, ready for the next rerun."""
    x_T, x_0 = pairs(n=120, d=1024)                # the orientation check reads the first 64 pairs
    write_npz_folder(tmp_path / "src", x_T, x_0)
    out = tmp_path / "out"
    args = ("import", tmp_path / "src", "--format", "kdm-npz", "--out", out, "--pairs-per-shard", "30", "-q")
    assert cli(*args).returncode == 0
    (out / "shard-000002.tar").write_bytes(b"corrupt")     # pairs 60..89: rebuilt first
    (out / "shard-000003.tar").unlink()                     # lost: pairs 90..119
    x_0[105, 3] = np.nan
    np.savez(tmp_path / "src" / "105.npz", arr_0=np.stack([x_0[105], x_T[105]]))
    before = tree(out)
    error_line(cli(*args), 2, "105.npz", "non-finite x_0", "fix or drop")
    after = tree(out)
    assert after == {k: v for k, v in before.items() if k != "shard-000002.tar"}   # the corrupt one: removed
    x_0[105, 3] = 0.5
    np.savez(tmp_path / "src" / "105.npz", arr_0=np.stack([x_0[105], x_T[105]]))
    assert cli(*args).returncode == 0
    assert cli("verify", out).returncode == 0


def wait_for(predicate, proc, timeout=60):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_lock_and_sigterm(tmp_path):
    """A slow import (one fsynced shard per 2 pairs) holds --out: a second one exits 2 naming it; SIGTERM then
    ends the first with 143, and everything it wrote, --out included, is gone."""
    x_T, x_0 = pairs(n=20000, d=16)            # 10,000 shards: minutes of work, stopped after the first few
    src = save(tmp_path / "src", xT=x_T, x0=x_0)
    out = tmp_path / "out"
    first = subprocess.Popen(CLI + ["import", "--format", "npy", "--x-T", str(src["xT"]), "--x-0", str(src["x0"]),
                                    "--out", str(out), "--pairs-per-shard", "2", "-q"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(out.glob("shard-*.tar"))) >= 2, first)
        second = npy_import(src, out, "--pairs-per-shard", "2")
        error_line(second, 2, str(out), "in use by", "kdm-pipe import", f"pid {first.pid}")
        assert first.poll() is None and len(list(out.glob("shard-*.tar"))) >= 2     # the refused run removed nothing
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [
        f"error: import stopped by SIGTERM; removed what it had written into {out}"], err
    assert not out.exists()


def test_unwritable_out(tmp_path):
    x_T, x_0 = pairs()
    src = save(tmp_path / "src", xT=x_T, x0=x_0)
    (tmp_path / "file").write_text("x")
    error_line(npy_import(src, tmp_path / "file"), 2, "--out", "is a file")
    error_line(npy_import(src, tmp_path / "file" / "sub"), 2, "--out", "cannot write there", "writable directory")
    if os.geteuid() == 0:                       # root ignores file modes; sysfs refuses mkdir to everyone
        ro = Path("/sys/kdm-pipe-import-test")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ro = tmp_path / "ro" / "out"
    error_line(npy_import(src, ro), 2, str(ro), "cannot write there", "writable directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "src"] + (["ro"] if os.geteuid() else [])


def test_not_enough_free_disk_is_refused_with_both_numbers(tmp_path):
    """Sparse source files (no disk used) of more pairs than the free space could hold once written."""
    free = __import__("shutil").disk_usage(tmp_path).free
    d = 1024
    n = int(free * 1.5 / (8 * d)) + 1           # float32 x_T + x_0: 8 bytes per value pair
    x_T, x_0 = pairs(n=64, d=d)                 # the orientation check reads the first 64 rows
    (tmp_path / "src").mkdir()
    for name, a in (("xT", x_T), ("x0", x_0)):
        with open(tmp_path / "src" / f"{name}.npy", "wb") as f:
            f.write(npy_header((n, d)))
            f.write(a.tobytes())
            f.truncate(f.tell() + (n - 64) * d * 8)
    src = {k: tmp_path / "src" / f"{k}.npy" for k in ("xT", "x0")}
    line = error_line(npy_import(src, tmp_path / "out"), 2, "needs about", "are free", str(tmp_path / "out"),
                      f"{n:,} pairs", "float16")
    assert " TB " in line or " GB " in line
    assert not (tmp_path / "out").exists()


# ---- sizes checked before reading ------------------------------------------------------------------------------

def zip_with(path: Path, members: dict[str, bytes], compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for name, data in members.items():
            z.writestr(name, data)


def record_size(path: Path, size: int):
    """Make the zip directory claim `size` uncompressed bytes for the last member (a bomb's claim, for free)."""
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 24:central + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_npz_zip_bombs_refused_before_inflating(tmp_path):
    x_T, x_0 = pairs(n=40, d=48)
    src = tmp_path / "src"
    write_npz_folder(src, x_T, x_0)
    out = tmp_path / "out"

    def run():
        return cli("import", src, "--format", "kdm-npz", "--out", out, "-q")

    # A member whose zip directory records 2.8 GB uncompressed (patched: nothing of that size exists anywhere).
    bomb = src / "0.npz"
    zip_with(bomb, {"arr_0.npy": npy_header((2, 48)) + np.stack([x_0[0], x_T[0]]).tobytes()})
    record_size(bomb, 2_800_000_000)
    error_line(run(), 2, "0.npz", "arr_0.npy", "2.8 GB once inflated", "over the", "limit")

    # A header declaring a huge shape in a small member.
    zip_with(bomb, {"arr_0.npy": npy_header((2, 10**9)) + b"\0" * 64})
    error_line(run(), 2, "0.npz", "shape (2, 1000000000)", "16 GB", "truncated, corrupt or crafted")

    # A genuine deflate bomb after a good first file: 25 MB of zeros in a ~25 KB file, refused because it is far
    # larger than the first pair file (a cap derived from the set itself, not a global one).
    np.savez(bomb, arr_0=np.stack([x_0[0], x_T[0]]))
    zip_with(src / "7.npz", {"arr_0.npy": npy_header((65536, 48)) + bytes(65536 * 48 * 8)}, zipfile.ZIP_DEFLATED)
    assert (src / "7.npz").stat().st_size < 100_000
    error_line(run(), 2, "7.npz", "more than twice 0.npz", "remove it")

    # A member header of negative size, object (pickled) arrays.
    zip_with(src / "7.npz", {"arr_0.npy": npy_header((-2, 48)) + b"\0" * 64})
    error_line(run(), 2, "7.npz", "negative size")
    zip_with(src / "7.npz", {"arr_0.npy": npy_header((2,), "|O") + b"\x80\x04N."})
    error_line(run(), 2, "7.npz", "Python objects", "never unpickles")
    assert not out.exists()


@pytest.mark.parametrize("case, fragments", [
    ("negative", ("neg.npy", "(-5, 64)", "negative size")),
    ("huge", ("huge.npy", "(1000000000000, 64)", "512 TB", "truncated, corrupt or crafted")),
    ("object", ("obj.npy", "Python objects", "never unpickles")),
    ("pickle", ("pickle.npy", "not an .npy array", "Python pickle")),
    ("npz", ("x0.npz", "--x-0", ".npz archive", "--format kdm-npz")),
    ("mismatch", ("--x-T", "--x-0", "differ in numbers of pairs")),
    ("empty", ("nothing to import",)),
])
def test_bad_npy_inputs(tmp_path, case, fragments):
    x_T, x_0 = pairs()
    src = save(tmp_path / "src", xT=x_T, x0=x_0)
    bad = tmp_path / "src" / {"negative": "neg.npy", "huge": "huge.npy", "object": "obj.npy",
                              "pickle": "pickle.npy", "npz": "x0.npz"}.get(case, "x0.npy")
    if case == "negative":
        bad.write_bytes(npy_header((-5, 64)) + b"\0" * 64)
    elif case == "huge":
        bad.write_bytes(npy_header((10**12, 64)) + b"\0" * 64)
    elif case == "object":
        np.save(bad, np.array([1, "a", None], dtype=object), allow_pickle=True)
    elif case == "pickle":
        bad.write_bytes(__import__("pickle").dumps(x_0))
    elif case == "npz":
        np.savez(bad, x_0=x_0)
    elif case == "mismatch":
        np.save(bad, x_0[:300])
    elif case == "empty":
        save(tmp_path / "src", xT=x_T[:0], x0=x_0[:0])
    error_line(npy_import({"xT": src["xT"], "x0": bad}, tmp_path / "out"), 2, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels, extra, fragments", [
    (np.array(3), (), ("--labels", "shape ()", "(400,) int classes")),
    (np.full(400, 10**9), (), ("class label 1000000000", "1,000,000,001-wide one-hot", "limit 65,536")),
    (np.full(400, 12), ("--label-dim", "10"), ("class label 12", "outside 0..9", "--label-dim")),
    (np.zeros(300, dtype=np.int64), (), ("--labels", "shape (300,)", "one per pair")),
    (np.full(400, 0.5), (), ("dtype float64", "integers")),
])
def test_bad_labels(tmp_path, labels, extra, fragments):
    x_T, x_0 = pairs()
    src = save(tmp_path / "src", xT=x_T, x0=x_0, y=labels)
    error_line(npy_import(src, tmp_path / "out", "--labels", src["y"], *extra), 2, *fragments)
    assert not (tmp_path / "out").exists()


# ---- teacher train / stats ref readers -------------------------------------------------------------------------

@pytest.mark.parametrize("case, fragments", [
    ("object", ("Python objects", "never unpickles")),
    ("pickle", ("not an .npy array", "Python pickle")),
    ("huge", ("(1000000, 3, 1000, 1000)", "truncated, corrupt or crafted")),
    ("negative", ("negative size",)),
    ("shape", ("(N, H, W[, C])",)),
    ("nan", ("non-finite",)),
])
@pytest.mark.parametrize("command", ["teacher", "stats-ref"])
def test_bad_image_arrays(tmp_path, command, case, fragments):
    bad = tmp_path / "data.npy"
    if case == "object":
        np.save(bad, np.array([1, "a", None], dtype=object), allow_pickle=True)
    elif case == "pickle":
        bad.write_bytes(__import__("pickle").dumps(np.zeros((2, 8, 8), np.uint8)))
    elif case == "huge":
        bad.write_bytes(npy_header((10**6, 3, 1000, 1000), "|u1") + b"\0" * 64)
    elif case == "negative":
        bad.write_bytes(npy_header((-4, 8, 8), "|u1") + b"\0" * 64)
    elif case == "shape":
        np.save(bad, np.zeros((2, 3, 4, 5, 6), np.float32))
    elif case == "nan":
        np.save(bad, np.full((2, 1, 8, 8), np.nan, np.float32))
    if command == "teacher":
        proc = cli("teacher", "train", "--data", bad, "--out", tmp_path / "run", "--steps", "1", "-q")
    else:
        proc = cli("stats", "ref", bad, "--out", tmp_path / "ref.npz")
    error_line(proc, 2, "data.npy", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy"]


def test_bad_get_files(tmp_path):
    import pickle

    import torch
    src = tmp_path / "get"
    for d in ("latent", "image"):
        (src / d).mkdir(parents=True)
    torch.save(torch.rand(5, 2), src / "image" / "0.pkl")
    (src / "latent" / "0.pkl").write_bytes(pickle.dumps(os.system))         # code, not tensors
    error_line(cli("import", src, "--format", "get", "--out", tmp_path / "out", "-q"), 2, "latent/0.pkl",
               "never unpickles", "torch.save")
    torch.save(torch.randn(5), src / "latent" / "0.pkl")                    # no pair dimension
    error_line(cli("import", src, "--format", "get", "--out", tmp_path / "out", "-q"), 2, "latent/0.pkl",
               "(N, ...) tensors")
    error_line(cli("import", src / "latent" / "0.pkl", "--format", "get", "--out", tmp_path / "out", "-q"), 2,
               "is a file", "takes a folder")
    assert not (tmp_path / "out").exists()


def png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case, fragments", [
    ("corrupt", ("data.zip/b.png", "not a readable image", "re-encode")),
    ("huge-member", ("data.zip/b.png", "over the 67.1 MB limit", "remove it")),
    ("labels", ("dataset.json", "class 1000000000 for b.png", "65,536")),
    ("json", ("dataset.json", "labels", "fix or remove")),
    ("out-file", ("--out", "is a file")),
])
def test_bad_image_zip_and_teacher_out(tmp_path, case, fragments):
    a = png(np.zeros((8, 8), np.uint8))
    members = {"a.png": a, "b.png": b"\x89PNG garbage" if case == "corrupt" else a}
    if case == "labels":
        members["dataset.json"] = b'{"labels": [["a.png", 0], ["b.png", 1000000000]]}'
    if case == "json":
        members["dataset.json"] = b'{"labels": 7}'
    zip_with(tmp_path / "data.zip", members)
    if case == "huge-member":
        record_size(tmp_path / "data.zip", 3_000_000_000)
    out = tmp_path / "run"
    if case == "out-file":
        out.write_text("x")
    error_line(cli("teacher", "train", "--data", tmp_path / "data.zip", "--out", out, "--steps", "1", "-q"), 2,
               *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip"] + (["run"] if case == "out-file" else [])
