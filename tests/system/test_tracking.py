"""W&B (offline, read back with wandb's own reader), metrics.jsonl, the console and `lvmtrain report`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import free_port, read_metrics, run_lvmtrain

STEPS = 24
WANDB = str(Path(sys.executable).parent / "wandb")


def args(shards, log_dir: Path, name: str, *extra: str) -> list[str]:
    return ["train", "configs/debug/clip.yaml", f"data.train={shards['train']}", f"data.val={shards['val']}",
            "data.batch_size=32", "data.workers=1", f"train.steps={STEPS}", "train.epochs=0", "log.every=2",
            "checkpoint.every=8", "log.wandb=offline", f"log.dir={log_dir}", f"run.name={name}", *extra]


def wandb_records(run_file: Path) -> list[dict]:
    """Every record of a W&B run file, through wandb's own reader (`wandb leet inspect --json`)."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, shards):
    """2 ranks, W&B offline; rank 0 is killed (SIGKILL) while saving step 16, so the run resumes
    from step 8 and trains steps 9-16 a second time."""
    log_dir = tmp_path_factory.mktemp("tracked")
    crashed = run_lvmtrain(args(shards, log_dir, "run"), nproc=2, check=False,
                           env={"LVMTRAIN_CRASH_AT": "before_state@16"})
    assert crashed.returncode != 0
    resumed = run_lvmtrain(args(shards, log_dir, "run"), nproc=2)
    assert "resumed from" in resumed.stdout and "step_00000008 at step 8" in resumed.stdout
    return {"run_dir": log_dir / "run", "first": crashed, "second": resumed}


def test_wandb_history_is_metrics_jsonl_in_one_run_without_gaps_or_repeats(tracked):
    run_dir = tracked["run_dir"]
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per process lifetime ...
    ids = {f.name.removeprefix("run-").removesuffix(".wandb") for f in files}
    state = torch.load(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "state.pt", weights_only=True)
    assert ids == {state["wandb_id"]}  # ... and one W&B run, whose id the checkpoint carries

    # NOTE: the killed process's W&B file may hold none of its steps (wandb had not flushed them);
    # the resumed one gives W&B what metrics.jsonl has and W&B lacks.
    history = [r["history"]["item"] for f in files for r in wandb_records(f) if r["type"] == "history"]
    jsonl = read_metrics(run_dir)
    steps = [r["step"] for r in jsonl if "loss" in r]
    assert steps == list(range(2, STEPS + 1, 2))  # steps 9-16, trained twice, logged once
    by_step: dict[int, dict] = {}
    for record in jsonl:  # the final step's training and evaluation lines are one W&B row
        by_step.setdefault(record["step"], {}).update(record)
    assert [h["_step"] for h in history] == list(by_step)
    for item in history:
        for key, value in by_step[item["_step"]].items():
            if key not in ("step", "time") and value is not None:
                assert item[key] == pytest.approx(value, rel=1e-12), (item["_step"], key)

    last = [r for r in jsonl if "loss" in r][-1]
    expected = """loss loss/image_to_text loss/text_to_image logit_scale lr grad_norm samples_per_s
        samples_per_s_per_device images_per_s images_per_s_per_device mfu tflops_per_device time/step_s
        time/data_wait_s time/fwd_bwd_s time/optimizer_s data_wait_share mem/peak_rss_gb data/bad_samples
        samples_seen epoch""".split()
    for key in expected:
        assert key in last, key
    assert 0 < last["mfu"] < 1 and last["mem/peak_rss_gb"] > 0.1
    phases = last["time/data_wait_s"] + last["time/fwd_bwd_s"] + last["time/optimizer_s"]
    assert 0.5 * last["time/step_s"] < phases <= 1.01 * last["time/step_s"]
    assert "eval/val/top1" in jsonl[-1]

    records = wandb_records(files[-1])
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["model"]["name"] == "clip_debug" and config["train"]["steps"] == STEPS  # the resolved config
    assert any(r["type"] == "artifact" for r in records)  # the final checkpoint, by reference
    assert any(r["type"] == "stats" for r in records)  # wandb's system metrics


def test_console_lines_carry_step_total_and_eta(tracked):
    out = tracked["second"].stdout
    assert f"step 18/{STEPS} | loss " in out and " | eta " in out  # steps 9-16 were shown before the kill


def test_report_plots_the_run(tracked, tmp_path):
    run_lvmtrain(["report", str(tracked["run_dir"]), "--out", str(tmp_path)])
    summary = (tmp_path / "report.md").read_text()
    assert "| run | 24 | 1,536 |" in summary
    for stem in ("loss", "eval", "lr", "throughput", "mfu", "data_wait"):
        assert_plot(tmp_path / f"{stem}.png")


def assert_plot(path: Path) -> None:
    """A valid PNG with a drawn figure in it: not blank, several colours, lines off the white."""
    with Image.open(path) as im:
        im.verify()
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert 0.01 < (pixels.min(axis=2) < 200).mean() < 0.5


def test_unreachable_wandb_warns_once_and_training_completes(shards, tmp_path):
    """Online mode, no W&B server: one warning, the same run offline (to `wandb sync` later)."""
    proc = run_lvmtrain(args(shards, tmp_path, "online", "log.wandb=online", "data.val=", "train.steps=4",
                             "log.progress=bar"),
                        env={"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_API_KEY": "x" * 40,
                             "WANDB_INIT_TIMEOUT": "1"})
    assert proc.stderr.count("lvmtrain: warning: W&B is unreachable") == 1
    assert proc.stderr.count("lvmtrain: warning:") == 1
    assert "4/4 [" in proc.stderr and "step/s" in proc.stderr  # the progress bar, forced
    files = list((tmp_path / "online").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    steps = [r["history"]["item"]["_step"] for r in wandb_records(files[0]) if r["type"] == "history"]
    assert steps == [2, 4] == [r["step"] for r in read_metrics(tmp_path / "online")]
