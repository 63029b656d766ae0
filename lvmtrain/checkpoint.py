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

A save that cannot complete leaves nothing behind: a full disk is named as such (with the space
needed and free), the partial `step_X.tmp/` is removed, and `latest` keeps naming the previous
checkpoint. A state holding NaN or inf is never saved: every rank refuses together, before writing.
"""

from __future__ import annotations

import contextlib
import errno
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
from lvmtrain.distributed.dims import Dims, all_reduce_max, barrier, from_rank0

STATE = "state.pt"
WEIGHTS = "weights"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or saved; the message names the file or the step."""


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
        self._estimate = 0  # bytes of the weights and moments of the save in progress

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

        A state with a NaN or inf weight or moment is refused (CheckpointError, nothing written).
        A save that fails removes its `step_X.tmp/`; a full disk raises CheckpointError saying so.
        Every rank raises when one rank's part failed.
        """
        self.wait()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        weights, rest = split_weights(state)
        self._refuse_nonfinite(step, weights)
        self._estimate = _state_bytes(weights)
        if self.dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        self.last_save = time.monotonic()
        manifest = {"step": step, "world_size": self.dims.world, **self.info,
                    "lvmtrain": lvmtrain.__version__, "torch": torch.__version__}
        error, future = None, None
        try:
            _write(tmp / f"rank{self.dims.rank:05d}.pt", {"rng": rng_state()})
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks below
            error = e
        # NOTE: entered even after this rank's own write failed: DCP's save is collective (and
        # raises on every rank when any rank's write fails), so skipping it would hang the others.
        try:
            if self.cfg.async_save:
                future = dcp.async_save(weights, checkpoint_id=tmp / WEIGHTS, process_group=self._async_group(),
                                        no_dist=not dist.is_initialized())
            else:
                dcp.save(weights, checkpoint_id=tmp / WEIGHTS, no_dist=not dist.is_initialized())
                if self.dims.is_main and error is None:
                    self._commit(tmp, final, rest, manifest)
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
            error = error or e
        # NOTE: in place of a barrier: every rank learns whether any rank failed, so all raise
        # together (rank 0's commit fails alone when its disk fills on state.pt or the manifest).
        error = self._agree(step, tmp, error, future)
        if error is not None:
            raise error
        if future is not None and self.dims.is_main:
            self._writer = threading.Thread(target=self._commit_catching, name="lvmtrain-checkpoint",
                                            args=(tmp, final, rest, manifest, future))
            self._writer.start()
        elif future is not None:
            self._pending = (future, step, tmp)
        return final

    def _refuse_nonfinite(self, step: int, weights: dict) -> None:
        """Collective: raise CheckpointError on every rank when any rank holds a NaN or inf weight
        or moment, naming the first ones. Each rank checks only its own tensors (its shards under
        FSDP2), so the ranks agree with one all-reduce, and exchange names only when refusing."""
        bad = nonfinite_tensors(weights)
        flag = torch.tensor([float(bool(bad))], device=self.dims.device)
        if not all_reduce_max(flag).item():
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, bad[:8])
            bad = list(dict.fromkeys(name for names in gathered for name in names))
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        remedy = ("a lower optim.lr, a longer optim.warmup_steps or optim.grad_clip, or train.precision=bf16 / "
                  "fp32 instead of fp16")
        again = (f"resume from it (checkpoint.resume=auto) with {remedy}" if self._previous() else
                 f"start again (run.overwrite=true) with {remedy}")
        raise CheckpointError(
            f"checkpoint step {step} in {self.dir}: not saved: non-finite values (NaN or inf) in {shown}; "
            f"training diverged before this step. {self._previous_text()}; {again}")

    def _agree(self, step: int, tmp: Path, error: BaseException | None, future=None) -> BaseException | None:
        """Collective: None when every rank's part of the save succeeded; else the error this rank
        raises, after rank 0 has removed `tmp`: a CheckpointError naming a full disk when any rank
        saw one, this rank's own error, or one naming the rank that failed."""
        local = None if error is None else (_is_disk_full(error, tmp, self._estimate), _one_line(error))
        gathered = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(local is not None)], device=self.dims.device)
            if not all_reduce_max(flag).item():
                return None
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        failed = [(rank, g) for rank, g in enumerate(gathered) if g is not None]
        if not failed:
            return None
        if future is not None:  # DCP's background write still holds files in `tmp`
            with contextlib.suppress(BaseException):  # the error that counts is the one agreed on
                future.result()
        if self.dims.is_main:
            _remove_partial(tmp)
        barrier()
        if any(full for _, (full, _) in failed):
            return self._no_space(step, tmp, error)
        if error is not None:
            return error
        rank, (_, message) = failed[0]
        return CheckpointError(f"checkpoint step {step} in {self.dir}: not saved: rank {rank} failed: {message}")

    def _failure(self, step: int, tmp: Path, error: BaseException, *, clean: bool) -> BaseException:
        """The error of a background save: named as a full disk when it was one; `tmp` removed
        when `clean` (rank 0, whose thread commits)."""
        full = _is_disk_full(error, tmp, self._estimate)
        if clean:
            _remove_partial(tmp)
        return self._no_space(step, tmp, error) if full else error

    def _no_space(self, step: int, tmp: Path, cause: BaseException | None) -> CheckpointError:
        mount = _mount_point(self.dir)
        free = shutil.disk_usage(mount).free
        previous = self._previous()
        last = f"the last checkpoint was {_gb(previous[1])}" if previous else "no earlier checkpoint to compare"
        error = CheckpointError(
            f"no space left on {mount} writing checkpoint step {step} ({tmp}): needs about "
            f"{_gb(self._estimate)} ({last}), {_gb(free)} free; free space there, or point log.dir "
            f"elsewhere and move the run directory there to resume it. {self._previous_text()}")
        error.__cause__ = cause
        return error

    def _previous(self) -> tuple[str, int] | None:
        """(name, bytes) of the checkpoint `latest` names, if any."""
        try:
            name = (self.dir / "latest").read_text().strip()
            files = json.loads((self.dir / name / MANIFEST).read_text())["files"]
            return name, sum(m["bytes"] for m in files.values())
        except (OSError, ValueError, KeyError):
            return None

    def _previous_text(self) -> str:
        previous = self._previous()
        if previous is None:
            return "This run has no earlier checkpoint"
        return f"The previous checkpoint {self.dir / previous[0]} is intact (`latest` names it)"

    def _async_group(self):
        """A gloo process group for background saves, apart from the training's collectives."""
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def check(self) -> None:
        """Raise the error of a background save that has already failed (cheap: called every step)."""
        if self._pending is not None:
            future, step, tmp = self._pending
            if future.done() and future.exception() is not None:
                self._error = self._failure(step, tmp, future.exception(), clean=False)
                self._pending = None
        if self._error is not None:
            self.wait()

    def wait(self) -> None:
        """Block until a background save is done; raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._pending is not None:
            future, step, tmp = self._pending
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 - raised below, with the others
                self._error = self._failure(step, tmp, e, clean=False)
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {_one_line(error)}") from error

    def _commit_catching(self, tmp: Path, final: Path, state: dict, manifest: dict, future) -> None:
        try:
            self._commit(tmp, final, state, manifest, future)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            # NOTE: state.pt is written before DCP's background write is waited for: let it end
            # before `tmp` is removed under it.
            with contextlib.suppress(BaseException):
                future.result()
            self._error = self._failure(manifest["step"], tmp, e, clean=True)

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

        def choose() -> Path | None:
            if self.cfg.resume != "auto":
                verify(Path(self.cfg.resume))
                return Path(self.cfg.resume)
            found = newest_verified(self.dir, on_skip=lambda _, e: print(
                f"lvmtrain: warning: skipping checkpoint: {e}", file=sys.stderr, flush=True))
            return found and found[0]

        return from_rank0(choose, CheckpointError)

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
    is called with (path, CheckpointError) of each newer one that does not."""
    for path in sorted(checkpoints.glob("step_????????"), reverse=True) if checkpoints.is_dir() else []:
        try:
            return path, verify(path)
        except CheckpointError as e:
            if on_skip is not None:
                on_skip(path, e)
    return None


def nonfinite_tensors(weights: dict) -> list[str]:
    """Names ("model.NAME", "optim.NAME.exp_avg") of the floating-point tensors of `weights`
    (`split_weights`' first part) that hold a NaN or inf, in order; only this rank's part of each
    (its local shard of a DTensor).

    NOTE: min and max of each tensor, not `isfinite(t).all()`: NaN propagates through both and an
    inf is one of them, with no temporary the size of the tensor (0.05 s for ViT-B/16's weights
    and moments on one CPU thread); one device-to-host copy per device for all the results."""
    named = [(f"model.{k}", t) for k, t in weights["model"].items()]
    named += [(f"optim.{k}.{m}", t) for k, moments in weights["optim"].items() for m, t in moments.items()]
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


def _state_bytes(weights: dict) -> int:
    """Bytes the weights and moments take in a checkpoint (a DTensor counts whole, as saved)."""
    tensors = list(weights["model"].values()) + [t for m in weights["optim"].values() for t in m.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


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
