"""The README's demo, as written, reaches the accuracy the issue promises (minutes of CPU: slow)."""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO, read_metrics, run_lvmtrain
from tests.system.test_tracking import assert_plot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_lvmtrain(["data", "demo", str(out)])
    meta = json.loads((out / "dataset.json").read_text())
    if meta["name"] != "fashion-mnist":
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return out


def knn_above_random_init(config: str, run_dir, meta: dict) -> tuple[float, float]:
    """(k-NN top-1 of the trained run's image features, of the same model at initialisation: one
    step at lr 1e-12), on the 10k test images with 10k training images as the memory bank."""
    bank = meta["train"].replace("00011}", "00001}")
    run_lvmtrain(["train", config, f"data.train={meta['train']}", "data.val=", "train.steps=1", "train.epochs=0",
                  "optim.lr=1e-12", "optim.warmup_steps=0", f"log.dir={run_dir.parent}", "run.name=init"])
    top1 = []
    for run in (run_dir, run_dir.parent / "init"):
        out = run.parent / f"{run.name}-knn.json"
        run_lvmtrain(["eval", str(run), f"--set=knn=knn:{meta['test']},train={bank}", f"--out={out}"])
        scores = json.loads(out.read_text())["scores"]
        assert scores["eval/knn/samples"] == 10000 and scores["eval/knn/bank"] == 10000
        top1.append(scores["eval/knn/top1"])
    return top1[0], top1[1]


def test_demo_clip_zero_shot(demo_data, tmp_path):
    env = {**os.environ, "DATA": str(demo_data), "VENV": os.path.dirname(os.path.dirname(os.sys.executable))}
    proc = subprocess.run(["bash", "launch/demo.sh", f"log.dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [m for m in read_metrics(tmp_path / "clip_debug") if "eval/val/top1" in m][-1]
    print(proc.stdout.splitlines()[-1], final)
    assert final["eval/val/samples"] == 10000
    assert final["eval/val/top1"] >= 0.75

    # the README's pictures of the demo run
    run_lvmtrain(["report", str(tmp_path / "clip_debug")])
    for stem in ("loss", "eval", "lr", "throughput", "mfu", "data_wait"):
        assert_plot(tmp_path / "clip_debug" / "report" / f"{stem}.png")
    assert "| clip_debug | 468 | 119,808 |" in (tmp_path / "clip_debug" / "report" / "report.md").read_text()

    # its image tower's features: k-NN far above the same model's at initialisation (measured with
    # the 60k bank: 86.2% against 73.5%)
    trained, init = knn_above_random_init("configs/debug/clip.yaml", tmp_path / "clip_debug",
                                          json.loads((demo_data / "dataset.json").read_text()))
    print(f"k-NN top-1: trained {trained:.4f}, at initialisation {init:.4f}")
    assert trained >= init + 0.08


def test_debug_vit_classifier(demo_data, tmp_path):
    """One of the config's 4 epochs, to keep CI short: 82.6% measured in 68 s (2 epochs: 85.4%;
    4 epochs: 86.9-87.3%)."""
    meta = json.loads((demo_data / "dataset.json").read_text())
    run_lvmtrain(["train", "configs/debug/vit.yaml", f"data.train={meta['train']}", f"data.val={meta['test']}",
                  f"log.dir={tmp_path}", "run.name=vit_debug", "train.epochs=1"], nproc=2, timeout=1200)
    final = [m for m in read_metrics(tmp_path / "vit_debug") if "eval/val/top1" in m][-1]
    print(final)
    assert final["eval/val/samples"] == 10000
    assert final["eval/val/top1"] >= 0.80
    trained, init = knn_above_random_init("configs/debug/vit.yaml", tmp_path / "vit_debug", meta)
    print(f"k-NN top-1: trained {trained:.4f}, at initialisation {init:.4f}")  # 60k bank: 84.2% against 68.7%
    assert trained >= init + 0.08
