"""Hang detection (`health.hang_timeout_s`): a watchdog thread per rank.

The training loop `beat`s after every step. Each rank's thread also posts a heartbeat (its last
step, and that it is alive) to the job's rendezvous store every few seconds, on a client of its
own with a short timeout. When a step has run past the timeout, the rank that sees it first
reads every heartbeat and names the ranks that went silent (stopped, dead) or fell behind, tells
every rank through the store to dump, makes silent ranks on its own host dump too (SIGQUIT, then
SIGCONT: a stopped process runs its faulthandler dump as it wakes), writes its own stacks and
exits with `EXIT_HANG`. The main thread may be blocked in a collective for good: the thread
needs neither it nor the GIL-free collective to return.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

EXIT_HANG = 43  # torchrun restarts any failure; slurm/train.sbatch requeues this one (the job resumes)
DUMP_SIGNAL = signal.SIGQUIT  # as the JVM's thread dump: a rank's stacks into its RUN/hang/ file


def _store(timeout_s: float):
    """A client of the launcher's store (torchrun's agent, or rank 0's under Slurm) of its own,
    whose calls give up after `timeout_s` (the training's client waits 30 min)."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                           wait_for_workers=False)
    # NOTE: torchrun's agent keeps its store across restarts: keys of the run that hung must not
    # reach the restarted one (its first poll would read "hang" and end it)
    generation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"lvmtrain/health/{generation}/", client)


class Watchdog:
    """`beat(step)` after each step; `allow(factor)` around evaluation and saves; `close()`.
    With a timeout of 0 it does nothing."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int, world: int):
        self.timeout, self.rank, self.world = timeout_s, rank, world
        self.interval = max(0.5, min(5.0, timeout_s / 4))
        # NOTE: the first step (loader workers starting, a cold torch.compile) gets 10x as well
        self.step, self.last, self.factor = 0, time.monotonic(), 10.0
        self.enabled = timeout_s > 0
        if not self.enabled:
            return
        self.dir = Path(run_dir) / "hang"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank{rank:05d}.txt"
        self.file = open(self.path, "a")  # noqa: SIM115 - faulthandler writes to its descriptor until close()
        faulthandler.register(DUMP_SIGNAL, file=self.file, all_threads=True, chain=False)
        self.store = _store(max(2.0, 2 * self.interval)) if world > 1 else None
        if self.store is not None:
            self.store.set(f"pid/{rank}", f"{socket.gethostname()} {os.getpid()}")
            self.store.set(f"beat/{rank}", f"0 {time.time()}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lvmtrain-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last, self.factor = step, time.monotonic(), 1.0

    @contextlib.contextmanager
    def allow(self, factor: float = 10.0):
        """A phase (evaluation, a save) that may take `factor` x the timeout."""
        self.last, self.factor = time.monotonic(), factor
        try:
            yield
        finally:
            self.last, self.factor = time.monotonic(), 1.0

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)
        faulthandler.unregister(DUMP_SIGNAL)
        self.file.close()
        if self.path.stat().st_size == 0:  # a healthy run leaves no files behind
            self.path.unlink()
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    # --- the thread ---
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.store is not None:
                    self.store.set(f"beat/{self.rank}", f"{self.step} {time.time()}")
                    if self.store.check(["hang"]):
                        self._dump_and_exit(self.store.get("hang").decode(), detector=False)
            except Exception:  # noqa: BLE001 - a store that stopped answering: the timer below still runs
                pass
            stalled = time.monotonic() - self.last
            if stalled > self.timeout * self.factor:
                self._hang(stalled)

    def _hang(self, stalled: float) -> None:
        if self.store is not None and not self._first_to_see():
            # NOTE: one rank reads the heartbeats (at 4,096 ranks every rank doing so would be 16M
            # store reads at once); the others wait for its verdict, then dump with it
            deadline = time.monotonic() + 10 * self.interval
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if self.store.check(["hang"]):
                        self._dump_and_exit(self.store.get("hang").decode(), detector=False)
                time.sleep(self.interval / 4)
        diagnosis, silent = self._diagnosis()
        message = (f"hang: no step finished for {stalled:.0f} s after step {self.step} "
                   f"(health.hang_timeout_s={self.timeout:g}); {diagnosis}")
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set("hang", message)
            self._wake_local(silent)  # NOTE: after "hang" is set: a woken rank dumps, it does not diagnose
        self._dump_and_exit(message, detector=True)

    def _first_to_see(self) -> bool:
        try:
            return self.store.add("detectors", 1) == 1
        except Exception:  # noqa: BLE001 - the store is gone: diagnose alone
            return True

    def _diagnosis(self) -> tuple[str, list[int]]:
        """(What the ranks are doing, the ranks that went silent: no heartbeat for 3 intervals.)"""
        if self.store is None:
            return "one rank: its stacks show where it waits", []
        now, beats, silent = time.time(), {}, []
        for r in range(self.world):
            try:  # NOTE: check first: a get of a key never posted would wait out the store's timeout
                if not self.store.check([f"beat/{r}"]):
                    raise KeyError(r)
                step, at = self.store.get(f"beat/{r}").decode().split()
                beats[r] = (int(step), float(at))
            except Exception:  # noqa: BLE001 - never posted, or the store is gone
                beats[r] = None
        for r, beat in beats.items():
            if r != self.rank and (beat is None or now - beat[1] > 3 * self.interval):
                silent.append(r)
        if silent:
            ages = ", ".join(f"rank {r} ({self._where(r)}): " + ("no heartbeat" if beats[r] is None else
                             f"silent for {now - beats[r][1]:.0f} s after step {beats[r][0]}") for r in silent)
            return f"not answering (stopped or dead): {ages}", silent
        steps = {r: b[0] for r, b in beats.items() if b is not None}
        behind = [r for r, s in steps.items() if s < max(steps.values())]
        if behind:
            return "behind the others (stuck outside collectives, e.g. waiting for data): " + ", ".join(
                f"rank {r} at step {steps[r]}" for r in behind), []
        return (f"every rank is alive at step {self.step}: a collective that does not return, or every "
                "rank waits (for data?); see the stacks"), []

    def _where(self, rank: int) -> str:
        with contextlib.suppress(Exception):
            host, pid = self.store.get(f"pid/{rank}").decode().split()
            return f"pid {pid} on {host}"
        return "unknown pid"

    def _wake_local(self, ranks: list[int]) -> None:
        """A stopped process on this host dumps its stacks as it wakes (the signal is pending)."""
        for r in ranks:
            with contextlib.suppress(Exception):
                host, pid = self.store.get(f"pid/{r}").decode().split()
                if host == socket.gethostname():
                    os.kill(int(pid), DUMP_SIGNAL)
                    os.kill(int(pid), signal.SIGCONT)

    def _dump_and_exit(self, message: str, detector: bool) -> None:
        self.file.write(f"{message}\nrank {self.rank}: last finished step {self.step}\n")
        self.file.flush()
        faulthandler.dump_traceback(self.file, all_threads=True)
        self.file.flush()
        if detector or self.rank == 0:  # the message reaches rank 0's log, whoever saw the hang
            print(f"lvmtrain: {message}; stacks: {self.dir}", file=sys.stderr, flush=True)
        if detector:  # NOTE: the others dump when they next poll the store: give them the time
            time.sleep(2 * self.interval)
        os._exit(EXIT_HANG)
