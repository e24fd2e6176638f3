from __future__ import annotations

import os

# Passive OpenMP waiting before torch loads: the torch engine hands every forward to a worker
# thread, which costs 15-25 ms per hand-off with busy-waiting OpenMP threads on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

# Two cores on the build machines: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
