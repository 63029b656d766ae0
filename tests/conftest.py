"""Shared fixtures: real shards made from the real data that installs here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# open_clip's `CLIP(**cfg)` of the same shapes as our `clip_debug` preset.
OPEN_CLIP_DEBUG_CFG = dict(
    embed_dim=128,
    vision_cfg=dict(image_size=32, patch_size=4, width=128, layers=4, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=3),
)


@pytest.fixture(autouse=True, scope="session")
def _one_intraop_thread():
    # NOTE: the tests' matmuls are small and CI has 2 shared cores; OpenMP threads spin-waiting on
    # each other made model tests ~3x slower under load. Subprocesses get OMP_NUM_THREADS=1.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict:
    """Small Fashion-MNIST (or MNIST-sample) shards: train 2 x 768 samples, val 1 x 512."""
    from lvmtrain.data.build import load_demo_source, write_shards

    out = tmp_path_factory.mktemp("shards")
    name, classes, (xtr, ytr), (xte, yte) = load_demo_source()
    write_shards(out / "train", "train", xtr[:1536], ytr[:1536], classes, per_shard=768)
    write_shards(out / "val", "val", xte[:512], yte[:512], classes, per_shard=512)
    return {"train": f"{out}/train/train-{{00000..00001}}.tar", "val": f"{out}/val/val-00000.tar",
            "classes": classes, "dir": out}


@pytest.fixture(scope="session")
def caption_shards(shards) -> str:
    """A retrieval set made from the val shards: each image with two distinct captions, one per
    line of its .txt."""
    from lvmtrain.data.shards import ShardReader, ShardSet
    from lvmtrain.data.writer import write_shard

    val = ShardSet.from_spec(shards["val"])
    reader, samples = ShardReader(), []
    for position in range(len(val)):
        url, sample, _ = val.sample(position)
        files = {ext: reader.read(url, *sample.files[ext]) for ext in ("png", "json")}
        name = json.loads(files["json"])["class_name"]
        samples.append((sample.key, {"png": files["png"], "txt": f"a photo of a {name}.\na {name}, number {position}"}))
    reader.close()
    path = shards["dir"] / "captions" / "captions-00000.tar"
    path.parent.mkdir(exist_ok=True)
    write_shard(path, samples)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, *args, timeout: int = 120) -> dict:
    """`target(rank, world, port, *args, out)` in `world` spawned processes (each starts its own
    gloo group on `port`); {rank: what it put on the queue `out`}, once all exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def run_lvmtrain(args: list[str], *, nproc: int = 1, timeout: int = 600, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`lvmtrain ARGS` in a fresh process, or under `torchrun --nproc_per_node=nproc`."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "lvmtrain", *args]
    else:
        cmd = [sys.executable, "-m", "lvmtrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        # NOTE: 20k of stderr: a multi-rank failure prints every rank's traceback, and the first rank to
        # die (the cause) comes before the others' "connection reset" (the effect)
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-20000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
