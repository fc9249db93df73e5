"""The exit codes the documentation promises, read from the documentation itself: each case names the sentence of
README.md or stages/README.md that states its code, provokes it, and checks that code, the one `error:` line and
that nothing was written or left behind. A sentence edited to another code, or code that drifts from it, fails."""

import re
from pathlib import Path

import pytest
from faults import cli, error_line, flip_byte, tree
from handmade import random_pair_set

from kdm_pipe.integrity import VERIFIED
from kdm_pipe.locks import LOCK

ROOT = Path(__file__).resolve().parent.parent


def documented(doc: str, phrase: str) -> int:
    """The exit code stated after `phrase` in its sentence (`exit N`, `exit code N`, `exits N`)."""
    text = " ".join((ROOT / doc).read_text().split())              # sentences wrap across lines
    at = text.index(phrase)
    end = min(i for i in (text.find(". ", at), text.find("|", at), len(text)) if i >= 0)
    code = re.search(r"exits? (?:code )?(\d+)", text[at:end])
    assert code, f"{doc}: {text[at:end]!r} states no exit code"
    return int(code[1])


def files(directory: Path) -> dict[str, str]:
    return {k: v for k, v in tree(directory).items() if Path(k).name not in (LOCK, VERIFIED)}


def test_contract_paragraph_states_two_and_one():
    assert documented("README.md", "Bad input anywhere") == 2
    assert documented("README.md", "Corrupt data met at run time") == 1
    assert documented("stages/README.md", "a shard missing or changed since stops the command") == 1
    assert documented("stages/README.md", "missing or unreadable: exit") == 2


def test_stats_on_a_changed_shard(tmp_path):
    d = random_pair_set(tmp_path / "p", (2,))
    flip_byte(d / "shard-000000.tar", 900)
    before = files(d)
    code = documented("stages/README.md", "a shard missing or changed since stops the command")
    error_line(cli("stats", d, "-q"), code, "shard-000000.tar", "sha256", "rerun")
    assert files(d) == before


def test_stats_on_a_missing_shard(tmp_path):
    d = random_pair_set(tmp_path / "p", (2,))
    (d / "shard-000000.tar").unlink()
    code = documented("stages/README.md", "a shard missing or changed since stops the command")
    error_line(cli("stats", d, "-q"), code, "shard-000000.tar", "missing")
    assert not (d / "stats.zarr").exists()


def test_stats_without_a_manifest(tmp_path):
    (tmp_path / "p").mkdir()
    error_line(cli("stats", tmp_path / "p", "-q"), documented("stages/README.md", "missing or unreadable: exit"),
               "manifest.json")
    assert files(tmp_path / "p") == {}


@pytest.mark.parametrize("args, fragments", [
    (["--out", "{t}/dir"], ["is a directory"]),
    (["--num", "-1", "--out", "{t}/r.npz"], ["num"]),
    (["--num", "0", "--out", "{t}/r.npz"], ["num"]),
])
def test_stats_ref_bad_input(tmp_path, args, fragments):
    (tmp_path / "dir").mkdir()
    code = documented("stages/README.md", "is a directory or a `--num` below 1")
    error_line(cli("stats", "ref", "sklearn-digits", *[a.format(t=tmp_path) for a in args]), code, *fragments)
    assert tree(tmp_path) == {}                       # no r.npz, no .tmp.npz left in the directory or beside it


def test_preset_that_is_not_utf8(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_bytes(b"train:\n  steps: 3\n  out: caf\xe9\n")
    error_line(cli("train", "--preset", preset, "--dry-run"), documented("README.md", "Bad input anywhere"),
               "p.yaml", "UTF-8")


def test_a_failed_ray_task_is_reported_once_in_one_line():
    """Ray wraps a task's exception with the worker's traceback; the driver reports the task's own DataError as
    raised (exit 1 naming the shard) and anything else as one line saying which task failed and why."""
    import ray

    from kdm_pipe.errors import DataError
    from kdm_pipe.raypool import remote, task_failures

    def fail(kind: str):
        raise DataError("DIR/shard-000001.tar: unreadable; rerun") if kind == "data" else ZeroDivisionError("1/0")

    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False)
    try:
        task = remote(fail, num_cpus=1)
        with pytest.raises(DataError) as e, task_failures("a test task"):
            ray.get(task.remote("data"))
        assert type(e.value) is DataError and str(e.value) == "DIR/shard-000001.tar: unreadable; rerun"
        with pytest.raises(RuntimeError) as e, task_failures("a test task"):
            ray.get(task.remote("other"))
        assert str(e.value) == "a test task failed: ZeroDivisionError: 1/0"
    finally:
        ray.shutdown()


def test_stats_ref_of_a_pair_set_checks_its_shards(tmp_path):
    d = random_pair_set(tmp_path / "p", (1, 4, 4))
    flip_byte(d / "shard-000000.tar", 900)
    code = documented("stages/README.md", "a shard missing or changed since stops the command")
    error_line(cli("stats", "ref", d, "--out", tmp_path / "r.npz"), code, "shard-000000.tar", "sha256")
    assert not (tmp_path / "r.npz").exists()
