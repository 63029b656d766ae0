"""The whole CLI on real shards: run directory contents, evaluation, kill -9 and resume."""

import os
import signal
import subprocess
import sys
import time

import yaml

from lvmtrain.config import load_config
from tests.conftest import REPO, read_metrics, run_lvmtrain


def vit_args(tmp_path, shards, name, *extra):
    return ["train", "configs/debug/vit.yaml", f"data.train={shards['train']}", f"data.val={shards['val']}",
            "data.batch_size=32", "data.workers=1", "optim.warmup_steps=5", f"log.dir={tmp_path}",
            f"run.name={name}", *extra]


def test_run_directory_holds_config_metrics_checkpoints_and_eval(tmp_path, shards):
    proc = run_lvmtrain(vit_args(tmp_path, shards, "r", "train.epochs=1", "log.every=4",
                                 "checkpoint.every=8", "checkpoint.keep=2"))
    run = tmp_path / "r"
    # The resolved config reloads to the same config (overrides included).
    saved = load_config(str(run / "config.yaml"))
    assert saved.data.batch_size == 32 and saved.run.name == "r" and saved.train.epochs == 1.0
    metrics = read_metrics(run)
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(4, 48, 4)) + [48]  # 1536 samples // 32 = 48 steps
    evals = [m for m in metrics if "eval/val/top1" in m]
    assert len(evals) == 1 and evals[0]["eval/val/samples"] == 512 and evals[0]["eval/val/top1"] > 0.15  # chance: 0.1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000040", "step_00000048"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000048"
    assert '"eval/val/top1"' in proc.stdout.splitlines()[-1]


def test_kill_9_then_resume_continues_the_same_run(tmp_path, shards):
    common = ["train.steps=60", "train.epochs=0", "log.every=1", "checkpoint.every=10", "data.val="]
    run_lvmtrain(vit_args(tmp_path, shards, "straight", *common))
    cmd = [sys.executable, "-m", "lvmtrain", *vit_args(tmp_path, shards, "killed", *common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "checkpoints" / "step_00000020" / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_lvmtrain(vit_args(tmp_path, shards, "killed", *common))
    assert "resumed from" in resumed.stdout
    straight = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight")}
    killed = {}
    for m in read_metrics(tmp_path / "killed"):
        killed[m["step"]] = m["loss"]  # steps redone after the resume overwrite the killed run's
    assert sorted(killed) == list(range(1, 61))
    # fp32, one process, same threads: the resumed run is the same run.
    assert killed == straight
    assert yaml.safe_load((tmp_path / "killed" / "config.yaml").read_text())["run"]["name"] == "killed"


def test_preflight_stops_a_misconfigured_run_before_step_1(tmp_path, shards):
    proc = run_lvmtrain(["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", "data.val=",
                         "data.caption_key=text", f"log.dir={tmp_path}", "train.steps=5"], check=False)
    assert proc.returncode == 2
    assert "pre-flight" in proc.stderr and "no .text file" in proc.stderr and "data.caption_key" in proc.stderr
    assert not (tmp_path / "clip_debug" / "metrics.jsonl").exists()
