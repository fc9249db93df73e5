import os

# Ray writes no auth token into $HOME and reports nothing; must be set before any Ray process starts.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

# Two cores shared by the test process and any Ray workers: one torch thread each avoids oversubscription.
torch.set_num_threads(1)
