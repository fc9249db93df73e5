"""kdm-pipe: offline one-step distillation of diffusion models with a Koopman student, data pipeline first.

OpenMP threads wait for work passively (OMP_WAIT_POLICY=PASSIVE, unless the environment says otherwise). With
the default active policy torch's threads spin between parallel regions: beside any other busy process on the
machine each step waits for a spinning, descheduled partner, and training ran 5× slower beside other jobs than
with passive waiting (docs/BENCHMARKS.md, "Training beside other jobs"). It has to be set before torch loads its
OpenMP runtime, hence here; Ray workers and loader workers inherit it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
