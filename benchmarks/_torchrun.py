"""Run a benchmark script's worker under torchrun and read back rank 0's JSON result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(script: str, ranks: int, worker_args: list[str]) -> dict | None:
    """`torchrun --nproc_per_node=RANKS SCRIPT --worker ...`; rank 0's last JSON line, or None
    after printing the failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master-port={free_port()}", script, "--worker", *worker_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(f"{worker_args[0]} failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(lines[-1])
