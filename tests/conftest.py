from __future__ import annotations

import os

import torch

# Two cores on the build machines: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
