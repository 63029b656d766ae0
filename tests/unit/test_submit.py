"""`lvmtrain submit`: the sbatch command it builds, and what it refuses before anything is queued."""

import subprocess
import sys

import pytest

from lvmtrain.cli import main
from tests.conftest import REPO


@pytest.fixture
def submit(capsys, monkeypatch):
    """`lvmtrain submit ARGS` in this process, from the repository root."""
    monkeypatch.chdir(REPO)

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(["submit", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def test_dry_run_fills_the_batch_script_options(submit):
    proc = submit("configs/debug/clip.yaml", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00",
                  "optim.lr=5e-4", "--partition", "gpu", "--sbatch-arg=--qos=high", "log.dir=/scratch/runs",
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:2] == ["sbatch", "--parsable"]
    # the job is named after the run: the config's name and its hash (run.name left out)
    assert any(o.startswith("--job-name=clip-") and len(o) == len("--job-name=clip-") + 8 for o in cmd), cmd
    for option in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                   "--time=24:00:00", "--partition=gpu", "--qos=high", "--output=/scratch/runs/slurm/%x-%j.out",
                   f"--export=ALL,LVMTRAIN_PYTHON={sys.executable}"]:
        assert option in cmd
    # the script, then the config and the overrides in their order, options before them
    script = cmd.index(str(REPO / "slurm" / "train.sbatch"))
    assert cmd[script + 1:] == ["configs/debug/clip.yaml", "optim.lr=5e-4", "log.dir=/scratch/runs"]


def test_cpu_ranks_per_node_without_gpus(submit):
    proc = submit("configs/debug/vit.yaml", "--nodes", "2", "--tasks-per-node", "3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--ntasks-per-node=3" in proc.stdout and "--gpus-per-node" not in proc.stdout


def test_a_wrong_key_or_option_is_refused_before_submitting(submit):
    proc = submit("configs/debug/clip.yaml", "optim.lrr=1e-3", "--dry-run")
    assert proc.returncode == 2 and "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in proc.stderr
    assert proc.stdout == ""
    proc = submit("configs/debug/clip.yaml", "--gpus-per-node", "8", "--tasks-per-node", "2", "--dry-run")
    assert proc.returncode == 2 and "one rank per GPU" in proc.stderr
    proc = submit("configs/debug/clip.yaml", "--script", "/nonexistent/train.sbatch", "--dry-run")
    assert proc.returncode == 2 and "/nonexistent/train.sbatch" in proc.stderr
