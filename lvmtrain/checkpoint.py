"""CheckpointManager: when to save, atomic commit, retention, verification, finding the resume point.

Layout of a run's `checkpoints/`:
    step_00000040/   weights/ (torch.distributed.checkpoint: model weights and Adam moments by
                               parameter name, each rank writing its own shards; loads resharded
                               onto any world size and any backend)
                     state.pt (schedule, optimizer hyper-parameters, trainer state: rank 0)
                     rank00000.pt ... (each rank's RNG states)
                     manifest.json (written last: step, world size, backend, config hash, every
                                    file's size and sha256, versions)
    latest           name of the newest complete checkpoint, replaced atomically
A checkpoint is written under `step_X.tmp/`, fsynced, and renamed only once complete, `latest`
last; a kill at any moment leaves the previous checkpoint as the newest complete one. Loading
verifies every file against the manifest; `resume=auto` skips (and names) a damaged checkpoint
and takes the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import lvmtrain
from lvmtrain.config.schema import CheckpointConfig
from lvmtrain.distributed.dims import Dims, all_reduce_max, barrier, broadcast_object

STATE = "state.pt"
WEIGHTS = "weights"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, dims: Dims, *, info: dict | None = None):
        """`info` goes into every manifest (backend, config hash)."""
        self.cfg = cfg
        self.dir = run_dir / "checkpoints"
        self.dims = dims
        self.info = info or {}
        self.last_save = time.monotonic()
        self._writer: threading.Thread | None = None
        self._pending = None  # other ranks' DCP future of an async save
        self._group = None
        self._error: BaseException | None = None

    def should_save(self, step: int, total_steps: int) -> bool:
        """Collective when `checkpoint.every_minutes` is set: ranks' clocks differ, so a save is
        due on all ranks as soon as it is due on one."""
        if step == total_steps or (self.cfg.every > 0 and step % self.cfg.every == 0):
            return True
        if self.cfg.every_minutes <= 0:
            return False
        due = torch.tensor([float(time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes)],
                           device=self.dims.device)
        return bool(all_reduce_max(due).item())

    def save(self, step: int, state: dict) -> Path:
        """Collective: every rank calls it with the trainer's state (`Strategy.state_dict()`
        layout under "strategy"). Weights and Adam moments go through DCP, every rank writing its
        shards; the rest (small) is written by rank 0; RNG per rank.

        With `checkpoint.async_save`, DCP copies the tensors to host memory and writes them in a
        background thread (with a process group of its own), and rank 0 commits once they are
        written; the previous save must have finished first (at most one in flight). Its error,
        if any, is raised by `check()` at the next step, or here.
        """
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if self.dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        _write(tmp / f"rank{self.dims.rank:05d}.pt", {"rng": rng_state()})
        weights, rest = split_weights(state)
        self.last_save = time.monotonic()
        manifest = {"step": step, "world_size": self.dims.world, **self.info,
                    "lvmtrain": lvmtrain.__version__, "torch": torch.__version__}
        if self.cfg.async_save:
            future = dcp.async_save(weights, checkpoint_id=tmp / WEIGHTS, process_group=self._async_group(),
                                    no_dist=not dist.is_initialized())
            if self.dims.is_main:
                self._writer = threading.Thread(target=self._commit_catching, name="lvmtrain-checkpoint",
                                                args=(tmp, final, rest, manifest, future))
                self._writer.start()
            else:
                self._pending = future
        else:
            dcp.save(weights, checkpoint_id=tmp / WEIGHTS, no_dist=not dist.is_initialized())
            if self.dims.is_main:
                self._commit(tmp, final, rest, manifest)
        barrier()
        return final

    def _async_group(self):
        """A gloo process group for background saves, apart from the training's collectives."""
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def check(self) -> None:
        """Raise the error of a background save that has already failed (cheap: called every step)."""
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self._error, self._pending = pending.exception(), None
        if self._error is not None:
            self.wait()

    def wait(self) -> None:
        """Block until a background save is done; raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._pending is not None:
            try:
                self._pending.result()
            except BaseException as e:  # noqa: BLE001 - raised below, with the others
                self._error = e
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {error}") from error

    def _commit_catching(self, *args) -> None:
        try:
            self._commit(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def _commit(self, tmp: Path, final: Path, state: dict, manifest: dict, weights_written=None) -> None:
        """Rank 0: write the state, the manifest, rename, then point `latest` at it."""
        _crash_point("before_state", manifest["step"])
        _write(tmp / STATE, state)
        if weights_written is not None:
            weights_written.result()  # DCP's own commit: every rank's shards are written
        _crash_point("before_manifest", manifest["step"])
        manifest["files"] = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest["time"] = time.time()
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _crash_point("before_rename", manifest["step"])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _crash_point("before_latest", manifest["step"])
        _atomic_write_text(self.dir / "latest", final.name)
        self._retain()

    def find_resume(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for, or None to start fresh. An explicit path
        must verify; `auto` takes the newest checkpoint that does, naming the ones it skips.
        Collective: rank 0 reads and hashes the files once and tells the other ranks."""
        if self.cfg.resume == "none":
            return None
        choice: Path | CheckpointError | None = None
        if self.dims.is_main:
            try:
                if self.cfg.resume != "auto":
                    verify(Path(self.cfg.resume))
                    choice = Path(self.cfg.resume)
                else:
                    found = newest_verified(self.dir, on_skip=lambda e: print(
                        f"lvmtrain: warning: skipping checkpoint: {e}", file=sys.stderr, flush=True))
                    choice = found and found[0]
            except CheckpointError as e:
                choice = e
        choice = broadcast_object(choice)
        if isinstance(choice, CheckpointError):
            raise choice
        return choice

    def load(self, path: Path, template: dict) -> dict:
        """The trainer state of checkpoint `path`, with the weights and moments read into
        `template` (a `Strategy.state_dict()` of the current run: its shapes and placements), so
        DCP reshards them from whatever world size and backend saved them. Collective."""
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        weights, _ = split_weights({"strategy": template})
        dcp.load(weights, checkpoint_id=path / WEIGHTS, no_dist=not dist.is_initialized())
        state["strategy"]["model"] = weights["model"]
        state["strategy"]["optimizer"]["state"] = weights["optim"]
        own = path / f"rank{self.dims.rank:05d}.pt"
        if own.exists():
            set_rng_state(torch.load(own, weights_only=True)["rng"])
        return state

    def _retain(self) -> None:
        """Keep the newest `keep`, and every checkpoint whose step is a multiple of `keep_every`."""
        done = sorted(self.dir.glob("step_????????"))
        for old in done[:-self.cfg.keep]:
            step = int(old.name.removeprefix("step_"))
            if not (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict:
    """The manifest of a complete, unaltered checkpoint; else CheckpointError naming the file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (the save did not finish, or this is not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e})") from None
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: contents differ from the manifest's checksum (altered or corrupt)")
    return manifest


def newest_verified(checkpoints: Path, on_skip=None) -> tuple[Path, dict] | None:
    """(path, manifest) of the newest checkpoint under `checkpoints/` that verifies; `on_skip`
    is told about each newer one that does not."""
    for path in sorted(checkpoints.glob("step_????????"), reverse=True) if checkpoints.is_dir() else []:
        try:
            return path, verify(path)
        except CheckpointError as e:
            if on_skip is not None:
                on_skip(e)
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def split_weights(state: dict) -> tuple[dict, dict]:
    """({"model": weights, "optim": Adam moments by name}, everything else), without copying."""
    strategy = dict(state["strategy"])
    optimizer = dict(strategy["optimizer"])
    weights = {"model": strategy.pop("model"), "optim": optimizer.pop("state")}
    return weights, {**state, "strategy": {**strategy, "optimizer": optimizer}}


def _crash_point(name: str, step: int) -> None:
    """Tests kill the process here (LVMTRAIN_CRASH_AT=name@step) to prove a save is atomic."""
    if os.environ.get("LVMTRAIN_CRASH_AT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
