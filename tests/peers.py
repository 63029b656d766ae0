"""Peer tools run on our exports in the tests: LAION's clip_benchmark (the zero-shot numbers papers
quote), through its own CLI in a subprocess.

clip_benchmark 1.6.2 is installed once, without its dependencies, into a cache directory put first
on the subprocess's PYTHONPATH, with the numpy it still works with; the rest (torch, open_clip,
scikit-learn, webdataset, requests) comes from this environment, so it loads our export with the
same open_clip the tests do. Its declared transformers (with tokenizers, ~20 MB) it never imports.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# NOTE: pycocoevalcap only because clip_benchmark's cli imports its captioning metric at start.
# numpy < 2.4 because clip_benchmark's `accuracy` calls float() on a 1-element array, an error
# since numpy 2.4 (LAION-AI/CLIP_benchmark#147, open); it shadows this environment's numpy in the
# clip_benchmark process only.
PACKAGES = ["clip_benchmark==1.6.2", "pycocoevalcap==1.2", "numpy==2.3.5"]
CLIP_BENCHMARK_DIR = Path(os.environ.get("LVMTRAIN_CLIP_BENCHMARK_DIR",
                                         Path.home() / ".cache" / "lvmtrain-tests" / "clip-benchmark-1.6.2"))


def clip_benchmark_dir(target: Path = CLIP_BENCHMARK_DIR) -> tuple[Path | None, str]:
    """(the directory clip_benchmark is importable from, why not), installing it on first use."""
    done = target / ".lvmtrain-complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: a lock, and a marker written last, so a concurrent or interrupted install is never
    # taken for a finished one.
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return target, ""
        shutil.rmtree(target, ignore_errors=True)
        start = time.monotonic()
        steps = [[sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                  "--target", str(target), *PACKAGES],
                 [sys.executable, "-c", "import clip_benchmark.cli"]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=_env(target))
            if proc.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                return None, f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout)[-800:]}"
        done.write_text(f"{time.monotonic() - start:.0f} s\n")
        return target, ""


def _env(target: Path) -> dict:
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    # NOTE: on the CPU, as the tests compute their reference: clip_benchmark takes a GPU when it sees one.
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def write_clip_benchmark_wds(shards: list[str | Path], class_names: list[str] | None, templates: list[str] | None,
                             out_root: Path) -> Path:
    """Lay out `shards` as clip_benchmark's `wds/` loader reads a dataset root; returns it.

    OUT/test/0.tar ... N-1.tar (links to the shards) and test/nshards.txt; for zero-shot
    classification (`class_names` given: each sample's image and .cls label) classnames.txt and
    zeroshot_classification_templates.txt (ours say `{}` for the class, clip_benchmark `{c}`); for
    retrieval (`class_names` None) dataset_type.txt = retrieval, each sample's captions being the
    lines of its .txt.
    """
    out_root = Path(out_root)
    split = out_root / "test"
    split.mkdir(parents=True)
    for i, shard in enumerate(shards):
        (split / f"{i}.tar").symlink_to(Path(shard).resolve())
    (split / "nshards.txt").write_text(f"{len(shards)}\n")
    if class_names is None:
        (out_root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (out_root / "classnames.txt").write_text("".join(f"{name}\n" for name in class_names))
        (out_root / "zeroshot_classification_templates.txt").write_text(
            "".join(t.replace("{}", "{c}") + "\n" for t in templates))
    return out_root


def run_clip_benchmark(model_dir: Path, wds_root: Path, task: str, *extra: str, batch_size: int = 256) -> dict:
    """`clip_benchmark eval` of the open_clip export `model_dir` on the dataset at `wds_root`: the
    JSON it writes ({"metrics": ..., ...})."""
    import pytest

    target, why = clip_benchmark_dir()
    if target is None:
        pytest.skip(f"clip_benchmark cannot be installed in {CLIP_BENCHMARK_DIR}: {why}")
    out = Path(wds_root) / f"result-{task}.json"
    cmd = [sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset", "wds/lvmtrain",
           "--dataset_root", str(wds_root), "--split", "test", "--task", task, "--model_type", "open_clip",
           "--model", f"local-dir:{Path(model_dir).resolve()}", "--pretrained", "", "--output", str(out),
           "--no_amp", "--num_workers", "0", "--batch_size", str(batch_size), "--quiet", *extra]
    proc = subprocess.run(cmd, cwd=wds_root, capture_output=True, text=True, timeout=900, env=_env(target))
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def clip_benchmark_zeroshot(model_dir: Path, wds_root: Path, *, batch_size: int = 256) -> float:
    """clip_benchmark's zero-shot top-1 (a fraction) of the export on a classification layout."""
    return run_clip_benchmark(model_dir, wds_root, "zeroshot_classification", batch_size=batch_size)["metrics"]["acc1"]


def clip_benchmark_retrieval(model_dir: Path, wds_root: Path, recall_k: tuple[int, ...] = (1, 5)) -> dict:
    """clip_benchmark's retrieval recalls of the export on a retrieval layout:
    {"image_retrieval_recall@K" (text -> image), "text_retrieval_recall@K" (image -> text)}."""
    return run_clip_benchmark(model_dir, wds_root, "zeroshot_retrieval", "--recall_k",
                              *map(str, recall_k))["metrics"]
