"""The stop-signal agreement: every rank answers the same at the same step, without a blocking
collective on the training loop's path (issue: GPU, a faster step)."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

from tests.conftest import spawn_ranks

STEPS = 6


def _rank(rank: int, world: int, port: int, signal_rank: int, signal_step: int, out) -> None:
    from lvmtrain.preemption import StopRequest

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stop = StopRequest()
    answers = []
    for step in range(1, STEPS + 1):
        if rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, noted by the real handler
        answers.append(stop.poll())
    stop.close()
    stop.restore()
    out.put((rank, answers))
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_stops_at_the_same_step_one_after_the_signal():
    answers = spawn_ranks(_rank, 3, 2, 3)
    # noted on rank 2 during step 3; every rank reads the agreement at step 4, none earlier
    expected = [None, None, None, "SIGUSR1", "SIGUSR1", "SIGUSR1"]
    assert answers == {0: expected, 1: expected, 2: expected}


def test_one_process_answers_at_once():
    from lvmtrain.preemption import StopRequest

    stop = StopRequest()
    try:
        assert stop.poll() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.poll() == "SIGUSR1"
    finally:
        stop.close()
        stop.restore()

