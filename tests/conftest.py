import os

import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Test tensors are small: one intra-op thread avoids OpenMP spin-waiting when the shared machine is
# busy (two threads on a loaded 2-core box can be 100x slower).
torch.set_num_threads(1)
