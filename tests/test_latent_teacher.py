"""Latent teachers: a diffusers UNet on an AutoencoderKL's latents (a pipeline folder's vae/, or --vae). Pairs are
latents (f(seed), bit for bit), the manifest records the VAE, and evaluate / sample decode through it as diffusers'
pipelines do: image = vae.decode(z / scaling_factor + shift_factor)."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers_fixture import save_dit_pipeline, save_latent_pipeline, save_model, scheduler, shard_twice, tiny_vae
from faults import cli, error_line, tree

from kdm_pipe.config import DiffusersTeacherConfig, GenerateConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.generation import _TEACHERS, with_teacher_defaults
from kdm_pipe.manifest import Manifest
from kdm_pipe.sampling import solve
from kdm_pipe.shards import read_shard
from kdm_pipe.teachers import build_teacher
from kdm_pipe.teachers.vae import Decoder

CPU = torch.device("cpu")
VAE_KW = {"scaling_factor": 0.5, "shift_factor": 0.1}


@pytest.fixture(autouse=True)
def fresh_teachers():
    _TEACHERS.clear()          # model folders are new per test: no teacher cached from another one
    yield
    _TEACHERS.clear()


def diffusers_decode(vae_dir, z: np.ndarray) -> np.ndarray:
    """diffusers' own decoding of latents, as its pipelines write it."""
    import diffusers

    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir, low_cpu_mem_usage=False).eval()
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    with torch.no_grad():
        return vae.decode(torch.from_numpy(z) / sf + shift).sample.numpy()


def test_pipeline_with_a_vae_is_a_latent_teacher(tmp_path):
    root = save_latent_pipeline(tmp_path / "pipe", vae_kw=VAE_KW)
    teacher = build_teacher(DiffusersTeacherConfig(checkpoint=root))
    assert teacher.shape == (4, 8, 8)                                    # the VAE's latents, not 3 × 16 × 16
    lat = teacher.latent
    assert (lat.scaling_factor, lat.shift_factor, lat.image_shape) == (0.5, 0.1, [3, 16, 16])
    assert lat.vae == str((root / "vae").resolve()) and teacher.params["vae_sha256"] == lat.vae_sha256
    # The same UNet + VAE named explicitly (a UNet folder and --vae) is the same latent teacher.
    unet_only = tmp_path / "unet"
    shutil.copytree(root / "unet", unet_only)
    shutil.copy(root / "scheduler" / "scheduler_config.json", unet_only)
    explicit = build_teacher(DiffusersTeacherConfig(checkpoint=unet_only, vae=root / "vae"))
    assert explicit.latent == lat and explicit.shape == teacher.shape
    # --dry-run tells the latent shape from the configs, writing nothing.
    dry = cli("generate", "--teacher", "diffusers", "--checkpoint", unet_only, "--vae", root / "vae", "--out",
              tmp_path / "pairs", "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["teacher"]["vae"] == str(root / "vae")
    assert all(f in dry.stderr for f in ("4×8×8 latents", "decoded images 3×16×16", "scaling_factor 0.5"))
    assert not (tmp_path / "pairs").exists()
    # Without a VAE the folder is a pixel-space teacher.
    assert build_teacher(DiffusersTeacherConfig(checkpoint=save_model(tmp_path / "px", "vp"))).latent is None


def test_latent_pairs_are_the_teachers_samples_bit_for_bit(tmp_path):
    root = save_latent_pipeline(tmp_path / "pipe", vae_kw=VAE_KW)
    cfg = with_teacher_defaults(GenerateConfig(teacher={"name": "diffusers", "checkpoint": root},
                                               sampler={"steps": 3}, out=tmp_path / "a", shards=1,
                                               pairs_per_shard=4, batch=2))
    first = shard_twice(cfg)
    stored = np.concatenate([r["x_0"] for r in read_shard(tmp_path / "a" / first.name)])
    teacher = build_teacher(cfg.teacher)              # the teacher's own sampler, batch by batch as generate ran it
    direct = [teacher.sample(cfg.sampler, seeds, None, CPU)["x_0"] for seeds in ([0, 1], [2, 3])]
    assert stored.shape == (4, 4, 8, 8)
    assert np.array_equal(stored, torch.cat(direct).numpy().astype(np.float32))


def test_decoder_is_diffusers_decoding(tmp_path):
    root = save_latent_pipeline(tmp_path / "pipe", vae_kw=VAE_KW)
    lat = build_teacher(DiffusersTeacherConfig(checkpoint=root)).latent
    z = np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32)
    images = Decoder(lat)(z, batch=5)
    assert images.shape == (5, 3, 16, 16)
    assert np.array_equal(images, diffusers_decode(root / "vae", z))    # one batch: bit for bit
    batched = Decoder(lat)(z, batch=2)                                   # other batch sizes: float32 rounding only
    np.testing.assert_allclose(batched, images, rtol=0, atol=1e-5)
    assert np.array_equal(batched, Decoder(lat)(z, batch=2))            # deterministic on CPU
    other = tmp_path / "other"
    tiny_vae(seed=7, **VAE_KW).save_pretrained(other, safe_serialization=True)
    with pytest.raises(ConfigError, match="not the ones the pairs were made with"):
        Decoder(lat, path=other)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_dit_denoiser_steps_as_ddim_with_labels_and_guidance(tmp_path, guidance):
    root = save_dit_pipeline(tmp_path / "dit")
    teacher = build_teacher(DiffusersTeacherConfig(checkpoint=root, guidance=guidance))
    assert (teacher.shape, teacher.label_dim, teacher.latent.image_shape) == ((4, 8, 8), 3, [3, 16, 16])
    ddim = scheduler("vp")
    ddim.set_timesteps(6)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 2, 1])
    null = torch.full_like(classes, 3)                  # DiT's null class: its number of classes
    x = z.clone()
    with torch.no_grad():                               # DiTPipeline's loop: ε is the first C of 2C channels
        for t in ddim.timesteps:
            out = teacher.unet(torch.cat([x, x]), t.repeat(6), class_labels=torch.cat([classes, null])).sample[:, :4]
            cond, uncond = out.chunk(2)
            x = ddim.step(uncond + guidance * (cond - uncond) if guidance != 1 else cond, t, x).prev_sample
    sigmas = torch.cat([teacher.sigmas[ddim.timesteps], torch.zeros(1, dtype=torch.float64)])
    ours, _ = solve(teacher.denoise, z.double() * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                    torch.nn.functional.one_hot(classes, 3).double(), "euler")
    torch.testing.assert_close(ours, x.double(), rtol=2e-5, atol=2e-5 * x.abs().max().item())


@pytest.mark.slow
def test_generate_train_evaluate_sample_decode(tmp_path):
    from kdm_pipe.evaluation import apply
    from kdm_pipe.trained import load_weights

    root = save_latent_pipeline(tmp_path / "pipe", vae_kw=VAE_KW)
    pairs, run, samples = tmp_path / "pairs", tmp_path / "run", tmp_path / "samples"
    assert cli("generate", "--teacher", "diffusers", "--checkpoint", root, "--out", pairs, "--shards", "3",
               "--pairs-per-shard", "16", "--batch", "8", "--steps", "3", "--workers", "2", "-q").returncode == 0
    m = Manifest.model_validate_json((pairs / "manifest.json").read_text())
    assert m.shape == [4, 8, 8] and m.latent.image_shape == [3, 16, 16] and m.latent.scaling_factor == 0.5
    assert m.latent.vae_sha256 == Decoder(m.latent).latent.vae_sha256
    assert cli("verify", pairs).returncode == 0 and cli("stats", pairs, "-q").returncode == 0
    student = ["--model-channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--attn-resolutions", "",
               "--dropout", "0", "--latent-channels", "2"]
    assert cli("train", "--data", pairs, "--out", run, "--steps", "4", "--batch", "8", "--loader-workers", "0",
               "--holdout-shards", "1", "--no-tensorboard", "-q", *student).returncode == 0
    assert cli("evaluate", run, "--num", "16", "--batch", "8", "--set-num", "16").returncode == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["latent"]["vae_sha256"] == m.latent.vae_sha256
    assert {"latent_mse", "mse", "psnr", "fd_teacher"} <= set(res["student"])
    assert res["fd_set"]["fd"] >= 0 and res["fd_set"]["detector"] == f"pixels+vae-{m.latent.vae_sha256[:16]}"
    assert cli("sample", run, "--out", samples, "--num", "6", "--batch", "4").returncode == 0
    latents = np.load(samples / "latents.npy")
    model, *_ = load_weights(run, json.loads((run / "weights.json").read_text())["weights"])
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in range(6)])
    assert np.array_equal(latents, apply(model, (m.sigma_max * z).numpy(), None, CPU, 4))
    want = diffusers_decode(root / "vae", latents)
    pixels = np.load(samples / "samples.npz")["arr_0"]
    assert pixels.shape == (6, 16, 16, 3)
    assert np.abs(pixels.astype(int) - np.clip(np.rint((want.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255)).max() <= 1
    # The VAE moved: one line naming the manifest's field and --vae; with --vae it decodes as before.
    moved = tmp_path / "moved-vae"
    (root / "vae").rename(moved)
    before = tree(run)
    error_line(cli("sample", run, "--out", tmp_path / "s2", "--num", "2"), 2, "latent.vae", "--vae")
    error_line(cli("evaluate", run, "--num", "16", "--batch", "8"), 2, "latent.vae", "--vae")
    assert tree(run) == before and not (tmp_path / "s2").exists()
    assert cli("sample", run, "--out", tmp_path / "s3", "--num", "6", "--batch", "4", "--vae", moved).returncode == 0
    assert np.array_equal(np.load(tmp_path / "s3" / "samples.npz")["arr_0"], pixels)


@pytest.mark.slow
def test_class_conditional_dit_through_the_label_path(tmp_path):
    root = save_dit_pipeline(tmp_path / "dit")
    pairs, run, samples = tmp_path / "pairs", tmp_path / "run", tmp_path / "samples"
    assert cli("generate", "--teacher", "diffusers", "--checkpoint", root, "--guidance", "2", "--out", pairs,
               "--shards", "3", "--pairs-per-shard", "16", "--batch", "8", "--steps", "3", "-q").returncode == 0
    m = Manifest.model_validate_json((pairs / "manifest.json").read_text())
    assert (m.shape, m.label_dim, m.teacher["params"]["guidance"]) == ([4, 8, 8], 3, 2.0)
    first = next(iter(read_shard(pairs / m.shards[0].name)))
    assert first["label"].shape == (8, 3) and len(set(first["label"].argmax(1))) > 1
    student = ["--model-channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--attn-resolutions", "",
               "--dropout", "0"]
    assert cli("train", "--data", pairs, "--out", run, "--steps", "4", "--batch", "8", "--loader-workers", "0",
               "--no-tensorboard", "-q", *student).returncode == 0
    assert cli("evaluate", run, "--num", "16", "--batch", "8", "--set-num", "16").returncode == 0
    assert cli("sample", run, "--out", samples, "--num", "4", "--class", "2").returncode == 0
    written = np.load(samples / "samples.npz")
    assert written["arr_0"].shape == (4, 16, 16, 3) and (written["labels"] == 2).all()
