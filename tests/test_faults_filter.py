"""Fault injection on `kdm-pipe filter`: bad reference paths, references and detectors that do not fit the pairs,
pairs that are no images, a corrupt shard. Each case: the exit code, one `error:` line, no traceback, and the pair
directory exactly as it was (nothing written)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import cli, error_line, flip_byte, tree
from handmade import Flatten

from kdm_pipe.config import ImportConfig
from kdm_pipe.datasets import sklearn_digits
from kdm_pipe.integrity import check_shards
from kdm_pipe.manifest import load_manifest
from stages import import_pairs


def imported(root: Path, x_0: np.ndarray) -> Path:
    rng = np.random.default_rng(1)
    np.save(root / "x_0.npy", x_0.astype(np.float32))
    np.save(root / "x_T.npy", (80 * rng.standard_normal(x_0.shape)).astype(np.float32))
    import_pairs.run(ImportConfig(format="npy", x_T=root / "x_T.npy", x_0=root / "x_0.npy", out=root / "pairs",
                                  pairs_per_shard=16), progress=False)
    return root / "pairs"


@pytest.fixture(scope="module")
def digit_set(tmp_path_factory):
    return imported(tmp_path_factory.mktemp("digits"), sklearn_digits().images[:32])


@pytest.fixture
def pairs(digit_set, tmp_path):
    return Path(shutil.copytree(digit_set, tmp_path / "pairs"))


class ThreeChannels(torch.nn.Module):
    """A detector for RGB images: fails on the digits' one channel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x.float()).flatten(1)


class NoFeatures(torch.nn.Module):
    """Returns images, not (N, D) features."""

    def forward(self, x):
        return x.float()


def refused(pairs, code, args, *fragments):
    before = tree(pairs)
    error_line(cli("filter", pairs, *args), code, *fragments)
    assert tree(pairs) == before


def test_bad_reference_paths(pairs, tmp_path):
    refused(pairs, 2, ["--ref", tmp_path / "nowhere"], "--ref", "no such file")
    (tmp_path / "notes.txt").write_text("not images")
    refused(pairs, 2, ["--ref", tmp_path / "notes.txt"], "unsupported file type")
    refused(pairs, 2, ["--ref", "sklearn-digits", "--metric", "features"], "--detector")
    refused(tmp_path / "empty", 2, ["--ref", "sklearn-digits"], "manifest.json not found")


def test_reference_of_another_shape(pairs, tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((10, 16, 16), np.uint8))
    refused(pairs, 2, ["--ref", tmp_path / "big.npy"], "shape [1, 16, 16]", "[1, 8, 8]")
    np.save(tmp_path / "few.npy", sklearn_digits().images[:10])
    refused(pairs, 2, ["--ref", tmp_path / "few.npy"], "-k 50", "only 10 images")


def test_detector_that_does_not_fit(pairs, tmp_path):
    features = ["--ref", "sklearn-digits", "--metric", "features", "--detector"]
    refused(pairs, 2, features + [tmp_path / "none.pt"], "no such file")
    torch.jit.script(ThreeChannels()).save(str(tmp_path / "rgb.pt"))
    refused(pairs, 2, features + [tmp_path / "rgb.pt"], "cannot embed images of shape [1, 8, 8]")
    torch.jit.script(NoFeatures()).save(str(tmp_path / "images.pt"))
    refused(pairs, 2, features + [tmp_path / "images.pt"], "(N, D) features")


def test_pairs_that_are_not_images(tmp_path):
    pairs = imported(tmp_path, np.random.default_rng(0).uniform(-1, 1, (32, 2)))
    refused(pairs, 2, ["--ref", "sklearn-digits"], "shape [2]", "images")


def test_corrupt_shard_is_named_and_nothing_recorded(pairs):
    check_shards(pairs, load_manifest(pairs))                   # the checksum cache, as any earlier reader leaves it
    flip_byte(pairs / "shard-000001.tar", 3000)
    before = tree(pairs)
    error_line(cli("filter", pairs, "--ref", "sklearn-digits"), 1, "shard-000001.tar", "sha256")
    after = tree(pairs)
    assert {k: v for k, v in after.items() if k != ".kdm-verified.json"} == \
        {k: v for k, v in before.items() if k != ".kdm-verified.json"}
    assert load_manifest(pairs).filter is None


@pytest.mark.slow
def test_sigterm_while_filtering_exits_143_and_leaves_the_pairs_as_they_were(pairs, tmp_path):
    """SIGTERM once filter holds the lock (starting Ray or scoring): exit 143, one `error:` line, no traceback,
    no filter recorded, no scores, lock or temp file left. A feature-space search always runs in Ray (a pixel search
    this small runs in-process in a fraction of a second: too short to be interrupted reliably)."""
    import signal
    import subprocess
    import time

    from faults import CLI, ENV
    torch.jit.script(Flatten()).save(str(tmp_path / "flat.pt"))
    before = tree(pairs)
    proc = subprocess.Popen(CLI + ["filter", str(pairs), "--ref", "sklearn-digits", "--metric", "features",
                                   "--detector", str(tmp_path / "flat.pt"), "-q"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (pairs / ".kdm-pipe.lock").exists():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.count("error:") == 1 and "SIGTERM" in err, err
    assert "Traceback" not in err and "*** " not in err
    cache = ".kdm-verified.json"                     # the checksum cache any reader may leave: not a result
    assert {k: v for k, v in tree(pairs).items() if k != cache} == {k: v for k, v in before.items() if k != cache}
    assert load_manifest(pairs).filter is None
