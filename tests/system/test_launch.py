"""torchrun on one node (elastic restart after a crash, stop on SIGTERM) and on two hosts made of
network namespaces (c10d rendezvous over a real network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, read_metrics, run_lvmtrain

HARNESS = REPO / "tests" / "harness"
STEPS = 48  # two epochs of the shards fixture at a global batch of 64


def clip_args(shards, log_dir: Path, name: str, *extra: str) -> list[str]:
    """The debug CLIP on the test shards: 2 ranks x 32 samples, a metrics line every step."""
    return ["configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=", "data.batch_size=32",
            "data.workers=1", f"train.steps={STEPS}", "train.epochs=0", "train.threads=1", "log.every=1",
            f"log.dir={log_dir}", f"run.name={name}", *extra]


def wait_for(predicate, what: str, timeout: float = 240, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(run_dir)] if path.exists() else []


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def torchrun_sh(shards, tmp_path, name: str, log: Path, *extra: str, max_restarts: int = 0) -> subprocess.Popen:
    """`launch/torchrun.sh` with 2 CPU workers, in a session of its own (for killpg), output to `log`."""
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *clip_args(shards, tmp_path, name, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "MAX_RESTARTS": str(max_restarts), "VENV": sys.prefix}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(shards, tmp_path):
    """MAX_RESTARTS=1 and kill -9 of one worker: the workers restart, resume from the last
    checkpoint (run.overwrite applies to the first start, not to a restart) and finish."""
    run_dir, log = tmp_path / "elastic", tmp_path / "torchrun.log"
    proc = torchrun_sh(shards, tmp_path, "elastic", log, "checkpoint.every=8", "run.overwrite=true", max_restarts=1)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_00000008" / "manifest.json").exists(), "checkpoint 8",
                 proc=proc)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, f"expected torchrun's 2 workers, found {workers}"
        os.kill(int(workers[-1]), signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    resumed = [line for line in text.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) >= 8, text[-3000:]
    assert latest(run_dir) == f"step_{STEPS:08d}"
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # replayed steps are not logged twice


def test_sigterm_to_every_process_saves_the_step_and_stops(shards, tmp_path):
    """SIGTERM to torchrun, its workers and their data workers at once, as Slurm signals a job:
    the ranks finish the step, save a complete checkpoint of it, and stop."""
    run_dir, log = tmp_path / "stopped", tmp_path / "torchrun.log"
    proc = torchrun_sh(shards, tmp_path, "stopped", log)
    try:
        wait_for(lambda: len(logged_steps(run_dir)) >= 4, "4 steps", proc=proc)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]  # torchrun itself ends with the signal
    stopped = [line for line in text.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stopped) == 1, text[-3000:]
    step = int(stopped[0].split()[5])
    assert 4 <= step < STEPS and latest(run_dir) == f"step_{step:08d}"
    assert "Traceback" not in text.split("stopped by SIGTERM")[0]  # no rank (or data worker) died of it
    inspected = run_lvmtrain(["ckpt", "inspect", str(run_dir)])  # verifies every file against the manifest
    assert f"step_{step:08d}" in inspected.stdout


@pytest.fixture(scope="module")
def netns_hosts(tmp_path_factory):
    base = tmp_path_factory.mktemp("netns")
    env = {**os.environ, "BASE": str(base)}
    up = subprocess.run(["bash", str(HARNESS / "netns_hosts.sh"), "up"], env=env, capture_output=True, text=True)
    if up.returncode == 3:
        pytest.skip(f"network namespaces unavailable: {up.stderr.strip()}")
    try:
        assert up.returncode == 0, up.stderr
        yield base / "nsrun"
    finally:
        subprocess.run(["bash", str(HARNESS / "netns_hosts.sh"), "down"], env=env, capture_output=True)


def test_two_node_torchrun_across_network_namespaces(netns_hosts, shards, tmp_path):
    """One torchrun agent on each of two hosts (own network, own hostname), c10d rendezvous on lvmA."""
    port = free_port()
    procs = {}
    for host in ("lvmA", "lvmB"):
        cmd = [str(netns_hosts), host, "env", "OMP_NUM_THREADS=1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
               sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=lvmA:{port}", "--rdzv-id=twohosts",
               "-m", "lvmtrain", "train", *clip_args(shards, tmp_path, "twohosts", "train.steps=12")]
        procs[host] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {host: p.communicate(timeout=300)[0] for host, p in procs.items()}
    for host, p in procs.items():
        assert p.returncode == 0, f"{host}:\n{out[host][-3000:]}"
    # rank 0 lives on the rendezvous host; the world is the two single-rank hosts together
    assert "2 rank(s) on cpu" in out["lvmA"] and "rank(s)" not in out["lvmB"]
    assert latest(tmp_path / "twohosts") == "step_00000012"
