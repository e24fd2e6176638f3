"""``benchmarks/gpu_check.sh --tiny``: the GPU check runs end to end on a CPU with a toy model.

The real run (random-init SmolLM2-135M and 1.7B shapes on a CUDA machine) is recorded in
docs/benchmarks.md; this test keeps the script from rotting where no GPU is at hand.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_writes_every_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(out), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = (out / "tables.md").read_text()
    # engine vs generate at batch 1 and 8, each with a positive ratio
    ratios = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \| ([\d.]+)x \|$", tables, flags=re.M)
    assert [b for b, _ in ratios] == ["1", "8"] and all(float(r) > 0 for _, r in ratios), tables
    # the step-cost curve and the profile breakdown
    assert "| raw forward ms |" in tables and "| model forward |" in tables
    # every decoder configuration ran (an error would be a row with "error")
    decoders = (out / "decoders_tiny.md").read_text()
    for name in ("standard", "power_mcmc defaults", "power_smc defaults"):
        assert re.search(rf"^\| {name} \| [\d.]+ \| \d+ \| 8 \|", decoders, flags=re.M), decoders
    assert "| error |" not in decoders
