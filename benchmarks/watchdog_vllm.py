"""The issue-13 watchdog test by hand on the vLLM engine and the embedded model.

CI runs ``tests/reliability/test_watchdog.py`` on the tiny checkpoint with the torch engine;
this script runs the same test function against ``powerserve serve --engine vllm`` on the
embedded model (minutes of vLLM start-up, about 7 GiB of memory with the default KV cache):

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/watchdog_vllm.py [extra serve options]

It prints the test's summary line (statuses, /health polls, slowest poll) and raises the test's
assertion when a request missed its bound. Results: docs/reliability.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test module lives under tests/, not in an installed package

from powerserve.testing import ServerProcess  # noqa: E402
from tests.reliability.test_watchdog import test_hostile_requests_never_stall_the_loop  # noqa: E402


def main() -> int:
    log = Path(tempfile.mkdtemp(prefix="watchdog-vllm-")) / "server.log"
    server = ServerProcess(model=None, engine="vllm", extra_args=sys.argv[1:], log_path=log)
    try:
        started = time.monotonic()
        server.wait_ready(timeout_s=900)
        print(f"server ready in {time.monotonic() - started:.0f} s (log {log})", flush=True)
        test_hostile_requests_never_stall_the_loop(lambda *args: server)
        print("every request within its bound")
    finally:
        server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
