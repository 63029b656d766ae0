"""The seam between the training loop and an objective: the loop calls a `Task` without knowing
which one it is; adding an objective touches `lvmtrain/tasks/` and its registry only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor, nn

from lvmtrain.data.batch import Batch
from lvmtrain.distributed.strategy import Strategy


class Task(Protocol):
    """One training objective."""

    name: str
    """Its registry name (`train.task`)."""
    fields: tuple[str, ...]
    """Batch fields it reads besides "image" ("label", "text"): the loader decodes these and only these."""
    tokenizer: Callable | None
    """Captions -> token ids, when it reads "text"."""
    crops: tuple[int, int, int] | None
    """(global size, local size, local crops) of the "views" it reads (DINO), once its model is built."""
    eval_kind: str
    """The kind of evaluation set data.val is scored as (`eval.sets[].kind`: zeroshot, classify;
    knn for self-supervised tasks, which need eval.sets)."""
    total_steps: int | None
    """The run's length, set once built (for objectives with schedules)."""
    backbone_prefix: str
    """Where the plain model's weights lie in the trained module ("": it is the model; MAE's
    "encoder."): what `ckpt export` keeps."""

    @classmethod
    def from_config(cls, cfg, *, context_length: int | None = None) -> Task:
        """The task of a run (cfg: Config); `context_length`: the text tower's, for a tokenizer."""

    def model_args(self) -> dict:
        """Keyword arguments of `build_model` for the objective's own parameters (SigLIP's
        temperature and bias init): built with the model, so every backend shards, syncs and
        checkpoints them, meta-device and ZeRO-3 init included."""

    def wrap_model(self, backbone: nn.Module) -> nn.Module:
        """The module trained: the backbone itself, or the backbone with the objective's own
        modules (a decoder, heads, a teacher)."""

    def train_step(self, strategy: Strategy, batches: list[Batch]) -> dict[str, Tensor]:
        """Forward and backward of one optimizer step's micro-batches (already on the device);
        returns metrics on the device, "loss" among them (the optimizer step is the trainer's)."""

    def on_step_end(self, strategy: Strategy) -> None:
        """After each optimizer step (a teacher's EMA; nothing for most objectives)."""

    def state_dict(self) -> dict:
        """What it must carry across a resume besides the model (nothing for stateless losses)."""

    def load_state_dict(self, state: dict) -> None: ...


class TaskDefaults:
    """What most objectives share: the backbone trained as it is, no state beyond the model,
    nothing after the optimizer step. An objective overrides what it has."""

    tokenizer = None
    crops = None
    total_steps: int | None = None
    backbone_prefix = ""

    def model_args(self) -> dict:
        return {}

    def wrap_model(self, backbone: nn.Module) -> nn.Module:
        return backbone

    def on_step_end(self, strategy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def accumulate(strategy: Strategy, batches: list[Batch], forward: Callable[[nn.Module, Batch], dict]
               ) -> dict[str, Tensor]:
    """Gradient accumulation for a loss that is a mean over samples: each micro-batch's loss / n,
    gradients synchronised on the last one only; the metrics averaged over micro-batches."""
    n, totals = len(batches), {}
    for i, batch in enumerate(batches):
        with strategy.micro_step(sync_grads=i == n - 1):
            out = forward(strategy.model, batch)
            strategy.backward(out["loss"] / n)
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + v.detach() / n
    return totals
