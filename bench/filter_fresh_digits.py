"""How often the filter's rules flag real digits that are NOT copies: each of scikit-learn's 1,797 digits against
the other 1,796 (leave one out), under the relative rule (α = 0.5, k = 50) and the absolute one (τ = 0.1). This is
the false-positive rate to compare the teacher's flagged fraction with (`kdm-pipe filter … --ref sklearn-digits`).

    python bench/filter_fresh_digits.py

Prints one line: how many of the 1,797 each rule flags, and the median and minimum nearest distance d₁. Feeds
docs/BENCHMARKS.md, section "filter: quality on digits".
"""

import argparse

import numpy as np
import torch

from kdm_pipe.datasets import sklearn_digits
from kdm_pipe.memorisation import ALPHA, TAU, K, flags, nearest

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    x = torch.from_numpy(sklearn_digits().images.reshape(1797, -1))
    d, i = nearest(x, x, (x * x).sum(1), K + 1, 2048)
    d = d[:, 1:].numpy()                     # each digit's first neighbour is itself (no two digits are equal)
    assert torch.equal(i[:, 0], torch.arange(len(x)))
    rel, ab = flags(d[:, 0], d[:, 1:].mean(1), "relative", ALPHA), flags(d[:, 0], None, "absolute", TAU)
    print(f"real digits, leave one out ({len(x)}): relative rule flags {rel.sum()} ({rel.mean():.1%}), "
          f"absolute rule flags {ab.sum()} ({ab.mean():.2%}); d1 median {np.median(d[:, 0]):.3f}, "
          f"min {d[:, 0].min():.3f}")
