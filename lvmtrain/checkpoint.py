"""CheckpointManager: when to save, atomic commit, retention, verification, finding the resume point.

Layout of a run's `checkpoints/`:
    step_00000040/   weights/ (torch.distributed.checkpoint: the parts' sharded tensors, e.g. the
                               strategy's model weights and Adam moments by parameter name, each
                               rank writing its own shards; loads resharded onto any world size
                               and any backend)
                     state.pt (the parts' other state: schedule, optimizer hyper-parameters, task,
                               data cursor, counters: rank 0)
                     rank00000.pt ... (each rank's RNG states)
                     manifest.json (written last: step, world size, backend, config hash, every
                                    file's size and sha256, versions)
    latest           name of the newest complete checkpoint, replaced atomically
A checkpoint is written under `step_X.tmp/`, fsynced, and renamed only once complete, `latest`
last; a kill at any moment leaves the previous checkpoint as the newest complete one. Loading
verifies every file against the manifest; `resume=auto` skips (and names) a damaged checkpoint
and takes the one before.

The manager knows no part's layout: it saves a dict of named stateful parts (each part's
`state_dict()`, or a plain counter), sending whatever a part puts under `SHARDED` through DCP.

A save that cannot complete leaves nothing behind: a full disk is named as such (with the space
needed and free), the partial `step_X.tmp/` is removed, and `latest` keeps naming the previous
checkpoint. A state holding NaN or inf is never saved: every rank refuses together, before writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import lvmtrain
from lvmtrain.config.schema import CheckpointConfig
from lvmtrain.distributed.dims import Dims, all_reduce_max, barrier, from_rank0
from lvmtrain.metrics import due
from lvmtrain.checkpoint_files import (  # noqa: F401 - re-exported: the files' API
    MANIFEST, SHARDED, STATE, WEIGHTS, CheckpointError, _atomic_write_text, _crash_point, _fsync_dir, _gb, _is_disk_full,
    _mount_point, _one_line, _remove_partial, _sha256, _state_bytes, _write, newest_verified, nonfinite_tensors,
    rng_state, set_rng_state, split_sharded, verify)


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
        self._estimate = 0  # bytes of the sharded tensors (weights, moments) of the save in progress

    def should_save(self, step: int, total_steps: int) -> bool:
        """Collective when `checkpoint.every_minutes` is set: ranks' clocks differ, so a save is
        due on all ranks as soon as it is due on one."""
        if due(step, self.cfg.every, total_steps):
            return True
        if self.cfg.every_minutes <= 0:
            return False
        late = torch.tensor([float(time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes)],
                            device=self.dims.device)
        return bool(all_reduce_max(late).item())

    def save(self, step: int, state: dict) -> Path:
        """Collective: every rank calls it with the run's named parts' states ({name: the part's
        `state_dict()` or a plain value}). The parts' `SHARDED` tensors go through DCP, every rank
        writing its shards; the rest (small) is written by rank 0; RNG per rank.

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
        sharded, rest = split_sharded(state)
        self._refuse_nonfinite(step, sharded)
        self._estimate = _state_bytes(sharded)
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
                future = dcp.async_save(sharded, checkpoint_id=tmp / WEIGHTS, process_group=self._async_group(),
                                        no_dist=not dist.is_initialized())
            else:
                dcp.save(sharded, checkpoint_id=tmp / WEIGHTS, no_dist=not dist.is_initialized())
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

    def _refuse_nonfinite(self, step: int, sharded: dict) -> None:
        """Collective: raise CheckpointError on every rank when any rank holds a NaN or inf weight
        or moment, naming the first ones. Each rank checks only its own tensors (its shards under
        FSDP2), so the ranks agree with one all-reduce, and exchange names only when refusing."""
        bad = nonfinite_tensors(sharded)
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

    def load(self, path: Path, templates: dict[str, dict]) -> dict:
        """The state of checkpoint `path`: its parts as saved, the sharded tensors of each part
        in `templates` ({name: the part's `load_template()`: this run's shapes and placements})
        read into that template, so DCP reshards them from whatever world size and backend saved
        them; "rng": this rank's RNG states when it saved some (None on a rank the saving run did
        not have), for the caller to restore right before training goes on. Collective."""
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        sharded, _ = split_sharded(templates)
        dcp.load(sharded, checkpoint_id=path / WEIGHTS, no_dist=not dist.is_initialized())
        for name, template in templates.items():
            state[name] = {**state.get(name, {}), SHARDED: {k: sharded[k] for k in template.get(SHARDED, {})}}
        own = path / f"rank{self.dims.rank:05d}.pt"
        state["rng"] = torch.load(own, weights_only=True)["rng"] if own.exists() else None
        return state

    def _retain(self) -> None:
        """Keep the newest `keep`, and every checkpoint whose step is a multiple of `keep_every`."""
        done = sorted(self.dir.glob("step_????????"))
        for old in done[:-self.cfg.keep]:
            step = int(old.name.removeprefix("step_"))
            if not (self.cfg.keep_every and step % self.cfg.keep_every == 0):
                shutil.rmtree(old, ignore_errors=True)
