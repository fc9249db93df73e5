"""How noisy is each Fréchet distance evaluate can report? For each run and seed: the FD of N fresh one-step
samples to the whole teacher set (stats.zarr, N = min(set size, 50,000): what evaluate reports as `fd_set`) and the
FD of 256 fresh samples to 256 teacher samples drawn from the set (the size of the held-out comparison), with the
teacher-vs-teacher 256/256 floor. Pixel features unless --detector. Needs `kdm-pipe stats DATA` first.

    python bench/fd_to_set.py RUN [RUN ...] [--seeds 0 1] [--detector PATH]

Prints one line per run and seed: FD to the set, FD 256 vs 256, and the teacher's 256/256 floor. Feeds
docs/BENCHMARKS.md, section "FD to the teacher set vs the 256-sample FD".
"""

import argparse
from pathlib import Path

import numpy as np

from kdm_pipe.evaluation import chosen_weights, fresh_samples
from kdm_pipe.feature_stats import set_reference
from kdm_pipe.metrics import FeatureStats, features, fid_from_stats, load_detector
from kdm_pipe.metrics.fid import FID_NUM, stream_sums
from kdm_pipe.run import Run
from kdm_pipe.shards import read_shard
from kdm_pipe.trained import load_weights

SMALL = 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--detector", type=Path, default=None)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    net = load_detector(a.detector)
    for run in a.runs:
        model, _, manifest, step = load_weights(run, chosen_weights(run))
        data = Run(run).data_dir()
        ref = set_reference(data, manifest, net.name)
        x_0 = np.concatenate([r["x_0"] for s in manifest.shards for r in read_shard(data / s.name)])
        n = min(ref.num, FID_NUM)
        end = max(s.seed_end for s in manifest.shards)
        for seed in a.seeds:
            start = end + seed * (n + SMALL)                    # disjoint seed ranges per seed, all after the set's
            fd_set = fid_from_stats(stream_sums(net, fresh_samples(model, manifest, start, n, a.batch, "cpu"),
                                                a.batch).stats(net.name), ref)
            small = np.concatenate(list(fresh_samples(model, manifest, start + n, SMALL, a.batch, "cpu")))
            pick = np.random.default_rng(seed).permutation(len(x_0))
            teacher, other = x_0[pick[:SMALL]], x_0[pick[SMALL:2 * SMALL]]
            stats = lambda x: FeatureStats.of(features(net, [x]), net.name)  # noqa: E731
            fd_small = fid_from_stats(stats(small), stats(teacher))
            floor = fid_from_stats(stats(other), stats(teacher))
            print(f"{run} (step {step}) seed {seed}: FD to the set ({n} samples vs {ref.num}) {fd_set:.4f}   "
                  f"FD {SMALL} vs {SMALL} {fd_small:.4f}   teacher {SMALL} vs {SMALL} floor {floor:.4f}", flush=True)


if __name__ == "__main__":
    main()
