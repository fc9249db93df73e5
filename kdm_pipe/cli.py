"""`kdm-pipe`: parse flags → build a validated config (preset, then flags) → call a stage.

The options are generated from the config models in kdm_pipe/config.py, where each setting is declared once: type,
default, bounds (`Field(ge=…)`) and description. `@options(Model, …)` turns every field of `Model` into an option:

- the flag is the field's name with `_` → `-` (`pairs_per_shard` → `--pairs-per-shard`), or the names given by
  `json_schema_extra=cli("--x-0-dtype", "--x0-dtype")` on the field; booleans read `--x/--no-x`;
- nested models are flattened (train's `student.operator` → `--operator`, generate's `sampler.steps` → `--steps`,
  every teacher's fields → `--checkpoint`, …); a nested name already taken nearer the top gets its parent's prefix;
- lists are given comma-separated (`--channel-mult 1,2`); Literal fields list their choices in the help, which also
  shows the bounds and the model's default; fields without a default are required;
- `skip="a b.c"` keeps fields out of a command (settings of presets only); `arguments="data:DIR"` makes positionals.

So adding a setting is one edit: the field in its model. Options not given stay unset, so the precedence holds:
model defaults < preset < flags. Invalid input of any kind prints one message on stderr and exits with code 2
before anything is written; `--dry-run` prints the resolved config of any command and exits.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer's own click (typer ≥ 0.2x vendors it)
from typer.core import TyperGroup
from typer.exceptions import TyperException

from kdm_pipe import storage
from kdm_pipe.config import (
    AnalyzeConfig,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    FilterConfig,
    GenerateConfig,
    ImportConfig,
    RefStatsConfig,
    SampleConfig,
    StatsConfig,
    TeacherConvertConfig,
    TeacherTrainConfig,
    TrainConfig,
    VerifyConfig,
    build,
    generate_config,
    resolve,
)
from kdm_pipe.errors import ConfigError, DataError, one_line

# ------------------------------------------------------------------------------------------------ options from models


class Leaf(typing.NamedTuple):
    """One setting that becomes an option: its path in the model, the field (of each union member that has it), and
    the default the help shows (the parent's default instance wins: generate's default teacher is the checkerboard)."""
    path: tuple[str, ...]
    fields: list[FieldInfo]
    default: Any


def options(model: type[BaseModel], skip: str = "", arguments: str = "", into: str = "flags"):
    """Decorator: an option (or positional argument) per field of `model`, handed to the command as `into`, a nested
    dict of the values given (unset ones left out, so the preset's stand)."""
    positional = dict(a.split(":") for a in arguments.split())
    leaves = list(walk(model, tuple(skip.split())))
    names = flag_names(leaves)

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != into]
        params = {"__".join(leaf.path): parameter(leaf, names[leaf.path], positional) for leaf in leaves}

        @functools.wraps(fn)
        def command(**kw):
            given: dict[str, Any] = {}
            for leaf in leaves:
                value = kw.pop("__".join(leaf.path))
                if value is not None:
                    nested = given
                    for part in leaf.path[:-1]:
                        nested = nested.setdefault(part, {})
                    nested[leaf.path[-1]] = commas(value) if is_list(leaf.fields[0].annotation) else value
            return fn(**kw, **{into: given})

        ordered = [*[p for n, p in params.items() if n.split("__")[0] in positional],
                   *[p for n, p in params.items() if n.split("__")[0] not in positional],
                   *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]]
        command.__signature__ = sig.replace(parameters=ordered)
        command.__annotations__ = {p.name: p.annotation for p in ordered}
        return command
    return decorate


def walk(model: type[BaseModel], skip: tuple[str, ...], prefix: tuple[str, ...] = (), parent: Any = None):
    """The leaves of `model`, nested models (and unions of models, merged by field name) flattened."""
    merged: dict[tuple[str, ...], Leaf] = {}
    for member in models_of(model) or [model]:
        for name, f in member.model_fields.items():
            path = (*prefix, name)
            if ".".join(path) in skip:
                continue
            default = getattr(parent, name, None) if parent is not None else f.get_default(call_default_factory=True)
            if models_of(f.annotation):
                yield from walk(f.annotation, skip, path, default)
            elif path in merged:
                merged[path].fields.append(f)
            else:
                merged[path] = Leaf(path, [f], default)
    yield from merged.values()


def models_of(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation stands for (one, or the members of a union), else []."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation) if is_union(annotation) else ()
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)] if args else []


def flag_names(leaves: list[Leaf]) -> dict[tuple[str, ...], list[str]]:
    """Flags of each leaf: its own (cli(...)), else --name; a nested name taken nearer the top gets its parent's."""
    names: dict[tuple[str, ...], list[str]] = {}
    taken: set[str] = set()
    for leaf in sorted(leaves, key=lambda leaf: len(leaf.path)):
        extra = leaf.fields[0].json_schema_extra or {}
        flags = list(extra.get("flags", [])) or [dashed(leaf.path[-1])]
        if flags[0].split("/")[0] in taken and len(leaf.path) > 1:
            flags = [dashed("_".join(leaf.path[-2:]))]
        clash = taken & {f.split("/")[0] for f in flags}
        if clash:
            raise TypeError(f"{'.'.join(leaf.path)}: flag {clash.pop()} is taken; name it with cli(...) or skip it")
        taken.update(f.split("/")[0] for f in flags)
        names[leaf.path] = flags
    return names


def dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def parameter(leaf: Leaf, flags: list[str], positional: dict[str, str]) -> inspect.Parameter:
    """The typer parameter of one leaf: typed for click, unset by default, with the model's help."""
    f = leaf.fields[0]
    kind, required = click_type(leaf), f.is_required() and len(leaf.path) == 1
    name = "__".join(leaf.path)
    if leaf.path[0] in positional:
        info = typer.Argument(... if required else None, metavar=positional[leaf.path[0]],
                              help=help_text(leaf, flags), show_default=False)
    else:
        if kind is bool and not any("/" in flag for flag in flags):
            flags = [f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:]]
        info = typer.Option(... if required else None, *flags, help=help_text(leaf, flags), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=Optional[kind])


def click_type(leaf: Leaf) -> type:
    t = bare(leaf.fields[0].annotation)
    if t in (bool, int, float):
        return t
    if t in (str, Path, Any) or typing.get_origin(t) is Literal or is_union(t) or is_list(t) and all(
            a in (int, float, str) for a in typing.get_args(t)):
        return str
    raise TypeError(f"{'.'.join(leaf.path)}: no command-line form for {t}; skip it (skip=…) or give it one")


def bare(annotation: Any) -> Any:
    """The annotation without `| None` and without Annotated's metadata."""
    if typing.get_origin(annotation) is typing.Annotated:
        return bare(typing.get_args(annotation)[0])
    if is_union(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bare(args[0]) if len(args) == 1 else typing.Union[tuple(args)]
    return annotation


def is_union(t: Any) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def is_list(t: Any) -> bool:
    return typing.get_origin(bare(t)) is list


def commas(value: str) -> list[str]:
    """`1,2` → ['1', '2'] (the model converts the items); `` → []."""
    return [v.strip() for v in value.split(",") if v.strip()]


def help_text(leaf: Leaf, flags: list[str]) -> str:
    f = leaf.fields[0]
    parts = ["; ".join(dict.fromkeys(g.description for g in leaf.fields if g.description))]   # every teacher's
    choices = [c for g in leaf.fields if typing.get_origin(t := bare(g.annotation)) is Literal
               for c in typing.get_args(t)]
    if choices:
        parts.append("one of: " + " | ".join(dict.fromkeys(map(str, choices))))
    bounds = {annotated_types.Ge: "≥", annotated_types.Gt: ">", annotated_types.Le: "≤", annotated_types.Lt: "<"}
    limits = [f"{sign} {getattr(m, type(m).__name__.lower())}" for m in f.metadata for kind, sign in bounds.items()
              if isinstance(m, kind)]
    if limits:
        parts.append(", ".join(limits))
    if is_list(f.annotation):
        parts.append("comma-separated")
    default = shown(leaf, flags)
    return "; ".join(p for p in parts if p) + (f" [default: {default}]" if default is not None else "")


def shown(leaf: Leaf, flags: list[str]) -> str | None:
    """The model's default as the help shows it (booleans as the flag that is on by default)."""
    d = leaf.default
    if d is None or leaf.fields[0].is_required() and len(leaf.path) == 1:
        return None
    if isinstance(d, bool):
        on, off = (flags[0] if "/" in flags[0] else f"{flags[0]}/--no-{flags[0][2:]}").split("/")
        return on if d else off
    if isinstance(d, list):
        return ",".join(map(str, d)) or "''"
    return str(d)


# ------------------------------------------------------------------------------------------------ the error boundary


def user_errors(fn):
    """The one error boundary, every failure as one line on stderr: invalid input (ConfigError, a path that cannot
    be read or written) → exit 2; corrupt data (DataError) and runtime failures → exit 1. KDM_DEBUG=1 adds the
    traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):     # typer's own control flow and usage errors
            raise
        except ConfigError as e:
            fail(2, str(e))
        except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            fail(2, f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e))
        except DataError as e:
            fail(1, str(e))
        except Exception as e:  # noqa: BLE001  (a failed Ray task, a torch error, a full disk: exit 1, one line)
            fail(1, f"{fn.__name__.rstrip('_')} failed: {type(e).__name__}: {e}")
    return wrapper


def fail(code: int, message: str) -> None:
    if os.environ.get("KDM_DEBUG"):
        traceback.print_exc()
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def dry(cfg: BaseModel, dry_run: bool) -> bool:
    """With --dry-run: print the resolved config; the command then stops."""
    if dry_run:
        typer.echo(cfg.model_dump_json(indent=2))
    return dry_run


# ------------------------------------------------------------------------------------------------ the commands


def version(value: bool) -> None:
    if value:
        from importlib.metadata import version as installed
        typer.echo(f"kdm-pipe {installed('kdm-pipe')}")
        raise typer.Exit()


class App(TyperGroup):
    """The root command: a usage error anywhere below it (an unknown option, a missing argument, a value of the
    wrong type) is one `error:` line and exit code 2, as every other invalid input is."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as e:
            fail(2, f"{e.format_message()} (see {e.ctx.command_path if e.ctx else 'kdm-pipe'} --help)")


# Plain help (no rich markup): the models' descriptions hold brackets such as [x, t], and start-up stays short.
app = typer.Typer(cls=App, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


@app.callback()
def main_options(show_version: bool = typer.Option(False, "--version", callback=version, is_eager=True,
                                                   help="print the version and exit")) -> None:
    """Offline one-step distillation of diffusion models with a Koopman student."""


PresetOpt = typer.Option(None, "--preset", "-p", help="preset name in manifests/ or a path to a YAML file")
DryRun = typer.Option(False, "--dry-run", help="print the resolved config and exit")
Quiet = typer.Option(False, "--quiet", "-q", help="no progress bar")
StorageOpt = typer.Option(None, "--storage-option", metavar="KEY=VALUE",
                          help="for s3:// locations: an s3fs option (repeatable), e.g. endpoint_url=http://minio:9000; "
                               "credentials come from the AWS variables / profiles")


@app.command()
@user_errors
@options(GenerateConfig, skip="teacher.means")
def generate(flags: dict, preset: Optional[str] = PresetOpt, dry_run: bool = DryRun, quiet: bool = Quiet,
             storage_option: Optional[list[str]] = StorageOpt):
    """Run the teacher's ODE sampler in Ray workers and write (x_T, x_0) pairs into tar shards."""
    storage.set_options(storage_option)
    cfg = generate_config(preset, flags)
    if dry_run:                     # what would run: the sampler resolved over the teacher's own defaults
        from kdm_pipe.generation import with_teacher_defaults
        cfg = with_teacher_defaults(cfg)
    if dry(cfg, dry_run):
        if cfg.teacher.name == "diffusers":        # the shape of the pairs, from the folder's configs
            from kdm_pipe.teachers.diffusers_folder import summary
            typer.echo(summary(cfg.teacher), err=True)
        return
    from stages import generate as stage
    stage.run(cfg, progress=not quiet)


@app.command()
@user_errors
@options(VerifyConfig, arguments="data:DIR")
def verify(flags: dict, dry_run: bool = DryRun, storage_option: Optional[list[str]] = StorageOpt):
    """Recompute every shard's checksum and contents against the manifest; non-zero exit naming each bad shard."""
    storage.set_options(storage_option)
    cfg = build(VerifyConfig, flags, where="verify config")
    if dry(cfg, dry_run):
        return
    from stages import verify as stage
    stage.run(cfg)


class StatsGroup(TyperGroup):
    """`stats DIR` is `stats pairs DIR`; the older `stats DIR --run RUN` is `stats latents DIR --run RUN`."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["latents" if "--run" in args else "pairs", *args]
        return super().resolve_command(ctx, args)


stats_app = typer.Typer(cls=StatsGroup, no_args_is_help=True,
                        help="Statistics: of a pair set (`stats DIR`), of a trained student's latents "
                             "(`stats latents DIR --run RUN`), FID references (`stats ref`).")
app.add_typer(stats_app, name="stats")


@stats_app.command("pairs")
@user_errors
@options(StatsConfig, skip="run", arguments="data:DIR")
def stats_pairs(flags: dict, dry_run: bool = DryRun, quiet: bool = Quiet,
                storage_option: Optional[list[str]] = StorageOpt):
    """`stats DIR`: per-shard sufficient statistics and x_0 feature statistics (Ray) merged into DIR/stats.zarr."""
    statistics(flags, dry_run, quiet, storage_option)


@stats_app.command("latents")
@user_errors
@options(StatsConfig, skip="cov_max_dim detector vae", arguments="data:DIR")
def stats_latents(flags: dict, dry_run: bool = DryRun, quiet: bool = Quiet,
                  storage_option: Optional[list[str]] = StorageOpt):
    """Statistics of RUN's latents (z_T, z_0, C z_T) over DIR's pairs → RUN/latents.zarr."""
    if flags.get("run") is None:
        raise ConfigError("usage: kdm-pipe stats latents DIR --run RUN (a trained run)")
    statistics(flags, dry_run, quiet, storage_option)


def statistics(flags: dict, dry_run: bool, quiet: bool, storage_option: Optional[list[str]]) -> None:
    """`stats pairs` and `stats latents`: one stage, which tells them apart by `run`."""
    storage.set_options(storage_option)
    cfg = build(StatsConfig, flags, where="stats config")
    if dry(cfg, dry_run):
        return
    from stages import stats as stage
    stage.run(cfg, progress=not quiet)


@stats_app.command("ref")
@user_errors
@options(StatsConfig, skip="data detector run", into="store")
@options(RefStatsConfig, arguments="source:SOURCE")
def stats_ref(flags: dict, store: dict, dry_run: bool = DryRun, quiet: bool = Quiet,
              storage_option: Optional[list[str]] = StorageOpt):
    """`stats ref SOURCE --out REF.npz`: FID reference statistics (EDM format) of SOURCE's images;
    `stats ref --from DIR --out REF.npz`: the same from DIR's stats.zarr (the whole teacher set)."""
    storage.set_options(storage_option)
    if flags.get("source") is None and flags.get("data") is None:
        raise ConfigError("usage: kdm-pipe stats ref (SOURCE | --from DIR) --out REF.npz [--detector PATH] [--num N]")
    ref = build(RefStatsConfig, flags, where="stats ref config")
    if ref.source is not None and store:
        raise ConfigError(f"--{next(iter(store)).replace('_', '-')} applies to --from DIR (its statistics are "
                          f"brought up to date first), not to SOURCE images")
    stats = (build(StatsConfig, dict(data=ref.data, detector=ref.detector), store, where="stats config")
             if ref.data is not None else None)
    if dry(ref, dry_run):
        return
    from stages import stats as stage
    stage.reference(ref, stats, progress=not quiet)


@app.command("filter")
@user_errors
@options(FilterConfig, arguments="data:DIR")
def filter_(flags: dict, dry_run: bool = DryRun, quiet: bool = Quiet,
            storage_option: Optional[list[str]] = StorageOpt):
    """Flag the teacher samples that copy its training data (nearest reference images) and exclude them from train,
    stats and evaluate; the decision is recorded in DIR/manifest.json, the report in DIR/filter.html."""
    storage.set_options(storage_option)
    cfg = build(FilterConfig, flags, where="filter config")
    if dry(cfg, dry_run):
        return
    from stages import filter_pairs as stage
    stage.run(cfg, progress=not quiet)


@app.command()
@user_errors
@options(TrainConfig, skip="betas student.trajectory")
def train(flags: dict, resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last "
                                                   "checkpoint"),
          preset: Optional[str] = PresetOpt, dry_run: bool = DryRun, quiet: bool = Quiet,
          storage_option: Optional[list[str]] = StorageOpt):
    """Fit the Koopman student on streamed pairs; checkpoints and logs under --out.
    Multi-GPU: torchrun ... -m kdm_pipe.cli train."""
    storage.set_options(storage_option)
    cfg = resolve(TrainConfig, "train", preset, flags)
    if dry(cfg, dry_run):
        return
    from stages import train as stage
    if stage.run(cfg, resume=resume, progress=not quiet)["status"] == "preempted":
        raise typer.Exit(stage.PREEMPTED_EXIT)


@app.command()
@user_errors
@options(EvaluateConfig, arguments="run:RUN")
def evaluate(flags: dict, preset: Optional[str] = PresetOpt, dry_run: bool = DryRun,
             storage_option: Optional[list[str]] = StorageOpt):
    """Metrics of the student's one-step samples against held-out teacher pairs → RUN/eval.json and figures."""
    storage.set_options(storage_option)
    cfg = resolve(EvaluateConfig, "evaluate", preset, flags)
    if dry(cfg, dry_run):
        return
    from stages import evaluate as stage
    stage.run(cfg)


@app.command()
@user_errors
@options(SampleConfig, arguments="run:RUN")
def sample(flags: dict, dry_run: bool = DryRun, storage_option: Optional[list[str]] = StorageOpt):
    """One-step samples of a trained student, written as EDM writes them."""
    storage.set_options(storage_option)
    cfg = build(SampleConfig, flags, where="sample config")
    if dry(cfg, dry_run):
        return
    from stages import sample as stage
    stage.run(cfg)


@app.command()
@user_errors
@options(ExportConfig, arguments="src:RUN|DIR")
def export(flags: dict, dry_run: bool = DryRun, storage_option: Optional[list[str]] = StorageOpt):
    """A trained student as a diffusers pipeline folder (runs without kdm-pipe) or safetensors weights + config; a
    pair set as rectified flow's, official KDM's, GET's or FastGen's files."""
    storage.set_options(storage_option)
    cfg = build(ExportConfig, flags, where="export config")
    if dry(cfg, dry_run):
        return
    from stages import export as stage
    stage.run(cfg)


@app.command("import")
@user_errors
@options(ImportConfig, arguments="src:SRC")
def import_(flags: dict, dry_run: bool = DryRun, quiet: bool = Quiet,
            storage_option: Optional[list[str]] = StorageOpt):
    """Convert an existing pair set (official KDM .npz folder, GET files, rectified flow's z0/z1, FastGen's KD
    shards, .npy arrays) into verified shards."""
    storage.set_options(storage_option)
    cfg = build(ImportConfig, flags, where="import config")
    if dry(cfg, dry_run):
        return
    from stages import import_pairs as stage
    stage.run(cfg, progress=not quiet)


@app.command()
@user_errors
@options(AnalyzeConfig, arguments="run:RUN")
def analyze(flags: dict, dry_run: bool = DryRun, storage_option: Optional[list[str]] = StorageOpt):
    """Koopman spectrum, 2-D noise structure and outliers, latent proximity, interpolations → RUN/analysis/."""
    storage.set_options(storage_option)
    cfg = build(AnalyzeConfig, flags, where="analyze config")
    if dry(cfg, dry_run):
        return
    from stages import analyze as stage
    stage.run(cfg)


@app.command()
@user_errors
@options(DemoConfig)
def demo(flags: dict, dry_run: bool = DryRun, quiet: bool = Quiet):
    """The whole pipeline on a preset: generate → verify → filter (memorised samples) → stats → train KDM and the KD
    baseline → evaluate → report. `--scale 0.1` is the quick look (≈ 1 min on 2 quiet cores; the full digits demo
    ≈ 7 min, ≈ 10 min beside a 2-thread job; KD trains beside KDM when each has a core)."""
    cfg = build(DemoConfig, flags, where="demo config")
    if dry(cfg, dry_run):
        return
    from stages import demo as stage
    stage.run(cfg, progress=not quiet)


teacher_app = typer.Typer(no_args_is_help=True, help="Train EDM teachers on image data; convert official EDM pickles.")
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("train")
@user_errors
@options(TeacherTrainConfig)
def teacher_train(flags: dict, dry_run: bool = DryRun, quiet: bool = Quiet):
    """Train an EDM teacher (EDM loss, Adam, EMA) on images; use it with `generate --teacher edm --checkpoint`."""
    cfg = build(TeacherTrainConfig, flags, where="teacher train config")
    if dry(cfg, dry_run):
        return
    from stages import teacher as stage
    stage.run_train(cfg, progress=not quiet)


@teacher_app.command("convert")
@user_errors
@options(TeacherConvertConfig, arguments="checkpoint:CHECKPOINT")
def teacher_convert(flags: dict, dry_run: bool = DryRun):
    """An official EDM .pkl as model.safetensors + model.json (no NVlabs code needed to load it); use it with
    `generate --teacher edm --checkpoint OUT/model.safetensors`."""
    cfg = build(TeacherConvertConfig, flags, where="teacher convert config")
    if dry(cfg, dry_run):
        return
    from stages import teacher as stage
    stage.run_convert(cfg)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
