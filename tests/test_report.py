"""report.html per run and the comparison page: valid HTML, existing images, eval.json's numbers in the table."""

import json
import shutil
from html.parser import HTMLParser

import pytest

from kdm_pipe.analysis import analyze
from kdm_pipe.config import ConfigError, EvaluateConfig, TrainConfig
from kdm_pipe.evaluation import evaluate
from kdm_pipe.pages import fmt
from kdm_pipe.report import BETTER, label, write_comparison, write_report
from kdm_pipe.training import train

SMALL_MLP = {"hidden": 32, "depth": 2, "latent_dim": 16}
TINY_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
             "w_adv": 0.0}
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}


class StrictHTML(HTMLParser):
    """Fails on any unclosed or misnested element; collects <img src>, <a href>, tables (cell texts) and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.imgs, self.hrefs, self.tables, self.text, self.doctype = [], [], [], [], [], None
        self.cell, self.title, self._in_title = None, None, False

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        assert tag != "script" and not (tag == "link" and attrs.get("rel") == "stylesheet"), tag
        if tag == "img":
            self.imgs.append(attrs["src"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self.cell = []
        self._in_title = tag == "title"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert tag not in VOID and self.stack and self.stack[-1] == tag, (tag, self.stack)
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self._in_title:
            self.title, self._in_title = data, False
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def parse(path):
    p = StrictHTML()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert p.doctype == "DOCTYPE html" and not p.stack
    assert all(not s.startswith(("http:", "https:", "//", "/")) for s in p.imgs + p.hrefs)   # nothing external
    return p


def table_with(parsed, header):
    tables = [t for t in parsed.tables if t and t[0] == header]
    assert len(tables) == 1, header
    return tables[0][1:]


def assert_numbers(rows, expected: dict[str, list]):
    """Each row `name, v1, v2 …` shows expected[name] to 4 significant digits ('' for missing values), as `fmt`
    writes every number of every table."""
    assert sorted(r[0] for r in rows) == sorted(expected)
    for row in rows:
        for cell, want in zip(row[1:], expected[row[0]], strict=True):
            if want is None:
                assert cell == ""
            elif isinstance(want, str):
                assert cell == want
            else:
                assert cell == fmt(want), (row[0], cell, want)
                assert float(cell.replace(",", "")) == pytest.approx(want, rel=1e-3, abs=1e-12), (row[0], cell, want)


@pytest.mark.parametrize("value, text", [
    (8433.0, "8,433"), (16040.3, "16,040"), (8433, "8,433"), (0.012345, "0.01235"), (0.5, "0.5"), (1.0, "1"),
    (0.0, "0"), (-2.5, "-2.5"), (9999.7, "10,000"), (123.456, "123.5"), (2e-5, "2e-05"), (3e17, "3e+17"),
    (float("nan"), "nan"), (None, ""), ("ema", "ema")])
def test_one_number_format(value, text):
    """4 significant digits, thousands separators, no exponent for ordinary magnitudes (8,433 beside 16,040, not
    8433 beside 1.604e+04)."""
    assert fmt(value) == text


def student_keys(results):
    return [k for k, v in results["student"].items() if isinstance(v, float)]


@pytest.fixture(scope="module")
def runs(vector_pairs, digit_pairs, tmp_path_factory):
    """KDM (analysed) and KD on the session's checkerboard pairs, KDM (not analysed) on digits; all evaluated."""
    root = tmp_path_factory.mktemp("report")
    common = {"loader_workers": 0, "ckpt_every": 30, "log_every": 10, "tensorboard": False}
    specs = {"kdm": {"data": vector_pairs, "student": SMALL_MLP, "steps": 60, "batch": 128, "probe_every": 20},
             "kd": {"data": vector_pairs, "student": {**SMALL_MLP, "kind": "kd"}, "steps": 20, "batch": 128},
             "image": {"data": digit_pairs, "student": TINY_UNET, "steps": 6, "batch": 16, "probe_every": 2,
                       "probe_pairs": 20, "shuffle_buffer": 32, "log_every": 2}}
    out = {}
    for name, spec in specs.items():
        out[name] = root / name
        train(TrainConfig.model_validate({**common, **spec, "out": out[name]}), progress=False)
        evaluate(EvaluateConfig(run=out[name], num=32 if name == "image" else 500))
    analyze(out["kdm"], num=500)
    return out


@pytest.mark.parametrize("name", ["kdm", "kd", "image"])
def test_report_is_valid_html_with_images_and_the_eval_numbers(runs, name):
    run = runs[name]
    path = write_report(run)
    assert path == run / "report.html"
    html = parse(path)
    for src in html.imgs:
        assert (run / src).is_file(), src
    for href in html.hrefs:
        assert (run / href).is_file(), href
    assert {"eval.json", "config.json"} <= set(html.hrefs)

    results = json.loads((run / "eval.json").read_text())
    rows = table_with(html, ["metric", "better", "student", "untrained", "teacher floor"])
    parts = ("student", "untrained", "teacher_floor")
    assert_numbers(rows, {label(k, [results]): [BETTER.get(k, "")] + [results[p].get(k) for p in parts]
                          for k in student_keys(results)})
    text = "".join(html.text)
    passes = {"kdm": "2 network passes", "kd": "1 network pass", "image": "2 network passes"}[name]
    assert f"{fmt(results['speed']['student_samples_per_s'])} samples/s (1 step, {passes};" in text
    assert results["speed"]["student_network_passes"] == (1 if name == "kd" else 2)
    kind = "KD" if name == "kd" else "KDM"
    assert html.title == f"{kind} student of the {'digits' if name == 'image' else 'checkerboard'} teacher: {run}"
    assert "samples.png" in html.imgs and "report_files/losses.png" in html.imgs
    config = dict(table_with(html, ["setting", "value"]))
    assert config["steps × batch"] == {"kdm": "60 × 128", "kd": "20 × 128", "image": "6 × 16"}[name]
    assert config["teacher NFE"] == {"kdm": "35", "kd": "35", "image": "5"}[name]
    assert config["sampler steps"] == {"kdm": "18", "kd": "18", "image": "3"}[name]     # settings as rows, not JSON
    assert not any("{" in v for v in config.values())
    assert ("w_latent" in config["loss"]) == (name != "kd")                      # a KD report: only KD's settings

    if name == "kdm":                 # analysed: its figures and proximity table are shown
        assert {"analysis/spectrum.png", "analysis/noise_structure.png", "analysis/interpolation.png",
                "report_files/probes.png"} <= set(html.imgs)
        prox = json.loads((run / "analysis" / "analysis.json").read_text())["proximity"]["rows"]
        assert_numbers(table_with(html, ["representation", "ARI", "NMI", "Davies–Bouldin", "Calinski–Harabasz"]),
                       {k: [v["ari"], v["nmi"], v["davies_bouldin"], v["calinski_harabasz"]] for k, v in prox.items()})
    elif name == "image":             # not analysed: the spectrum comes from the latest probe
        assert "report_files/spectrum.png" in html.imgs and "not analysed yet" in text
    else:                             # KD: no operator, no latent space: no such sections
        assert "Koopman spectrum" not in text and not any("spectrum" in s for s in html.imgs)
    if name != "kd":                  # whether eigenvalues leave the unit circle is said in words
        assert "eigenvalues lie inside the unit circle" in text or "lie outside the unit circle" in text


def test_a_steps_evaluation_gets_its_own_report(runs, tmp_path):
    run = shutil.copytree(runs["image"], tmp_path / "image")
    res = json.loads((run / "eval.json").read_text())
    res["steps"], res["student"]["mse"] = 2, 0.123456
    res["speed"].update(student_steps=2, student_network_passes=4)
    (run / "eval-2steps.json").write_text(json.dumps(res))
    path = write_report(run, steps=2)
    assert path == run / "report-2steps.html"
    html = parse(path)
    text = "".join(html.text)
    assert html.title.endswith(", 2-step sampler") and "2 sampling steps" in text
    assert "(2 steps, 4 network passes;" in text
    assert "0.1235" in text and "eval-2steps.json" in html.hrefs


def test_report_of_a_moved_run_and_of_an_unevaluated_one(runs, tmp_path):
    moved = tmp_path / "elsewhere" / "kdm"
    shutil.copytree(runs["kdm"], moved, ignore=shutil.ignore_patterns("report*"))
    html = parse(write_report(moved))
    assert "samples.png" in html.imgs and all(".." not in s for s in html.imgs)   # found inside the moved run
    (moved / "eval.json").unlink()
    with pytest.raises(ConfigError, match="not a training run"):
        write_report(tmp_path)
    html = parse(write_report(moved))
    assert "not evaluated yet" in "".join(html.text)
    assert not any(t and t[0] == ["metric", "student", "untrained", "teacher floor"] for t in html.tables)


def test_comparison_page_puts_runs_side_by_side(runs, tmp_path):
    for run in runs.values():
        write_report(run)
    names = {"KDM": runs["kdm"], "KD <baseline> & co": runs["kd"]}
    out = write_comparison(names, tmp_path / "cmp" / "compare.html")
    raw = out.read_text(encoding="utf-8")
    assert "KD &lt;baseline&gt; &amp; co" in raw and "<baseline>" not in raw
    html = parse(out)
    for ref in html.imgs + html.hrefs:
        assert (out.parent / ref).is_file(), ref
    assert len(html.imgs) == 2 and len(html.hrefs) == 2
    results = {n: json.loads((r / "eval.json").read_text()) for n, r in names.items()}
    header = ["metric", "better", *names, "teacher floor", "best"]
    floor = results["KDM"]["teacher_floor"]
    tables = [t[1:] for t in html.tables if t[0] == header]
    assert len(tables) == 2                                                # headline, then the secondary rows
    lead, rest = tables
    assert [r[0] for r in lead] == ["sliced_wasserstein", "mmd", "off_support", "paired MSE (x̂_0 vs the teacher's "
                                                                              "x_0 from the same held-out x_T)"]

    def want(k, values, floor_value):
        known = {n: v for n, v in zip(names, values) if v is not None}
        if k not in BETTER:
            return ["", *values, floor_value, None]
        pick = min if BETTER[k] == "lower" else max
        return [BETTER[k], *values, floor_value, pick(known, key=known.get)]

    expected = {"step": ["", 60, 20, None, None], "weights": ["", *(results[n]["weights"] for n in names), None, None]}
    expected |= {label(k, [results["KDM"]]): want(k, [results[n]["student"][k] for n in names], floor.get(k))
                 for k in student_keys(results["KDM"])}
    expected["samples/s"] = want("samples/s", [results[n]["speed"]["student_samples_per_s"] for n in names], None)
    assert_numbers(lead + rest, expected)
    with pytest.raises(ConfigError, match="evaluate"):
        write_comparison({"nothing": tmp_path}, tmp_path / "x.html")


def test_image_comparison_leads_with_the_whole_set_fd_and_explains_odd_floors(runs, tmp_path):
    res = json.loads((runs["image"] / "eval.json").read_text())
    assert "stats" in res["fd_set"]["note"]                   # the session's digit pairs have no stats.zarr
    runs_ = {}
    for name, fd, precision in (("A", 5.0, 1.0), ("B", 4.0, 0.5)):
        run = shutil.copytree(runs["image"], tmp_path / name)
        fd_set = {"fd": fd, "num_samples": 192, "num_reference": 192, "detector": "pixels",
                  "floor": {"fd": 0.75, "num": [64, 128]}}
        r = dict(res, fd_set=fd_set, student=dict(res["student"], precision=precision),
                 teacher_floor=dict(res["teacher_floor"], precision=0.94, mmd=-0.001))
        (run / "eval.json").write_text(json.dumps(r))
        runs_[name] = run
    html = parse(write_comparison(runs_, tmp_path / "cmp.html", title="A vs B on the digits"))
    tables = [t for t in html.tables if t[0][:2] == ["metric", "better"]]
    first = tables[0][1]
    assert first[0].startswith("FD to the whole teacher set") and first[1] == "lower" and first[-1] == "B"
    assert first[0] == "FD to the whole teacher set (192 fresh samples vs its 192 pairs)" and first[4] == "0.75"
    assert tables[0][2][0].startswith("paired MSE") and any(r[0].startswith("FD, held out (secondary")
                                                            for r in tables[1])
    text = "".join(html.text)
    assert html.title == "A vs B on the digits"
    assert "precision of A above the teacher's own (0.94)" in text and "MMD floor is negative" in text
