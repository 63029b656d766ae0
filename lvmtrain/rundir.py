"""The run directory: one job owns it, a resume honours its config, each segment's config is kept.

`log.dir/run.name/` holds:
    .lock                  held (POSIX lock) by rank 0 of the job training into it; names its holder
    config.yaml            the resolved config of the newest accepted segment
    config_history.jsonl   one line per segment: when, from which step, on how many ranks, its config
A resume compares the checkpoint's config with this run's key by key (schema.RESUMABLE says what
may differ) before anything in the directory is written.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from lvmtrain.config.loader import config_to_dict, flatten, save_config
from lvmtrain.config.schema import Config, ConfigError, may_change_on_resume

LOCK = ".lock"
HISTORY = "config_history.jsonl"


class RunBusy(ConfigError):
    """Another job holds the run directory."""


class RunFinished(ConfigError):
    """The run already trained every step it is asked to."""


class RunLock:
    """An exclusive lock on `run_dir/.lock`, held for the life of this process.

    NOTE: a POSIX record lock (lockf), which NFS and Lustre honour across nodes, unlike flock on
    some of them; the kernel releases it when the process dies however it dies (kill -9, node
    reboot on NFS via lease expiry), so a stale file never blocks a restart.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = self.path.read_text().strip() or "another process"
            raise RunBusy(f"{self.path.parent} is in use by {holder}: another job is training into it. "
                          f"Wait for it or stop it, or pick another run.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd


def die_with_launcher() -> None:
    """Under torchrun, end this rank when its launcher dies: an orphaned rank would go on writing
    checkpoints into a run directory that the user, seeing the launcher gone, restarts.

    NOTE: PR_SET_PDEATHSIG signals when the parent exits, however it exits (kill -9 included);
    SIGKILL, since a save in flight must not become `latest` anyway (it is committed atomically).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before the call: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def resume_differences(saved: dict, current: dict, allowed: list[str]) -> list[str]:
    """Dotted keys whose value differs between two resolved configs and may not (`old -> new`)."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(config_to_dict(Config()))
    # NOTE: a key the saved config lacks (added by a later lvmtrain) at its default changes nothing
    return [f"{k} ({old.get(k, '-')!r} -> {new.get(k, '-')!r})" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not may_change_on_resume(k, allowed)
            and not (k not in old and new.get(k) == defaults.get(k))]


def check_resume(cfg: Config, checkpoint: Path, saved: dict, saved_world: int, *, world: int,
                 global_batch: int, total_steps: int, step: int) -> None:
    """Refuse a resume that would not continue the checkpoint's run, naming every key at fault."""
    current = config_to_dict(cfg)
    problems = resume_differences(saved, current, cfg.run.allow_changes)
    saved_global = saved["data"]["batch_size"] * saved_world * saved["train"]["grad_accum_steps"]
    if saved_global != global_batch and "data.batch_size" not in cfg.run.allow_changes:
        problems.append(f"global batch ({saved_global} = {saved['data']['batch_size']} x {saved_world} ranks x "
                        f"{saved['train']['grad_accum_steps']} -> {global_batch} = {cfg.data.batch_size} x {world} x "
                        f"{cfg.train.grad_accum_steps})")
    run_dir = checkpoint.parent.parent
    if problems:
        raise ConfigError(
            f"{run_dir}: {checkpoint.name} was trained with another config: {'; '.join(problems)}. Resume it with "
            f"its own config ({run_dir / 'config.yaml'}), or pick another run.name (leaving run.name out names the "
            f"run after the config), or start over with run.overwrite=true; keys you mean to change can be "
            f"listed in run.allow_changes")
    if step >= total_steps:
        raise RunFinished(f"{run_dir} has already trained {step} of {total_steps} steps ({checkpoint.name}); "
                          f"to train further raise train.steps or train.epochs, or pick another run.name")


def record_segment(cfg: Config, run_dir: Path, *, step: int, world: int) -> None:
    """Write `config.yaml` (the accepted config) and add this segment to the history."""
    save_config(cfg, run_dir / "config.yaml")
    line = {"time": time.time(), "from_step": step, "world_size": world, "config": config_to_dict(cfg)}
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(line) + "\n")


def clear_run_dir(run_dir: Path) -> None:
    """`run.overwrite`: delete everything of the old run but the lock this job holds."""
    for entry in run_dir.iterdir() if run_dir.is_dir() else ():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
