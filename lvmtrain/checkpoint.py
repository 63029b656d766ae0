"""CheckpointManager: when to save, atomic commit, retention, finding the checkpoint to resume.

Layout of a run's `checkpoints/`:
    step_00000040/   state.pt (model, optimizer, schedule, trainer state; written by rank 0)
                     rank00000.pt ... (each rank's RNG states)
                     manifest.json (written last: step, world size, files with sizes)
    latest           name of the newest complete checkpoint, replaced atomically
A checkpoint is written under `step_X.tmp/` and renamed only once complete, so a kill at any
moment leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import lvmtrain
from lvmtrain.config.schema import CheckpointConfig
from lvmtrain.distributed.dims import Dims, barrier

STATE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, dims: Dims):
        self.cfg = cfg
        self.dir = run_dir / "checkpoints"
        self.dims = dims

    def should_save(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def save(self, step: int, state: dict) -> Path:
        """Collective: every rank calls it. `state` is the same on all ranks; RNG is per rank."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if self.dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        _write(tmp / f"rank{self.dims.rank:05d}.pt", {"rng": rng_state()})
        if self.dims.is_main:
            _write(tmp / STATE, state)
        barrier()
        if self.dims.is_main:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            manifest = {"step": step, "world_size": self.dims.world, "files": files, "time": time.time(),
                        "lvmtrain": lvmtrain.__version__, "torch": torch.__version__}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write_text(self.dir / "latest", final.name)
            self._retain()
        barrier()
        return final

    def find_resume(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for, or None to start fresh."""
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            if not complete(path):
                raise FileNotFoundError(f"checkpoint.resume={path}: not a complete checkpoint "
                                        f"(no {MANIFEST} or files missing)")
            return path
        candidates = sorted(self.dir.glob("step_????????"), reverse=True) if self.dir.is_dir() else []
        return next((c for c in candidates if complete(c)), None)

    def load(self, path: Path) -> dict:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        own = path / f"rank{self.dims.rank:05d}.pt"
        if own.exists():
            set_rng_state(torch.load(own, weights_only=True)["rng"])
        return state

    def _retain(self) -> None:
        done = sorted(self.dir.glob("step_????????"))
        for old in done[:-self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)


def complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
