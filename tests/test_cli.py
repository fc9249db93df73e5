"""The command line generated from the config models: every option documented, every command with --dry-run, the
`stats` sub-commands and their older spellings, --version, and a start-up that does not import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from faults import cli, error_line

from kdm_pipe.cli import app


def commands(group=None, prefix: tuple[str, ...] = ()):
    """(path, click command) of every leaf command."""
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


LEAVES = dict(commands())


def test_every_option_has_help():
    missing = [f"{' '.join(path)} {p.name}" for path, cmd in LEAVES.items() for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_command_has_dry_run(path):
    assert "--dry-run" in {o for p in LEAVES[path].params for o in p.opts}


def test_version():
    from importlib.metadata import version
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kdm-pipe {version('kdm-pipe')}"


def dry(*args) -> dict:
    r = cli(*args, "--dry-run")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_stats_subcommands_and_their_older_spellings(tmp_path):
    d, run = tmp_path / "pairs", tmp_path / "run"
    pairs = dry("stats", d, "--workers", "3", "--detector", tmp_path / "net.pt")
    assert pairs == dry("stats", "pairs", d, "--workers", "3", "--detector", tmp_path / "net.pt")
    assert pairs["workers"] == 3 and pairs["run"] is None
    latents = dry("stats", "latents", d, "--run", run, "--batch", "7")
    assert latents == dry("stats", d, "--run", run, "--batch", "7")        # the older spelling
    assert latents["run"] == str(run) and latents["batch"] == 7
    assert dry("stats", "ref", "sklearn-digits", "--out", tmp_path / "r.npz", "--num", "9")["num"] == 9
    assert dry("stats", "ref", "--from", d, "--out", tmp_path / "r.npz")["data"] == str(d)


@pytest.mark.parametrize("args, fragments", [
    (["stats", "latents", "{t}"], ["--run RUN"]),
    (["stats", "ref", "sklearn-digits", "--out", "{t}/r.npz", "--workers", "3"], ["--workers applies to --from"]),
])
def test_options_a_command_would_ignore_are_refused(tmp_path, args, fragments):
    error_line(cli(*[a.format(t=tmp_path) for a in args]), 2, *fragments)


@pytest.mark.parametrize("args", [["stats", "{t}", "--device", "cpu"], ["stats", "{t}", "--num", "3"],
                                  ["stats", "{t}", "--from", "{t}"],
                                  ["stats", "latents", "{t}", "--run", "{t}", "--cov-max-dim", "3"]])
def test_options_a_command_does_not_use_do_not_exist(tmp_path, args):
    error_line(cli(*[a.format(t=tmp_path) for a in args]), 2, "No such option", "--help")


@pytest.mark.parametrize("args, fragments", [
    (["train", "--steps", "x"], ["--steps", "valid integer"]), (["analyze"], ["Missing argument 'RUN'"]),
    (["nosuch"], ["No such command"]), (["filter", "{t}"], ["Missing option '--ref'"])])
def test_usage_errors_are_one_line(tmp_path, args, fragments):
    error_line(cli(*[a.format(t=tmp_path) for a in args]), 2, *fragments)


def test_flags_left_out_keep_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  steps: 7\n  student:\n    operator: linear\n    hidden: 16\n")
    cfg = dry("train", "--preset", preset, "--hidden", "32")
    assert cfg["steps"] == 7 and cfg["student"]["operator"] == "linear" and cfg["student"]["hidden"] == 32
    assert dry("train", "--preset", preset, "--steps", "9")["steps"] == 9


def test_lists_and_booleans(tmp_path):
    cfg = dry("teacher", "train", "--channel-mult", "1,2", "--attn-resolutions", "", "--cond")
    assert cfg["channel_mult"] == [1, 2] and cfg["attn_resolutions"] == [] and cfg["cond"] is True
    assert dry("train", "--no-tensorboard", "--compile")["tensorboard"] is False


def test_help_and_usage_errors_do_not_import_heavy_modules():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom kdm_pipe.cli import app\n"
            "for args in (['--help'], ['generate', '--help'], ['stats', 'ref', '--help'], ['train', '--nope'],"
            " ['teacher', 'train', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code in (0, 2), args\n"
            "print(sorted(m for m in ('torch', 'ray', 'zarr', 'matplotlib') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_new_setting_is_one_edit():
    """A field added to a model is an option with its help, bounds, choices and default, and reaches the command
    only when given (nested fields flattened, a nested name already taken prefixed with its parent's)."""
    from typing import Literal

    from pydantic import Field
    from typer.testing import CliRunner

    from kdm_pipe.cli import options
    from kdm_pipe.config import Strict

    class Inner(Strict):
        depth: int = Field(default=2, ge=1, description="inner depth")
        on: bool = Field(default=True, description="a switch")

    class Settings(Strict):
        depth: int = Field(default=3, ge=1, le=9, description="how deep")
        mode: Literal["a", "b"] = Field(default="a", description="the mode")
        sizes: list[int] = Field(default=[1, 2], description="sizes")
        inner: Inner = Field(default_factory=Inner)

    demo = typer.Typer(rich_markup_mode=None)

    @demo.command()
    @options(Settings)
    def go(flags: dict):
        print(json.dumps(flags))

    help_ = CliRunner().invoke(demo, ["--help"], terminal_width=200).stdout
    for line in ["how deep; ≥ 1, ≤ 9 [default: 3]", "the mode; one of: a | b [default: a]",
                 "sizes; comma-separated [default: 1,2]", "--inner-depth", "inner depth; ≥ 1 [default: 2]",
                 "--on / --no-on", "a switch [default: --on]"]:
        assert line in help_, (line, help_)
    r = CliRunner().invoke(demo, ["--mode", "b", "--sizes", "4,5", "--inner-depth", "7", "--no-on"])
    assert json.loads(r.stdout) == {"mode": "b", "sizes": ["4", "5"], "inner": {"depth": 7, "on": False}}
    assert Settings.model_validate(json.loads(r.stdout)).sizes == [4, 5]
    assert json.loads(CliRunner().invoke(demo, []).stdout) == {}
