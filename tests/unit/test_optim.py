"""No-decay groups, the warmup + cosine schedule, and a few steps in every precision."""

import math

import pytest
import torch

from lvmtrain.config.schema import OptimConfig
from lvmtrain.models.registry import build_model
from lvmtrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.mark.parametrize("name", ["vit_debug", "clip_debug"])
def test_no_decay_on_norms_biases_embeddings_and_logit_scale(name):
    model = build_model(name)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all(n.endswith(".bias") or "norm" in n or "pos_embed" in n or n.endswith("cls_token")
               or n == "logit_scale" for n in skipped), skipped
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert any("pos_embed" in n for n in skipped) and any(n.endswith("cls_token") for n in skipped)
    assert ("logit_scale" in skipped) == (name == "clip_debug")
    assert len(skipped) + len(decayed) == len(names)


def test_warmup_then_cosine_to_min_lr():
    f = lambda s: lr_factor(s, warmup_steps=10, total_steps=110, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_learn(precision):
    from lvmtrain.config.schema import ParallelConfig
    from lvmtrain.distributed.dims import Dims
    from lvmtrain.distributed.ddp import DDPStrategy
    from lvmtrain.data.batch import Batch
    from lvmtrain.tasks import ClassifyTask

    torch.manual_seed(0)
    strategy = DDPStrategy(ParallelConfig(), Dims(0, 1, 0, 1, torch.device("cpu")), precision)
    strategy.setup(build_model("vit_debug", image_size=16), OptimConfig(lr=3e-3, warmup_steps=0), 20)
    batch = Batch(image=torch.randn(8, 3, 16, 16), keys=[], shards=[], label=torch.arange(8) % 2)
    losses, norms = [], []
    for _ in range(8):
        with strategy.micro_step(sync_grads=True):
            out = ClassifyTask()(strategy.model, batch)
            strategy.backward(out["loss"])
        norms.append(strategy.step())
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    # fp16's loss scaler starts too high and skips the overflowing first steps; then it settles.
    assert torch.isfinite(norms[-1]) and all(map(torch.isfinite, norms)) == (precision == "bf16")
    assert all(p.dtype == torch.float32 for p in strategy.unwrapped().parameters())
