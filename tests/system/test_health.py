"""Training health, with real faults: a rank stopped by SIGSTOP is named, every rank's stacks are
written, and torchrun's restart resumes the run to its end; profiles of chosen steps, and of the
steps after a SIGUSR2, are valid Chrome traces."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_metrics

pytestmark = pytest.mark.slow


def train_args(tmp_path, shards, name, steps, *extra):
    return ["train", "configs/debug/vit.yaml", f"data.train={shards['train']}", "data.val=", "data.batch_size=8",
            "data.workers=1", f"train.steps={steps}", "train.epochs=0", "log.every=1", "log.wandb=disabled",
            f"log.dir={tmp_path}", f"run.name={name}", *extra]


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(m.get("step", 0) >= step for m in read_metrics(run_dir)):
            return
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step}")


def test_a_stopped_rank_is_named_dumped_and_the_restarted_run_finishes(tmp_path, shards):
    run_dir = tmp_path / "h"
    # the README's torchrun launcher, with one elastic restart
    cmd = ["bash", "launch/torchrun.sh", *train_args(tmp_path, shards, "h", 24, "checkpoint.every=4",
                                                     "health.hang_timeout_s=6")[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "MAX_RESTARTS": "1",
                                 "VENV": sys.prefix})
    wait_for_step(run_dir, 6, proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    stopped = int(ranks[-1])
    started = time.time()
    os.kill(stopped, signal.SIGSTOP)
    out, err = proc.communicate(timeout=300)
    (tmp_path / "err.txt").write_text(err)
    assert proc.returncode == 0, err[-5000:]

    # one line names the stopped rank by its pid, within the timeout (+ the heartbeat interval)
    named = [line for line in err.splitlines() if "lvmtrain: hang:" in line]
    assert named and f"pid {stopped} " in named[0] and "not answering (stopped or dead)" in named[0], err[-5000:]
    # both ranks' stacks: the stopped one's main thread where it was stopped, in the training step
    dumps = sorted((run_dir / "hang").glob("rank*.txt"))
    assert [d.name for d in dumps] == ["rank00000.txt", "rank00001.txt"]
    for dump in dumps:
        text = dump.read_text()
        assert "hang: no step finished for" in text and 'File "' in text and "lvmtrain" in text, text
    assert "train_step" in dumps[1].read_text() or "_loop" in dumps[1].read_text()
    hang_step = int(named[0].split("after step ")[1].split()[0])
    assert hang_step >= 6
    # torchrun restarted both ranks; they resumed from the last checkpoint and finished
    assert "resumed from" in out and read_metrics(run_dir)[-1]["step"] == 24
    assert time.time() - started < 200


def test_profiles_of_chosen_steps_and_after_sigusr2_are_chrome_traces(tmp_path, shards):
    run_dir = tmp_path / "p"
    cmd = [sys.executable, "-m", "lvmtrain", *train_args(tmp_path, shards, "p", 60, "health.profile_steps=[10,12]",
                                                          "health.profile_signal_steps=2", "checkpoint.every=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(run_dir, 20, proc)
    os.kill(proc.pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-5000:]
    traces = sorted((run_dir / "traces").glob("*.json"))
    assert len(traces) == 2 and traces[0].name == "steps00000010-00000012_rank00000.json", traces
    first, last = (int(x) for x in traces[1].name[5:22].split("-"))
    assert 20 < first and last == first + 1 and last < 60
    for trace, steps in zip(traces, (3, 2)):
        events = json.loads(trace.read_text())["traceEvents"]
        marks = {e["name"] for e in events if e.get("name", "").startswith("lvmtrain step ")}
        assert len(marks) == steps, marks
        assert any("aten::" in e.get("name", "") for e in events)  # the ops themselves are in it
