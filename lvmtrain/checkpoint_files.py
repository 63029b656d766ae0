"""A checkpoint's files: names, verification against the manifest, durable writes, what a save
must refuse (non-finite state) or name (a full disk), and the RNG states saved per rank. The
manager that decides when and how to save is `checkpoint.py`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

STATE = "state.pt"
WEIGHTS = "weights"
MANIFEST = "manifest.json"
SHARDED = "sharded"
"""The key under which a stateful part's `state_dict()` puts its tensors that are large or sharded
over ranks (weights, optimizer moments): saved through torch.distributed.checkpoint, each rank
writing its own shards, and read back resharded into the part's `load_template()`. The rest of a
part's state (small, the same on every rank) is saved by rank 0 in `state.pt`."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or saved; the message names the file or the step."""


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
    is called with (path, CheckpointError) of each newer one that does not."""
    for path in sorted(checkpoints.glob("step_????????"), reverse=True) if checkpoints.is_dir() else []:
        try:
            return path, verify(path)
        except CheckpointError as e:
            if on_skip is not None:
                on_skip(path, e)
    return None


def nonfinite_tensors(sharded: dict) -> list[str]:
    """Dotted names ("model.NAME", "optim.NAME.exp_avg") of the floating-point tensors of
    `sharded` (`split_sharded`'s first part) that hold a NaN or inf, in order; only this rank's
    part of each (its local shard of a DTensor).

    NOTE: min and max of each tensor, not `isfinite(t).all()`: NaN propagates through both and an
    inf is one of them, with no temporary the size of the tensor (0.05 s for ViT-B/16's weights
    and moments on one CPU thread); one device-to-host copy per device for all the results."""
    named = list(_leaves(sharded))
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        t = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0 and t.device.type != "meta":
            by_device.setdefault(t.device, []).append((name, torch.isfinite(torch.stack(torch.aminmax(t))).all()))
    bad = set()
    for results in by_device.values():
        finite = torch.stack([ok for _, ok in results]).cpu().tolist()
        bad.update(name for (name, _), ok in zip(results, finite) if not ok)
    return [name for name, _ in named if name in bad]


def _leaves(tree: dict, prefix: str = ""):
    """(dotted name, value) of a nested dict's leaves, in order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _state_bytes(sharded: dict) -> int:
    """Bytes the sharded tensors take in a checkpoint (a DTensor counts whole, as saved)."""
    return sum(t.numel() * t.element_size() for _, t in _leaves(sharded) if isinstance(t, torch.Tensor))


def _is_disk_full(error: BaseException, path: Path, needed: int) -> bool:
    """Whether `error` comes from a full disk (or quota): an OSError ENOSPC / EDQUOT anywhere in
    its cause chain or in DCP's per-rank failures; or torch's serializer's "unexpected pos"
    while less than `needed` bytes are free where `path` lies.

    NOTE: torch.save reports a short write as "unexpected pos 704 vs 598" (the ENOSPC is only
    its __context__), and DCP pickles each rank's exception across ranks, which drops the
    context; the free space then tells."""
    seen, todo, short_write = set(), [error], False
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        short_write |= "unexpected pos" in str(e.args[0] if e.args else "")
        todo += [e.__cause__, e.__context__]
        todo += [f[0] for f in (getattr(e, "failures", None) or {}).values() if isinstance(f, tuple)]
    if not short_write:
        return False
    return shutil.disk_usage(_mount_point(path)).free < max(needed, 1 << 20)


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem `path` (or its nearest existing parent) lies on."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def _remove_partial(tmp: Path) -> None:
    """Remove a failed save's `step_X.tmp/` (and a half-written `latest.tmp`): on a full disk it
    holds the space the next save needs."""
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp.parent / "latest.tmp").unlink(missing_ok=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _one_line(error: BaseException) -> str:
    """An error's message without DCP's per-rank tracebacks: their last line (the exception)."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, dcp.CheckpointException):
        causes = [f"rank {r}: {type(f[0]).__name__}: {f[0]}" for r, f in error.failures.items()]
        text = "; ".join(causes) or text
    return text


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:  # NOTE: hashlib reads into one small buffer (16 MiB reads held 32 MiB)
        return hashlib.file_digest(f, "sha256").hexdigest()


def split_sharded(state: dict) -> tuple[dict, dict]:
    """(the union of the parts' `SHARDED` trees: what DCP saves, the parts' other state: what
    `state.pt` holds), without copying. `state` maps part names to their `state_dict()` (or to a
    plain value: a counter); no two parts may use the same sharded key."""
    sharded, rest = {}, {}
    for name, part in state.items():
        if isinstance(part, dict) and SHARDED in part:
            clash = sorted(part[SHARDED].keys() & sharded.keys())
            if clash:
                raise ValueError(f"checkpoint part {name!r} reuses the sharded keys {clash} of another part")
            sharded.update(part[SHARDED])
            part = {k: v for k, v in part.items() if k != SHARDED}
        rest[name] = part
    return sharded, rest


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
