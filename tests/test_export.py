"""`kdm-pipe export`: the diffusers folder, loaded by diffusers in a process where kdm_pipe cannot be imported,
draws what `kdm-pipe sample` draws, bit for bit on CPU; `--format safetensors` holds the same weights; `teacher
convert` turns an EDM pickle into safetensors that `generate --teacher edm` loads."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from edm_pickle_fixture import write_edm_pickle
from faults import cli
from safetensors.torch import load_file

from kdm_pipe.config import EDMTeacherConfig, TrainConfig
from kdm_pipe.evaluation import apply
from kdm_pipe.networks import build_network
from kdm_pipe.sampling import seed_noise
from kdm_pipe.teachers.edm import build_edm
from kdm_pipe.teachers.edm_checkpoint import load_edm_pickle
from kdm_pipe.trained import load_weights
from kdm_pipe.training import train

TINY_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VECTOR_STUDENTS = {
    "official": ({"hidden": 32, "depth": 2, "latent_dim": 16}, "none"),
    "decomposed-standardized": ({"hidden": 32, "depth": 2, "latent_dim": 8, "mlp": "linear-head",
                                 "operator": "decomposed"}, "standard"),
    "kd": ({"hidden": 32, "depth": 2, "kind": "kd"}, "none"),
}

# Runs in a fresh interpreter: any import of kdm_pipe (or of the repository's stages) fails.
LOADER = textwrap.dedent("""
    import sys

    class NoKdmPipe:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("kdm_pipe", "stages"):
                raise ImportError(f"{name} must not be needed by an exported pipeline")

    sys.meta_path.insert(0, NoKdmPipe())
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    folder, seeds, out = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    label = int(sys.argv[4]) if len(sys.argv) > 4 else None
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    result = pipe(seeds=seeds, output_type="np", class_label=label)
    raw = pipe(seeds=seeds, output_type="pt", class_label=label).samples
    drawn = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), class_label=label)
    again = pipe(seeds=drawn.seeds, class_label=label).samples
    assert len(set(drawn.seeds)) == 3 and np.array_equal(drawn.samples, again)
    if len(pipe.student.config.shape) == 3:
        pil = pipe(seeds=seeds[:2], output_type="pil").samples
        assert [im.size for im in pil] == [tuple(pipe.student.config.shape[:0:-1])] * 2
    np.savez(out, samples=result.samples, raw=raw.numpy(), seeds=result.seeds,
             labels=np.array(result.labels if result.labels is not None else []))
    assert not [m for m in sys.modules if m.split(".")[0] in ("kdm_pipe", "stages")]
""")


def run_exported(folder, seeds, tmp_path, *extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "exported.npz"
    proc = subprocess.run([sys.executable, "-c", LOADER, str(folder), ",".join(map(str, seeds)), str(out), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return dict(f)


def in_process(run, seeds) -> np.ndarray:
    """What `kdm-pipe sample` computes before writing (batches of 250, the weights it and export choose)."""
    model, _, manifest, _ = load_weights(run, json.loads((run / "weights.json").read_text())["weights"])
    z, y = seed_noise(seeds, tuple(manifest.shape), manifest.label_dim)
    return apply(model, (manifest.sigma_max * z).numpy(), None if y is None else y.numpy(), "cpu", 250)


@pytest.fixture(scope="module")
def image_run(digit_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-img") / "run"
    train(TrainConfig.model_validate({"data": digit_pairs, "out": out, "steps": 4, "batch": 16, "loader_workers": 0,
                                      "holdout_shards": 1, "tensorboard": False,
                                      "student": TINY_UNET | {"projection": 32}}), progress=False)
    return out


@pytest.fixture(scope="module", params=sorted(VECTOR_STUDENTS))
def vector_run(request, vector_pairs, tmp_path_factory):
    student, normalize = VECTOR_STUDENTS[request.param]
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    out, data = root / "run", shutil.copytree(vector_pairs, root / "pairs")   # normalize: standard writes stats.zarr
    train(TrainConfig.model_validate({"data": data, "out": out, "student": student, "steps": 20,
                                      "batch": 64, "loader_workers": 0, "tensorboard": False,
                                      "normalize": normalize}), progress=False)
    return out


@pytest.mark.slow      # ~25 s: a U-Net student trained, sampled, exported and loaded by diffusers in a new process
def test_image_export_samples_like_kdm_pipe_sample(image_run, tmp_path):
    folder, samples = tmp_path / "digits-kdm", tmp_path / "samples"
    assert cli("export", str(image_run), "--out", str(folder)).returncode == 0
    assert cli("sample", str(image_run), "--out", str(samples), "--num", "6", "--seed", "3").returncode == 0
    got = run_exported(folder, range(3, 9), tmp_path)
    with np.load(samples / "samples.npz") as f:
        assert got["samples"].dtype == np.uint8 and np.array_equal(got["samples"], f["arr_0"])
        assert got["seeds"].tolist() == f["seeds"].tolist() == list(range(3, 9))
    assert torch.equal(torch.from_numpy(got["raw"]), torch.from_numpy(in_process(image_run, list(range(3, 9)))))
    card = (folder / "README.md").read_text()
    assert "digits" in card and "heun, 3 steps, NFE 5" in card and "192 (x_T, x_0) pairs" in card
    # only what one-step sampling reads: E_0 (and the LPIPS net) are left behind
    names = load_file(folder / "student" / "diffusion_pytorch_model.safetensors")
    assert any(k.startswith("enc_T.") for k in names) and not any(k.startswith("enc_0.") for k in names)
    assert {"proj_T.weight", "unproj.weight"} <= set(names) and "proj_0.weight" not in names


def test_vector_export_samples_like_kdm_pipe_sample(vector_run, tmp_path):
    folder, samples = tmp_path / "board", tmp_path / "samples"
    assert cli("export", str(vector_run), "--out", str(folder)).returncode == 0
    # 300 seeds: two batches of sample's (and the pipeline's) default 250
    assert cli("sample", str(vector_run), "--out", str(samples), "--num", "300").returncode == 0
    got = run_exported(folder, range(300), tmp_path)
    with np.load(samples / "samples.npz") as f:
        assert got["samples"].dtype == np.float32 and np.array_equal(got["samples"], f["x_0"])
    assert torch.equal(torch.from_numpy(got["raw"]), torch.from_numpy(in_process(vector_run, list(range(300)))))


def test_conditional_export_draws_the_labels_as_sample_does(tmp_path):
    """Labels drawn from each seed's generator after its noise, or one --class for all; B y in the operator."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "xT.npy", 80 * rng.standard_normal((256, 2)))
    np.save(tmp_path / "x0.npy", rng.uniform(-1, 1, (256, 2)))
    np.save(tmp_path / "y.npy", rng.integers(0, 4, 256))
    assert cli("import", "--format", "npy", "--x-T", tmp_path / "xT.npy", "--x-0", tmp_path / "x0.npy", "--labels",
               tmp_path / "y.npy", "--label-dim", "4", "--out", tmp_path / "pairs", "--pairs-per-shard", "64",
               "-q").returncode == 0
    run = tmp_path / "run"
    train(TrainConfig.model_validate({"data": tmp_path / "pairs", "out": run, "steps": 5, "batch": 32,
                                      "loader_workers": 0, "tensorboard": False,
                                      "student": {"hidden": 16, "depth": 2, "latent_dim": 8}}), progress=False)
    folder = tmp_path / "cond"
    assert cli("export", run, "--out", folder).returncode == 0
    assert json.loads((folder / "student" / "config.json").read_text())["operator"]["label_dim"] == 4
    for extra in ([], ["--class", "2"]):
        samples = tmp_path / f"samples{len(extra)}"
        assert cli("sample", run, "--out", samples, "--num", "20", *extra).returncode == 0
        got = run_exported(folder, range(20), tmp_path, *extra[1:])
        with np.load(samples / "samples.npz") as f:
            assert np.array_equal(got["samples"], f["x_0"])
            assert got["labels"].tolist() == f["labels"].argmax(1).tolist()
        if extra:
            assert set(got["labels"].tolist()) == {2}
        else:
            assert len(set(got["labels"].tolist())) > 1


def test_safetensors_export_holds_the_run_weights(image_run, tmp_path):
    out = tmp_path / "st"
    assert cli("export", str(image_run), "--out", str(out), "--format", "safetensors").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "kdm" and config["family"] == "image" and config["shape"] == [1, 8, 8]
    assert config["networks"]["enc_T"]["model_channels"] == 8 and config["_kdm_pipe"]["step"] == 4
    model, *_ = load_weights(image_run, config["_kdm_pipe"]["weights"])
    state = model.state_dict()
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(tensor, state[name]), name


def test_teacher_convert_loads_as_the_pickle_does(tmp_path):
    kwargs = dict(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], dropout=0.0)
    torch.manual_seed(0)
    net = build_network("EDMPrecond", **kwargs).eval()
    with torch.no_grad():                        # EDM zero-inits some convs: random weights make the check sharp
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pkl = write_edm_pickle(tmp_path / "network-snapshot.pkl", net, kwargs)
    out = tmp_path / "converted"
    assert cli("teacher", "convert", str(pkl), "--out", str(out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    spec = json.loads((out / "model.json").read_text())
    assert spec["class_name"] == "EDMPrecond" and spec["init_kwargs"]["model_channels"] == 16

    teacher = build_edm(EDMTeacherConfig(checkpoint=out / "model.safetensors"))
    reference = load_edm_pickle(pkl).net
    x = 5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 20.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(teacher.denoise(x.double(), sigma, None), reference(x, sigma).double())
