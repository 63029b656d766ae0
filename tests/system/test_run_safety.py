"""A run directory that one job owns, a resume that refuses what it cannot honour, no silent
divergence (issue: run safety). Real runs of the CLI in real directories."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lvmtrain.export import load_weights

from tests.conftest import REPO, free_port, read_metrics, run_lvmtrain


def args(shards, log_dir: Path, *extra: str) -> list[str]:
    return ["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=", "data.batch_size=32",
            "data.workers=1", "train.steps=4", "train.epochs=0", "log.every=2", "log.wandb=disabled",
            f"log.dir={log_dir}", *extra]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory (but the lock) and its sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A run `r` that trained its 4 steps (checkpoint at the end)."""
    log_dir = tmp_path_factory.mktemp("finished")
    run_lvmtrain(args(shards, log_dir, "run.name=r"))
    return log_dir / "r"


@pytest.mark.parametrize("change, named", [
    ("optim.lr=5e-2", "optim.lr (0.001 -> 0.05)"),
    ("data.batch_size=16", "global batch (32 = 32 x 1 ranks x 1 -> 16 = 16 x 1 x 1)"),
    ("model.patch_size=4", "model.patch_size (7 -> 4)"),
    ("data.train_weights=[1.0]", "data.train_weights ([] -> [1.0])"),
    ("data.train={val}", "data.train ("),
    ("model.name=clip_b32", "model.name ('clip_debug' -> 'clip_b32')"),
])
def test_a_resume_with_another_config_is_refused_and_the_run_untouched(shards, finished, change, named):
    change = change.format(val=shards["val"])
    before = snapshot(finished)
    proc = run_lvmtrain(args(shards, finished.parent, "run.name=r", "train.steps=6", change), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("lvmtrain: error:") and named in error and "run.overwrite=true" in error, error
    assert snapshot(finished) == before  # config.yaml, history, metrics and checkpoints as they were


def test_a_finished_run_asked_for_no_more_steps_says_so(shards, finished):
    before = snapshot(finished)
    proc = run_lvmtrain(args(shards, finished.parent, "run.name=r"), check=False)
    assert proc.returncode == 2 and "has already trained 4 of 4 steps" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(finished) == before


def test_a_longer_run_on_another_backend_and_world_size_resumes(shards, finished, tmp_path):
    """What may change does: more steps, FSDP2, 2 ranks (the same global batch: 2 x 16)."""
    run = tmp_path / "r"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    proc = run_lvmtrain(args(shards, tmp_path, "run.name=r", "train.steps=6", "parallel.backend=fsdp",
                             "data.batch_size=16"), nproc=2)
    assert "resumed from" in proc.stdout
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [2, 4, 6]
    history = (run / "config_history.jsonl").read_text().splitlines()
    assert len(history) == 2 and '"from_step": 4' in history[1] and '"world_size": 2' in history[1]


def test_run_names_follow_the_experiment(shards, tmp_path):
    """Without run.name: the same config finds its run again, a changed lr gets its own."""
    run_lvmtrain(args(shards, tmp_path))
    run_lvmtrain(args(shards, tmp_path, "optim.lr=2e-3"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.startswith("clip-") for n in names), names
    again = run_lvmtrain(args(shards, tmp_path, "train.steps=6"))  # more steps: the same run
    assert "resumed from" in again.stdout and sorted(p.name for p in tmp_path.iterdir()) == names


def test_divergence_stops_with_the_step_and_saves_nothing(shards, tmp_path):
    proc = run_lvmtrain(args(shards, tmp_path, "run.name=d", "optim.lr=1e4", "optim.warmup_steps=1",
                             "train.steps=6", "checkpoint.every=2"), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "not finite at step" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    saved = sorted((tmp_path / "d" / "checkpoints").glob("step_*"))
    assert not any(p.name.endswith(".tmp") for p in saved)
    for ckpt in saved:  # what was saved before the divergence is finite
        assert all(torch.isfinite(t).all() for t in load_weights(ckpt)[1].values()), ckpt


def test_overwrite_waits_for_every_check(shards, finished, tmp_path):
    """run.overwrite with data the pre-flight refuses: the old run is still there."""
    run = tmp_path / "r"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    before = snapshot(run)
    proc = run_lvmtrain(args(shards, tmp_path, "run.name=r", "run.overwrite=true", "data.image_key=nope"),
                        check=False)
    assert proc.returncode != 0 and "image_key" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(run) == before


def test_a_second_job_into_a_running_directory_is_refused(shards, tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "lvmtrain", *args(shards, tmp_path, "run.name=busy",
                                                                      "train.steps=400", "log.every=1")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "busy" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = run_lvmtrain(args(shards, tmp_path, "run.name=busy", "train.steps=400"), check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {first.pid} on host" in second.stderr and "in use by" in second.stderr, second.stderr[-2000:]
    first.send_signal(signal.SIGTERM)  # the first job saves and stops (42), untouched by the second
    out, err = first.communicate(timeout=120)
    assert first.returncode == 42, err[-2000:]
    steps = [m["step"] for m in read_metrics(tmp_path / "busy") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[0] == 1
    assert "busy" in (tmp_path / "busy" / "config.yaml").read_text()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_die_with_a_killed_torchrun(shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "lvmtrain",
           *args(shards, tmp_path, "run.name=orphan", "train.steps=400", "log.every=1", "data.batch_size=16")]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "orphan" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = _children(agent.pid)
    try:
        assert len(ranks) == 2, ranks
        agent.kill()  # kill -9 of the launcher
        agent.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, ranks)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, ranks)), "a rank outlived its killed torchrun"
    finally:
        for pid in filter(_alive, ranks):
            os.kill(pid, signal.SIGKILL)
