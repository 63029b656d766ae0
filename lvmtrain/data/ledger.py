"""What the data did: bad-sample counts (with the error budget) and the opt-in sample ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lvmtrain.data.batch import Batch
from lvmtrain.data.shards import DataError
from lvmtrain.distributed.dims import all_reduce_max, all_reduce_sum

BAD_KINDS = ("missing_image", "bad_image", "missing_caption", "bad_caption", "missing_label", "bad_label",
             "unreadable_sample", "missing_sample")


class BadSampleCounter:
    """Counts skipped samples per kind on this rank; `totals()` sums them over ranks (collective)
    and stops the run when they exceed `max_fraction` of the samples seen."""

    def __init__(self, max_fraction: float, shard_problems: list[tuple[str, str, str]], device: torch.device):
        self.max_fraction = max_fraction
        self.device = device
        self.counts = dict.fromkeys(BAD_KINDS, 0)
        self.shard_counts = {"unreadable_shard": 0, "truncated_shard": 0}
        for _, kind, _ in shard_problems:
            self.shard_counts[kind] += 1

    def update(self, batch: Batch) -> None:
        for skipped in batch.skipped:
            self.counts[skipped["kind"]] += 1

    def totals(self, samples_seen: int) -> dict[str, int]:
        totals = {f"data/{k}": int(v) for k, v in self.state_dict().items()}
        bad = sum(totals.values())
        totals.update({f"data/{k}": v for k, v in self.shard_counts.items()}, **{"data/bad_samples": bad})
        # NOTE: a bad sample's slot is filled with a good one, so samples_seen counts every sample read.
        if samples_seen and bad / samples_seen > self.max_fraction:
            worst = max(BAD_KINDS, key=lambda k: totals[f"data/{k}"])
            raise DataError(f"{bad} bad samples among {samples_seen} read ({bad / samples_seen:.2%}), "
                            f"more than data.max_bad_fraction={self.max_fraction} (most: {worst}); the first "
                            "ones are named above. Run `lvmtrain data check` on data.train, or raise the budget")
        return totals

    def state_dict(self) -> dict:
        """The counts summed over ranks (collective), so the state is world-size independent."""
        summed = all_reduce_sum(torch.tensor(list(self.counts.values()), dtype=torch.int64, device=self.device))
        return dict(zip(self.counts, summed.tolist()))

    def load_state_dict(self, state: dict, *, rank: int) -> None:
        if rank == 0:  # the totals so far live on rank 0; the others count from zero
            self.counts.update(state)


class SampleLedger:
    """`run_dir/ledger/rank{R}.jsonl`: one line per optimizer step with the keys this rank
    trained on (and the ones it skipped), for audits, loss-spike hunts and our resume tests.

    Each line carries the attempt that wrote it (`attempt`: the start time of that process group,
    `since`: the step it resumed from). A later attempt that resumed from step k supersedes the
    lines of earlier attempts after step k; `read_ledger` applies that rule.
    """

    def __init__(self, run_dir: Path, rank: int, since: int, device: torch.device):
        self.path = run_dir / "ledger" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = torch.tensor([time.time_ns() // 1000], dtype=torch.int64, device=device)
        self.attempt = int(all_reduce_max(stamp).item())  # one id shared by every rank
        self.since = since

    def record(self, step: int, micro_batches: list[Batch]) -> None:
        entry = {"step": step, "epoch": micro_batches[-1].cursor[0], "attempt": self.attempt,
                 "since": self.since, "keys": [k for b in micro_batches for k in b.keys],
                 "shards": [s for b in micro_batches for s in b.shards],
                 "skipped": [s for b in micro_batches for s in b.skipped]}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def read_ledger(run_dir: Path) -> dict[int, list[str]]:
    """{step: keys trained at that step by all ranks, in rank order}, as finally trained."""
    entries = [(int(p.stem[4:]), json.loads(line)) for p in sorted((run_dir / "ledger").glob("rank*.jsonl"))
               for line in p.read_text().splitlines()]
    since = {e["attempt"]: e["since"] for _, e in entries}
    final: dict[int, dict[int, list[str]]] = {}
    for rank, e in entries:
        superseded = any(since[a] < e["step"] for a in since if a > e["attempt"])
        if not superseded:
            final.setdefault(e["step"], {})[rank] = e["keys"]
    return {step: [k for rank in sorted(ranks) for k in ranks[rank]] for step, ranks in sorted(final.items())}
