"""slurm/train.sbatch and `lvmtrain submit` on a real Slurm: two nodes (two slurmd on this machine),
one rank each; pre-emption that saves, requeues and resumes to the same weights and W&B run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lvmtrain.export import load_weights
from tests.conftest import REPO, read_metrics
from tests.system.test_launch import HARNESS, STEPS, clip_args, latest, logged_steps, wait_for

SLURM_OPTS = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A Slurm cluster for this module: the environment its clients need."""
    base = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "BASE": str(base), "SLURM_CONF": str(base / "etc" / "slurm.conf")}
    up = subprocess.run(["bash", str(HARNESS / "slurm_cluster.sh"), "up"], env=env, capture_output=True, text=True)
    if up.returncode == 3:
        pytest.skip(f"no Slurm here: {up.stderr.strip()}")
    try:
        assert up.returncode == 0, up.stderr
        yield {**env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    finally:
        subprocess.run(["bash", str(HARNESS / "slurm_cluster.sh"), "down"], env=env, capture_output=True)


def job_field(env: dict, job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def wait_job(env: dict, job: str, timeout: float = 300) -> str:
    """Wait until the job has left the queue; its final state."""
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                        text=True).stdout.strip(), f"job {job} to end", timeout=timeout)
    return job_field(env, job, "JobState")


def overrides(shards, log_dir: Path) -> list[str]:
    # run.name is the batch script's (JOB_NAME-JOB_ID); W&B offline, read back from its files
    return [a for a in clip_args(shards, log_dir, "unused", "log.wandb=offline") if not a.startswith("run.name=")]


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    """`lvmtrain submit` of the debug CLIP on 2 nodes x 1 rank, run to the end."""
    log_dir = tmp_path_factory.mktemp("slurm_runs")
    proc = subprocess.run([sys.executable, "-m", "lvmtrain", "submit", *overrides(shards, log_dir), "--nodes", "2",
                           "--cpus-per-task", "1", "--job-name", "straight"], cwd=REPO, env=slurm,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    assert job.isdigit(), proc.stdout
    state = wait_job(slurm, job)
    output = (log_dir / "slurm" / f"straight-{job}.out").read_text()
    return {"job": job, "state": state, "output": output, "run_dir": log_dir / f"straight-{job}"}


def test_submit_trains_on_two_nodes_and_ends_with_a_checkpoint(uninterrupted):
    out = uninterrupted["output"]
    assert uninterrupted["state"] == "COMPLETED", out[-3000:]
    ranks = re.findall(r"rank (\d) of 2 on node (\d) \((\S+)\), local rank 0, MASTER_ADDR=(\S+)", out)
    assert sorted(r[0] for r in ranks) == ["0", "1"], out[-3000:]
    assert sorted(r[1] for r in ranks) == ["0", "1"] and {r[2] for r in ranks} == {"n1", "n2"}
    assert {r[3] for r in ranks} == {"n1"}  # one rendezvous address for every rank
    assert latest(uninterrupted["run_dir"]) == f"step_{STEPS:08d}"


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The run id of every W&B run file (offline mode: wandb/offline-run-*/run-ID.wandb)."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return [p.name.removeprefix("run-").removesuffix(".wandb") for p in files]


def test_preempted_job_saves_requeues_and_resumes_to_the_same_weights(slurm, shards, uninterrupted, tmp_path):
    """SIGUSR1 to the batch shell, as `#SBATCH --signal=B:USR1@120` sends it before the time limit:
    the ranks save, the job requeues itself, resumes and ends bit-identical to the uninterrupted
    job (fp32, DDP), in one W&B run."""
    submit = subprocess.run(["sbatch", "--parsable", *SLURM_OPTS, "--job-name=preempted",
                             f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm" / "train.sbatch"),
                             *overrides(shards, tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env={**slurm, "LVMTRAIN_PYTHON": sys.executable})
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    run_dir = tmp_path / f"preempted-{job}"
    wait_for(lambda: len(logged_steps(run_dir)) >= 8, "8 steps of the job")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_for(lambda: job_field(slurm, job, "Restarts") == "1" and job_field(slurm, job, "JobState") == "PENDING",
             "the job to requeue itself", timeout=120)
    # NOTE: a requeued job is held ~2 minutes (BeginTime); releasing it sooner than ~1 s after the
    # requeue fails on the revoked credential of its first run.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    state = wait_job(slurm, job)
    out = (tmp_path / f"preempted-{job}.out").read_text()
    assert state == "COMPLETED", out[-3000:]

    stopped = re.search(r"stopped by SIGUSR1 at step (\d+) of", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 8 <= step < STEPS
    assert f"requeueing job {job}" in out and "(restart 1)" in out
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}" in out

    ours, straight = read_metrics(run_dir), read_metrics(uninterrupted["run_dir"])
    assert [(r["step"], r["loss"]) for r in ours] == [(r["step"], r["loss"]) for r in straight]
    _, weights, _ = load_weights(run_dir / "checkpoints" / latest(run_dir))
    _, reference, _ = load_weights(uninterrupted["run_dir"] / "checkpoints" / latest(uninterrupted["run_dir"]))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)

    ids = wandb_run_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, ids  # two segments, one W&B run
