"""analyze: spectrum, 2-D noise structure, latent proximity and interpolation of small real runs (KDM, KD, image)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdm_pipe.analysis import analyze, interpolations, outliers, proximity, spectrum_section
from kdm_pipe.config import AnalyzeConfig, ConfigError, StudentConfig, TrainConfig
from kdm_pipe.evaluation import chosen_weights, heldout_pairs
from kdm_pipe.report import write_report
from kdm_pipe.student import build_student
from kdm_pipe.trained import load_weights
from kdm_pipe.training import train
from stages import analyze as stage

SMALL_MLP = {"hidden": 32, "depth": 2, "latent_dim": 16}
TINY_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
             "w_adv": 0.0}


def fit(data, out, student, **kw):
    cfg = {"data": data, "out": out, "student": student, "steps": 60, "batch": 128, "loader_workers": 0,
           "probe_every": 20, "ckpt_every": 30, "log_every": 10, "tensorboard": False, **kw}
    train(TrainConfig.model_validate(cfg), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(vector_pairs, digit_pairs, tmp_path_factory):
    """Small real runs on the session's pairs (conftest): KDM and KD on the checkerboard, KDM on digits."""
    root = tmp_path_factory.mktemp("runs")
    return {"kdm": fit(vector_pairs, root / "kdm", SMALL_MLP),
            "kd": fit(vector_pairs, root / "kd", {**SMALL_MLP, "kind": "kd"}, steps=20),
            "image": fit(digit_pairs, root / "image", TINY_UNET, steps=6, batch=16, probe_every=2,
                         probe_pairs=20, shuffle_buffer=32)}


@pytest.mark.slow      # trains three small runs first (~50 s)
def test_vector_kdm_analysis(runs):
    run = runs["kdm"]
    res = analyze(run, num=1000)
    out = run / "analysis"
    assert json.loads((out / "analysis.json").read_text()) == json.loads(json.dumps(res))
    chosen = json.loads((run / "weights.json").read_text())["weights"]      # recorded by the first consumer
    assert res["weights"] == chosen and res["num_pairs"] == 1000 and res["latent"]
    for name in ("spectrum", "noise_structure", "interpolation"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert res["figures"] == [f"analysis/{n}.png" for n in ("spectrum", "noise_structure", "interpolation")]

    model = load_weights(run, chosen)[0]
    lam = torch.linalg.eigvals(model.koopman.matrix().detach()).abs().numpy()
    spec = res["spectrum"]
    assert spec["dim"] == 16 and spec["spectral_radius"] == pytest.approx(lam.max(), rel=1e-5)
    assert spec["fraction_inside"] == pytest.approx((lam < 1).mean())
    assert spec["operator_norm"] >= spec["spectral_radius"] - 1e-6       # ‖C‖₂ bounds every |λ|
    assert spec["history"]["step"] == [20, 40, 60]

    prox = res["proximity"]
    assert "pseudo-labels" in prox["labels"]                              # unconditional data: said so
    assert list(prox["rows"]) == ["x_0", "z_0", "x_T", "z_T", "pure noise"]
    assert prox["rows"]["x_0"]["ari"] == pytest.approx(1.0)
    assert abs(prox["rows"]["pure noise"]["ari"]) < 0.05                  # chance level
    assert prox["rows"]["pure noise"]["davies_bouldin"] > prox["rows"]["x_0"]["davies_bouldin"]

    ns = res["noise_structure"]
    assert ns["dbscan"] == {"eps": 0.15, "min_samples": 5} and ns["z_threshold"] == 3.0
    assert ns["teacher"]["either"] < 0.05                                  # the teacher's samples sit on the board
    for who in ("student", "teacher"):
        assert max(ns[who]["dbscan"], ns[who]["zscore"]) <= ns[who]["either"] <= 1
    assert len(res["interpolation"]["alphas"]) == 41
    assert res["interpolation"]["rows"] == ["linear in x_T", "linear in z_T"]


@pytest.mark.slow      # trains three small runs first (~50 s)
def test_analysis_uses_the_weights_the_run_recorded(runs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a training run"):
        chosen_weights(tmp_path)
    report = write_report(runs["kd"])
    assert "analysis/interpolation.png" not in report.read_text()
    res = stage.run(AnalyzeConfig(run=runs["kd"], num=300))
    assert res["weights"] == json.loads((runs["kd"] / "weights.json").read_text())["weights"]
    printed = capsys.readouterr().out
    assert "KD student" in printed and "analysis.json" in printed and "report.html" in printed
    assert 'src="analysis/interpolation.png"' in report.read_text()       # the existing report now shows it


@pytest.mark.slow      # trains three small runs first (~50 s)
def test_kd_student_gets_only_the_sample_analyses(runs):
    res = analyze(runs["kd"], num=300)
    out = runs["kd"] / "analysis"
    assert not res["latent"] and "KD student" in res["note"]
    assert "spectrum" not in res and "proximity" not in res and not (out / "spectrum.png").exists()
    assert (out / "noise_structure.png").is_file() and (out / "interpolation.png").is_file()
    assert res["interpolation"]["rows"] == ["linear in x_T"]


@pytest.mark.slow      # trains three small runs first (~50 s)
def test_image_analysis_draws_the_interpolation_strip(runs):
    res = analyze(runs["image"], num=64)
    out = runs["image"] / "analysis"
    assert "noise_structure" not in res and not (out / "noise_structure.png").exists()
    assert res["spectrum"]["dim"] == 64 and res["spectrum"]["history"]["step"] == [2, 4, 6]
    assert set(res["proximity"]["rows"]) == {"x_0", "z_0", "x_T", "z_T", "pure noise"}
    assert res["interpolation"]["rows"] == ["linear in x_T", "linear in z_T"]
    assert len(res["interpolation"]["alphas"]) == 9
    with Image.open(out / "interpolation.png") as im:
        assert im.width > 2 * im.height                                    # a strip: 9 images per row, 2 rows


@pytest.mark.slow      # trains three small runs first (~50 s)
def test_interpolations_start_and_end_at_the_one_step_samples(runs):
    model, cfg, _, _ = load_weights(runs["kdm"], "ema")
    split = json.loads((runs["kdm"] / "split.json").read_text())
    x_T = heldout_pairs(cfg.data, split["holdout"], 6)["x_T"]
    a, b = x_T[:3], x_T[3:]
    paths = interpolations(model, a, b, None, np.array([0.0, 0.5, 1.0]), torch.device("cpu"))
    with torch.no_grad():
        ends = {k: model(torch.from_numpy(v)).numpy() for k, v in (("a", a), ("b", b), ("mid", (a + b) / 2))}
    for kind, path in paths.items():
        assert path.shape == (3, 3, 2)
        np.testing.assert_allclose(path[:, 0], ends["a"], atol=1e-5, err_msg=kind)
        np.testing.assert_allclose(path[:, 2], ends["b"], atol=1e-5, err_msg=kind)
    np.testing.assert_allclose(paths["linear in x_T"][:, 1], ends["mid"], atol=1e-5)
    assert not np.allclose(paths["linear in z_T"][:, 1], ends["mid"], atol=1e-4)   # the two paths differ


def test_outlier_masks_and_proximity_on_known_points():
    rng = np.random.default_rng(0)
    blob = rng.normal(0, 0.02, (300, 2))
    pts = np.concatenate([blob, [[0.5, 0.0]], [[6.0, 6.0]]])          # an isolated point, a far one
    m = outliers(pts)
    assert not m["either"][:300].any()
    assert m["dbscan"][300] and not m["zscore"][300]
    assert m["dbscan"][301] and m["zscore"][301]

    labels = np.repeat([0, 1], 100)
    separated = np.concatenate([rng.normal(-5, 1, (100, 3)), rng.normal(5, 1, (100, 3))])
    rows = proximity({"separated": separated, "noise": rng.normal(size=(200, 3))}, labels, seed=0)
    assert rows["separated"]["ari"] == pytest.approx(1.0) and rows["separated"]["nmi"] == pytest.approx(1.0)
    assert abs(rows["noise"]["ari"]) < 0.05
    assert rows["separated"]["calinski_harabasz"] > 100 * rows["noise"]["calinski_harabasz"]


def test_decomposed_operator_spectrum_shows_parameterised_and_applied_eigenvalues(tmp_path):
    torch.manual_seed(0)
    cfg = StudentConfig(operator="decomposed", **SMALL_MLP)
    model = build_student(cfg, (2,), 0, 80.0)
    section = spectrum_section(model, tmp_path, tmp_path, "untrained")
    lam = torch.complex(*model.koopman.op.eigen_parts()).detach().abs().numpy()
    assert section["spectral_radius"] == pytest.approx(lam.max(), rel=1e-5) and section["fraction_inside"] == 1.0
    applied = torch.linalg.eigvals(model.koopman.matrix().detach().double()).abs().numpy()
    assert section["applied"]["spectral_radius"] == pytest.approx(applied.max(), rel=1e-6)
    assert "history" not in section and (tmp_path / "spectrum.png").stat().st_size > 10_000
