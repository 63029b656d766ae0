"""Training health, with real faults: a rank stopped by SIGSTOP is named, every rank's stacks are
written, and torchrun's restart resumes the run to its end; profiles of chosen steps, and of the
steps after a SIGUSR2, are valid Chrome traces."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lvmtrain.data.ledger import read_ledger
from tests.conftest import REPO, read_metrics, run_lvmtrain

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
    args = train_args(tmp_path, shards, "p", 60, "health.profile_steps=[10,12]", "health.profile_signal_steps=2",
                      "checkpoint.every=0")
    args[1] = "configs/debug/clip.yaml"  # the demo's model
    cmd = [sys.executable, "-m", "lvmtrain", *args]
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


def nan_args(tmp_path, shards, name, *extra):
    return train_args(tmp_path, shards, name, 60, "checkpoint.every=10", "log.every=5", "data.ledger=true",
                      "optim.warmup_steps=5", *extra)


def final_loss(run_dir) -> float:
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    return sum(losses[-4:]) / 4


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("clean")
    run_lvmtrain(nan_args(tmp, shards, "clean"), nproc=2)
    return tmp / "clean"


def test_nan_at_step_33_rolls_back_names_the_batch_and_finishes_like_a_clean_run(tmp_path, shards, clean_run):
    proc = run_lvmtrain(nan_args(tmp_path, shards, "r", "health.on_nan=rollback", "health.inject_nan_at=33",
                                 "health.rollback_lr_scale=0.5", "health.rollback_lr_steps=8"), nproc=2)
    run_dir = tmp_path / "r"
    keys = read_ledger(run_dir)[33]  # the keys the ranks trained at step 33, as the ledger has them
    rollback = [json.loads(line) for line in (run_dir / "ledger" / "rollbacks.jsonl").read_text().splitlines()]
    assert len(rollback) == 1 and rollback[0]["step"] == 33 and rollback[0]["discarded_steps"] == [31, 35]
    assert rollback[0]["keys"] == keys and len(keys) == 16
    warning = [line for line in proc.stderr.splitlines() if "rolled back to" in line]
    assert len(warning) == 1 and "not finite at step 33" in warning[0] and keys[0] in warning[0], proc.stderr[-3000:]
    logged = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in logged] == [5, 10, 15, 20, 25, 30, 40, 45, 50, 55, 60]  # 35: discarded updates
    assert all(math.isfinite(m["loss"]) for m in logged)
    clean_lr = {m["step"]: m["lr"] for m in read_metrics(clean_run) if "lr" in m}
    lr = {m["step"]: m["lr"] for m in logged}
    assert lr[40] == pytest.approx(0.5 * clean_lr[40]) and lr[45] == pytest.approx(clean_lr[45])  # 36..43 calmer
    final, clean = final_loss(run_dir), final_loss(clean_run)
    assert abs(final - clean) < 0.1 * clean, (final, clean)


def test_nan_with_skip_drops_one_update_and_stops_past_the_event_budget(tmp_path, shards, clean_run):
    proc = run_lvmtrain(nan_args(tmp_path, shards, "s", "health.on_nan=skip", "health.inject_nan_at=33"), nproc=2)
    assert "not finite at step 33: its update was skipped" in proc.stderr
    final, clean = final_loss(tmp_path / "s"), final_loss(clean_run)
    assert all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path / "s") if "loss" in m and m["step"] != 35)
    assert abs(final - clean) < 0.05 * clean, (final, clean)
    # no event allowed: the same step stops the run, naming the step, its samples and what was tried
    proc = run_lvmtrain(nan_args(tmp_path, shards, "s0", "health.on_nan=skip", "health.inject_nan_at=33",
                                 "health.nan_max_events=0"), nproc=2, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # (torchrun adds its own traceback)
    assert "not finite at step 33" in proc.stderr and "more than health.nan_max_events=0" in proc.stderr
    assert "tried: nothing" in proc.stderr and read_ledger(tmp_path / "s0")[33][0] in proc.stderr


def test_a_shard_cut_short_mid_run_is_named_counted_and_the_run_finishes(tmp_path, shards):
    data = tmp_path / "data"
    shutil.copytree(shards["dir"] / "train", data)
    run_dir = tmp_path / "c"
    cmd = [sys.executable, "-m", "lvmtrain", *train_args(tmp_path, shards, "c", 120, "checkpoint.every=0",
                                                          "data.max_bad_fraction=0.5", "data.batch_size=8")]
    cmd[cmd.index(f"data.train={shards['train']}")] = f"data.train={data}/train-{{00000..00001}}.tar"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(run_dir, 10, proc)
    victim = data / "train-00001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a copy cut short under the run
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 120 and last["data/bad_samples"] > 0
    assert "train-00001.tar" in err, err[-3000:]
