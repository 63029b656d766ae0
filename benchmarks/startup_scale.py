"""Start-up on a LAION-400M-sized layout: memory per process and time to the first batch, 1 and 2 ranks.

    python benchmarks/startup_scale.py [--shards 41408 --seed 0 --workers 2 --batch 16 --steps 3]

The layout: a dataset index of 41,408 shard entries with img2dataset-like counts (uniformly
9,500..10,000 samples, ~404M in all, seeded), of which only the shards the runs can read exist on
disk. Those are found with the real order: `ShardSet.from_spec(index)` and `train_order(...)` give
the sample indices of epoch 0's positions [0, 40 global batches of the 2-rank run) (the 3 steps,
the pre-flight's 4 global batches and the loaders' prefetch fit many times; the order does not
depend on the world size, so the 1-rank run reads a prefix of the same positions), and
`ShardSet.locate` maps them to shards. The counts are never changed to fit: each needed shard is
a copy of one real template shard (`write_shard`: 10,000 Fashion-MNIST 28 px PNGs with a `.cls`
label) cut after its first COUNT samples and closed with the tar's end blocks, and its sidecar is
the scan of that copy, written after it (a sidecar older than its shard is ignored).
Every other entry is checked to be absent, and every run must log no bad sample or shard
(metrics.jsonl `data/*` all 0) and print no data warning: a process that opened an absent shard
says so on stderr (also for a prefetched batch never trained on, which the counts miss). So each
run read only the index and the shards it trains on.

Runs `lvmtrain train configs/debug/vit.yaml` on the index (no evaluation, W&B off) as one plain
process and under torchrun with 2 ranks, and measures:
- first batch: seconds from launching the command to rank 0 logging step 1 (the `time` of its
  metrics.jsonl line: imports, index read and broadcast, model, pre-flight, loader workers
  started, the first batch decoded and trained on; under DDP every rank has finished step 1);
- memory: the launched process tree is polled every 0.1 s through /proc; for each process its
  peak RSS (the larger of the polled VmRSS and the kernel's VmHWM), as torchrun agent, rank
  (a process of `lvmtrain train`) or loader worker (a child of a rank); and per rank the peak sum
  of Pss over it and its workers, since RSS counts the pages a worker shares with its rank since
  the fork in both.
Asserts: every process (agent, ranks, workers) under 1 GB (10^9 bytes) RSS, the first batch
within 60 s, in both runs. Also prints what rank 0 reads and broadcasts: the time of
`ShardSet.from_spec(index)` in this process and the pickled ShardSet. Takes ~30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from _proc import kb_fields

from lvmtrain.config.schema import DataConfig
from lvmtrain.data.build import load_demo_source
from lvmtrain.data.dataset_index import FORMAT, VERSION
from lvmtrain.data.loader import train_order
from lvmtrain.data.shards import ShardSet
from lvmtrain.data.tarindex import Sample, index_path, scan_shard, write_index
from lvmtrain.data.writer import write_shard

from _torchrun import free_port

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_SAMPLES = 10_000
RANKS = (1, 2)
READ_LIMIT_BATCHES = 40  # global batches of epoch 0 (of the largest run) whose shards exist
RSS_LIMIT, FIRST_BATCH_LIMIT = 1e9, 60.0
RUN_TIMEOUT_S = 240


def write_template(folder: Path) -> tuple[Path, list[Sample]]:
    """One real shard of TEMPLATE_SAMPLES 28 px PNG + `.cls` samples; returns where each landed."""
    _, _, (images, labels), _ = load_demo_source()

    def samples():
        for i in range(TEMPLATE_SAMPLES):
            buf = BytesIO()
            Image.fromarray(images[i % len(images)]).save(buf, format="PNG")
            yield f"{i:09d}", {"png": buf.getvalue(), "cls": str(int(labels[i % len(labels)]))}

    path = folder / "template.tar"
    return path, write_shard(path, samples(), sidecar=False)


def write_dataset_index(path: Path, counts: np.ndarray) -> list[str]:
    """The dataset index (dataset_index.py's format) of shards `shards/NNNNN.tar`; their names."""
    names = [f"{i:05d}.tar" for i in range(len(counts))]
    doc = {"format": FORMAT, "version": VERSION, "base": "shards/", "sidecars": "shards/",
           "shards": [[name, int(n)] for name, n in zip(names, counts)], "problems": [],
           "samples": int(counts.sum())}
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return names


def needed_shards(index: Path, data: DataConfig, seed: int, positions: int) -> list[int]:
    """Shards holding the samples at epoch 0's positions [0, positions), by the trainer's own order."""
    shard_set = ShardSet.from_spec(str(index))
    indices = train_order(shard_set, data, seed, 0).slice(0, positions)
    return sorted({shard_set.locate(int(i))[0] for i in indices})


def write_cut_shard(template: Path, samples: list[Sample], count: int, path: Path) -> None:
    """The template's first `count` samples as a tar of their own, then its sidecar (scanned from it)."""
    end = max(offset + (size + 511) // 512 * 512 for s in samples[:count] for offset, size in s.files.values())
    with open(template, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(end))
        dst.write(bytes(1024))  # the tar's two zero end blocks
    scanned, problem = scan_shard(str(path))
    assert problem is None and len(scanned) == count, f"{path}: cut copy holds {len(scanned)} samples, {problem}"
    write_index(index_path(path), scanned)


class TreeMonitor:
    """Polls the memory of a process and its descendants (through /proc) until stopped.

    `rank_depth`: how deep below the launched process the ranks are (0: it is the rank; 1: it is
    torchrun's agent and its children are ranks); deeper processes are loader workers.
    """

    def __init__(self, root: int, rank_depth: int, every_s: float = 0.1):
        self.root, self.rank_depth, self.every_s = root, rank_depth, every_s
        self.peak_rss: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self.rank_of: dict[int, int] = {}  # rank or worker pid -> its rank's pid
        self.group_pss: dict[int, int] = {}  # rank pid -> peak Pss of it and its workers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.every_s)

    def _poll(self) -> None:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:  # exited since the listing
                    continue
                children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry.name))
        walk, pss = [(self.root, 0, None)], {}
        while walk:
            pid, depth, rank = walk.pop()
            if depth == self.rank_depth:
                rank = pid
            self.role.setdefault(pid, "agent" if depth < self.rank_depth else
                                 "rank" if depth == self.rank_depth else "worker")
            status = kb_fields(f"/proc/{pid}/status")
            rss = max(status.get("VmRSS", 0), status.get("VmHWM", 0))
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)
            if rank is not None:
                self.rank_of[pid] = rank
                pss[rank] = pss.get(rank, 0) + kb_fields(f"/proc/{pid}/smaps_rollup").get("Pss", 0)
            walk += [(child, depth + 1, rank) for child in children.get(pid, ())]
        for rank, total in pss.items():
            self.group_pss[rank] = max(self.group_pss.get(rank, 0), total)



def run_train(ranks: int, index: Path, logs: Path, args: argparse.Namespace) -> dict:
    """One `lvmtrain train` run under the monitor; its time to step 1, memory and bad-sample counts."""
    name = f"ranks{ranks}"
    train_args = ["train", "configs/debug/vit.yaml", f"data.train={index}", "data.val=",
                  f"data.workers={args.workers}", f"data.batch_size={args.batch}", f"train.steps={args.steps}",
                  "train.epochs=0", "log.every=1", "checkpoint.every=0", "log.wandb=disabled",
                  f"train.seed={args.seed}", f"log.dir={logs}", f"run.name={name}"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "lvmtrain", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "lvmtrain", *train_args]
    out, err = open(logs / f"{name}.out", "w"), open(logs / f"{name}.err", "w")
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    monitor = TreeMonitor(proc.pid, rank_depth=0 if ranks == 1 else 1)
    try:
        code = proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = f"still running after {RUN_TIMEOUT_S} s"
    finally:
        if proc.poll() is None:  # timed out or interrupted: its own session holds its ranks and workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        monitor.stop()
        out.close()
        err.close()
    stderr = (logs / f"{name}.err").read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr[-5000:]}")
    metrics = [json.loads(line) for line in (logs / name / "metrics.jsonl").read_text().splitlines()]
    step1 = next(m for m in metrics if m["step"] == 1 and "loss" in m)
    bad = {k: v for m in metrics for k, v in m.items() if k.startswith("data/") and v}
    warnings = [line for line in stderr.splitlines()
                if line.startswith(("lvmtrain: warning", "lvmtrain: skipping", "lvmtrain: pre-flight"))]
    return {"ranks": ranks, "first_batch_s": step1["time"] - launched, "monitor": monitor, "bad": bad,
            "warnings": warnings}


def report(run: dict) -> list[str]:
    """Print one run's figures; returns the targets it missed."""
    m: TreeMonitor = run["monitor"]
    by_role = {role: [m.peak_rss[p] for p in m.role if m.role[p] == role] for role in ("agent", "rank", "worker")}
    print(f"{run['ranks']} rank(s): first batch (launch -> step 1 logged) {run['first_batch_s']:.1f} s "
          f"= {run['first_batch_s'] / FIRST_BATCH_LIMIT:.2f} of the {FIRST_BATCH_LIMIT:.0f} s target")
    for role, peaks in by_role.items():
        if peaks:
            each = ", ".join(f"{p / 1e6:.0f}" for p in sorted(peaks))
            print(f"  {role:6} x{len(peaks)}: peak RSS max {max(peaks) / 1e6:6.0f} MB "
                  f"= {max(peaks) / RSS_LIMIT:.2f} of 1 GB (each: {each})")
    for rank, pss in sorted(m.group_pss.items()):
        workers = sum(1 for p, r in m.rank_of.items() if r == rank and p != rank)
        print(f"  rank pid {rank} + its {workers} workers: peak Pss sum {pss / 1e6:.0f} MB")
    print(f"  data/* counts in metrics.jsonl: {run['bad'] or 'all 0'}; warnings on stderr: {len(run['warnings'])}")
    missed = []
    if run["first_batch_s"] >= FIRST_BATCH_LIMIT:
        missed.append(f"{run['ranks']} rank(s): first batch after {run['first_batch_s']:.1f} s")
    heavy = [(m.role[p], p, rss) for p, rss in m.peak_rss.items() if rss >= RSS_LIMIT]
    missed += [f"{run['ranks']} rank(s): {role} pid {p} peaked at {rss / 1e6:.0f} MB RSS" for role, p, rss in heavy]
    if run["bad"] or run["warnings"]:
        missed.append(f"{run['ranks']} rank(s): read data it should not have: {run['bad']} {run['warnings'][:3]}")
    return missed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=41_408)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="startup_scale-"))
    try:
        index = tmp / "laion400m-index.json"
        counts = np.random.default_rng(args.seed).integers(9_500, 10_001, args.shards)
        names = write_dataset_index(index, counts)
        template, samples = write_template(tmp)
        # NOTE: the trainer's DataConfig with this benchmark's overrides: the order depends on them.
        data = DataConfig(train=str(index), batch_size=args.batch, workers=args.workers)
        needed = needed_shards(index, data, args.seed, READ_LIMIT_BATCHES * max(RANKS) * args.batch)
        (tmp / "shards").mkdir()
        for shard in needed:
            write_cut_shard(template, samples, int(counts[shard]), tmp / "shards" / names[shard])
        template.unlink()
        present = sorted(f.name for f in (tmp / "shards").iterdir())
        expected = sorted([names[s] for s in needed] + [names[s] + ".idx.json" for s in needed])
        assert present == expected, f"shards/ should hold only the {len(needed)} needed shards and their sidecars"
        print(f"layout: {args.shards:,} shard entries, {int(counts.sum()):,} samples in the index "
              f"({index.stat().st_size / 1e6:.1f} MB); {len(needed)} shards exist (those holding epoch 0's first "
              f"{READ_LIMIT_BATCHES} global batches of the {max(RANKS)}-rank run), the other "
              f"{args.shards - len(needed):,} do not ({time.perf_counter() - started:.0f} s to build)")

        t = time.perf_counter()
        shard_set = ShardSet.from_spec(str(index))
        read_s = time.perf_counter() - t
        pickled = len(pickle.dumps(shard_set))
        print(f"rank 0 reads the index (ShardSet.from_spec, warm page cache): {read_s:.2f} s; pickled ShardSet "
              f"(what it broadcasts) {pickled / 1e6:.2f} MB; state_bytes() / shard = "
              f"{shard_set.state_bytes() / args.shards:.1f} B")

        missed = []
        for ranks in RANKS:
            missed += report(run_train(ranks, index, tmp, args))
        print(f"total {time.perf_counter() - started:.0f} s")
        if missed:
            raise SystemExit("FAIL: " + "; ".join(missed))
        print(f"PASS: every process under 1 GB RSS and the first batch within {FIRST_BATCH_LIMIT:.0f} s, "
              f"{' and '.join(map(str, RANKS))} ranks, reading only the index and the shards trained on")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
