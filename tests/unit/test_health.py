"""Loss spikes are judged on the device against a window of past losses; a spike or NaN does
not enter the history it is judged against."""

import math

import torch

from lvmtrain.health.nonfinite import LossSpikes, NonfiniteSteps


def test_a_spike_is_flagged_once_the_window_is_full_and_stays_out_of_the_history():
    spikes = LossSpikes(z=4.0, window=10, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    losses = [2.0 + 0.05 * torch.randn((), generator=g).item() for _ in range(30)]
    losses[5] = 50.0  # before a full window: no verdict
    losses[20], losses[21], losses[25] = 50.0, float("nan"), 2.3
    verdicts = [bool(spikes(torch.tensor(x))) for x in losses]
    assert [i for i, v in enumerate(verdicts) if v] == [20, 25]  # 2.3: six standard deviations up
    assert verdicts[20] and not verdicts[21]  # NaN: the non-finite check's business, not a spike
    assert torch.isfinite(spikes.history).all() and spikes.history.max() < 3  # 50 and NaN never entered


def test_bad_steps_are_noted_without_a_host_read_and_agreed_with_their_kind():
    steps = NonfiniteSteps(torch.device("cpu"), max_events=2, window=100)
    ok, nan = torch.tensor(1.0), torch.tensor(math.nan)
    steps.note(1, ok, ok, ["a"], spike=torch.tensor(False))
    steps.note(2, ok, ok, ["b"], spike=torch.tensor(True))
    steps.note(3, nan, ok, ["c"], spike=torch.tensor(False))
    assert steps.agree() == (2, 2, True) and steps.keys_of(2) == ["b"]
    steps.reset()
    steps.note(4, ok, nan, ["d"])
    assert steps.agree() == (4, 1, False)
    assert not steps.too_many(4, [2, 4]) and steps.too_many(5, [5])  # 3 events > 2 within the window
    steps.reset()
    steps.note(6, ok, None, ["e"])  # fp16: an overflowing gradient is the loss scaler's business
    steps.note(7, nan, None, ["f"])  # a NaN loss is not
    assert steps.agree() == (7, 1, False)
    assert not steps.too_many(200, [])  # the window moved past them


def test_spiking_steps_are_skipped_in_a_run(tmp_path, shards, capsys):
    """A z-score threshold no loss can stay under: every judged step is a spike, its update dropped."""
    from lvmtrain.config import load_config
    from lvmtrain.trainer import Trainer
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "configs/debug/vit.yaml"), [
        f"data.train={shards['train']}", "data.val=", "data.workers=0", "data.batch_size=8", "train.steps=6",
        "train.epochs=0", "log.every=1", "log.wandb=disabled", "checkpoint.every=0", f"log.dir={tmp_path}",
        "run.name=r", "health.spike_zscore=1e-9", "health.spike_window=3", "health.nan_max_events=100",
        "optim.warmup_steps=0"])
    trainer = Trainer(cfg)
    model = trainer.strategy.unwrapped()
    weights = {}  # before step n: the weights after step n - 1
    trainer.step_hooks.append(lambda n: weights.__setitem__(n, [p.detach().clone() for p in model.parameters()]))
    trainer.train()
    weights[7] = [p.detach().clone() for p in model.parameters()]
    spiked = [line for line in capsys.readouterr().err.splitlines() if "the loss spiked at step" in line]
    steps = {int(line.split("spiked at step ")[1].split()[0]) for line in spiked}
    assert steps and min(steps) > 3 and "its update was skipped" in spiked[0]  # none judged before a full window
    for n in (4, 5, 6):  # a spiking step changed nothing; the others trained
        unchanged = all(torch.equal(a, b) for a, b in zip(weights[n], weights[n + 1]))
        assert unchanged == (n in steps), n
