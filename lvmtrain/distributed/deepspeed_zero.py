"""DeepSpeed ZeRO stages 1-3, configured from lvmtrain's config (the only module importing deepspeed).

The engine owns mixed precision (bf16 / fp16 weights with fp32 master copies in the optimizer, fp16
loss scaling), gradient clipping, the optimizer and the schedule. lvmtrain's client optimizer is
torch's AdamW (DeepSpeed's fused and CPU Adams compile C++ at first use); gradient accumulation
is unmanaged: `backward` accumulates, `step` is the boundary, as with the other strategies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path

import deepspeed
import torch
import yaml
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from torch import Tensor, nn

from lvmtrain.checkpoint_files import SHARDED
from lvmtrain.config.schema import ConfigError, OptimConfig, ParallelConfig
from lvmtrain.distributed.dims import Dims
from lvmtrain.distributed.strategy import AUTOCAST_DTYPES, compile_model, ensure_process_group
from lvmtrain.optim import build_optimizer, build_scheduler, param_group_names

MOMENTS = ("exp_avg", "exp_avg_sq")
# NOTE: DeepSpeed 0.19 still calls collectives torch 2.14 deprecates, once per step; the message
# is about DeepSpeed's code, not the user's.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class DeepSpeedStrategy:
    def __init__(self, cfg: ParallelConfig, dims: Dims, precision: str):
        self.cfg = cfg
        self.dims = dims
        self.precision = precision
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.overrides = _read_overrides(cfg.deepspeed_config) if cfg.deepspeed_config else {}
        # NOTE: DeepSpeed reads the launcher's variables; one plain process has none.
        for key, value in (("LOCAL_RANK", dims.local_rank), ("RANK", dims.rank), ("WORLD_SIZE", dims.world)):
            os.environ.setdefault(key, str(value))
        if precision == "fp16" and dims.device.type == "cpu":
            raise ConfigError("train.precision=fp16: DeepSpeed's CPU accelerator has no fp16; on CPU use "
                              "bf16 or fp32 (or parallel.backend=ddp, whose fp16 runs on CPU)")

    def ds_config(self, *, micro_batch: int, accum: int, grad_clip: float) -> dict:
        """The DeepSpeed config for this run, with the user's `parallel.deepspeed_config` merged over."""
        cfg, cuda = self.cfg, self.dims.device.type == "cuda"
        bucket = cfg.bucket_mb * 2**20 // 4  # elements (of fp32, the widest gradients)
        zero: dict = {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if cfg.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if cfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
        out = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accum,
            "train_batch_size": micro_batch * accum * self.dims.world,
            "managed_gradient_accumulation": False,
            "gradient_clipping": grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            # NOTE: torch's AdamW, not DeepSpeed's (which compiles C++ for minutes on first use).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30,
        }
        if self.dtype is not None and cfg.reduce_dtype == "fp32":
            out["communication_data_type"] = "fp32"
        return _merge(out, self.overrides)

    def init_context(self) -> contextlib.AbstractContextManager:
        if not self.cfg.meta_init:
            return contextlib.nullcontext()
        ensure_process_group(self.dims)
        config = self.ds_config(micro_batch=1, accum=1, grad_clip=0.0)
        del config["train_batch_size"]  # NOTE: zero.Init checks it against a world size of its own
        return deepspeed.zero.Init(config_dict_or_path=config)

    def setup(self, model: nn.Module, optim_cfg: OptimConfig, total_steps: int, *, micro_batch: int,
              accum: int) -> None:
        ensure_process_group(self.dims)
        if self.cfg.meta_init:
            _init_gathered(model)
        compile_model(model, self.cfg.compile)
        self.group_names = param_group_names(model, optim_cfg.weight_decay)
        # NOTE: fused on the GPU: ZeRO hands the client optimizer its flat fp32 partitions.
        optimizer = build_optimizer(model, optim_cfg, fused=self.dims.device.type == "cuda"
                                    and not self.cfg.offload_optimizer)
        scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
        config = self.ds_config(micro_batch=micro_batch, accum=accum, grad_clip=optim_cfg.grad_clip)
        if self.dtype is not None and not config.get("torch_autocast", {}).get("enabled"):
            _autocast_inside(model, self.autocast)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model = self.engine

    def autocast(self) -> contextlib.AbstractContextManager:
        """For calls outside the engine's forward (evaluation's encode_image / encode_text)."""
        # NOTE: with bf16 / fp16 the engine holds low-precision weights; autocast still keeps
        # norms and softmax in fp32 and casts the fp32 inputs, as under the other strategies.
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.dtype)

    def micro_step(self, *, sync_grads: bool) -> contextlib.AbstractContextManager:
        # NOTE: no outer autocast: the model's forward carries its own (`_autocast_inside`), and
        # the engine then sees none to switch off. Unmanaged accumulation: `step` reduces and updates.
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, veto: Tensor | None = None) -> Tensor:
        # NOTE: no veto here: DeepSpeed's engine cannot drop one update (the config check refuses skip)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a tensor on the device, or a float (or None) by stage
        return torch.as_tensor(float("nan") if norm is None else norm)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.engine.module.named_parameters())

    def _link_moments(self) -> None:
        """Point each parameter's ZeRO-1/2 fragment at the Adam moments of every param group.

        NOTE: DeepSpeed links them once, after the first group's first step, so with two groups
        (decay / no decay) the second group's parameters never see their moments.
        """
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def state_dict(self) -> dict:
        """Full fp32 weights and Adam moments by parameter name, gathered from ZeRO's partitions
        (collective; every rank gets them, DCP writes each once).
        NOTE: whole tensors in host memory on every rank; writing ZeRO's partitions as slices of
        flattened parameters would avoid it."""
        self._link_moments()
        model, moments = {}, {}
        for name, p in self._params():
            if not p.requires_grad:  # DINO's teacher: no master copy, no moments: its own values
                model[name] = _get_frozen(p)
                continue
            model[name] = safe_get_full_fp32_param(p).detach().reshape(_shape(p)).cpu().clone()
            moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().reshape(_shape(p)).cpu().clone()
                             for k in MOMENTS}
        for name, buf in self.engine.module.named_buffers():
            model[name] = buf.detach().cpu().clone()
        base = self.engine.optimizer.optimizer
        steps = [s["step"] for s in base.state.values() if "step" in s]
        step = torch.as_tensor(steps[0]).float().cpu() if steps else torch.tensor(0.0)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.engine.optimizer.param_groups, self.group_names)]
        return {SHARDED: {"model": model, "optim": {n: {"step": step.clone(), **m} for n, m in moments.items()}},
                "optimizer": {"param_groups": groups}, "scheduler": self.scheduler.state_dict(), "scaler": {}}

    def load_template(self) -> dict:
        """Empty full-size fp32 tensors of every weight and moment (ZeRO's own are partitions)."""
        model = {n: torch.empty(_shape(p)) for n, p in self._params()}
        model.update({n: torch.empty_like(b, device="cpu") for n, b in self.engine.module.named_buffers()})
        moments = {n: {"step": torch.tensor(0.0), **{k: torch.empty(_shape(p)) for k in MOMENTS}}
                   for n, p in self._params() if p.requires_grad}
        return {SHARDED: {"model": model, "optim": moments}, "optimizer": {"param_groups": []},
                "scheduler": self.scheduler.state_dict(), "scaler": {}}

    def load_state_dict(self, state: dict) -> None:
        weights, opt_state = state[SHARDED]["model"], state[SHARDED]["optim"]
        missing = [n for n, _ in self._params() if n not in weights]
        if missing:
            raise ConfigError(f"checkpoint lacks parameters {missing[:5]} of this model")
        steps = [s["step"] for s in opt_state.values() if "step" in s]
        base = self.engine.optimizer.optimizer
        # NOTE: ZeRO-3 hands its flat partitions to the optimizer only during step().
        flats = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) \
            or [flat for group in base.param_groups for flat in group["params"]]
        for flat in flats:
            # NOTE: torch's Adam creates its state at the first step; ZeRO's flat partitions need
            # it now to receive the saved moments.
            if not base.state[flat]:
                base.state[flat] = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            # NOTE: the fused kernel wants its step counts beside the parameters; foreach on the host.
            base.state[flat]["step"] = torch.tensor(float(steps[0]) if steps else 0.0,
                                                    device=flat.device if base.defaults.get("fused") else "cpu")
        self._link_moments()
        for name, p in self._params():
            value = weights[name].to(self.dims.device, torch.float32).reshape(_shape(p))
            if not p.requires_grad:
                _set_low_precision_param(p, value)
                continue
            _set_full(p, value)
            for key in MOMENTS:
                if name in opt_state:
                    _set_full(p, opt_state[name][key].to(value.device).reshape(_shape(p)), key)
            _set_low_precision_param(p, value)
        for group, saved in zip(self.engine.optimizer.param_groups, state["optimizer"]["param_groups"]):
            # NOTE: the schedule sets the lr only at its next step; the current one is in the groups.
            group.update({k: saved[k] for k in ("lr", "initial_lr", "weight_decay", "betas", "eps") if k in saved})
        self.scheduler.load_state_dict(state["scheduler"])


def _init_gathered(model: nn.Module) -> None:
    """Run the model's own `init_weights` on its whole parameters, once, after zero.Init.

    NOTE: zero.Init partitions each submodule's parameters as soon as that submodule is built, so
    the model's initialisation (run at the end of its constructor) finds its blocks' weights
    already empty and initialises nothing: the blocks kept nn.Linear's defaults instead of the
    preset's. Gathering costs the whole model's weights once, in their low-precision dtype, at
    start-up; the fp32 master weights and optimizer state are never whole on a rank.
    """
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        if torch.distributed.get_rank() == 0:
            model.init_weights()


def _autocast_inside(model: nn.Module, autocast) -> None:
    """Run `model.forward` under `autocast()`, inside whatever context calls it.

    NOTE: DeepSpeed >= 0.17 decides about an autocast around `engine(...)` itself: 0.19 runs the
    module under `torch.autocast(enabled=False)` when `torch.is_autocast_enabled()` (CUDA's) is on
    and its `torch_autocast` section is not (0.17 asserts instead), so bf16 weights met fp32
    images on every GPU. Enabling that section is no cure for us: it reduces gradients in the
    parameters' dtype whatever `parallel.reduce_dtype` says, and under fp16 adds a second
    GradScaler next to the engine's loss scaler. Casting the inputs to the engine's dtype instead
    would run norms, softmax and the loss in bf16, unlike every other backend. An autocast that
    lives in the forward itself keeps the engine's bf16 / fp16 weights and fp32 master copies,
    matches DDP and FSDP2 op for op, and is seen by no version's check (the engine is called
    with none around it). A user's own enabled `torch_autocast` section takes over instead.
    """
    forward = model.forward

    @functools.wraps(forward)
    def forward_under_autocast(*args, **kwargs):
        with autocast():
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast


def _shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _set_full(p: nn.Parameter, value: Tensor, moment: str | None = None) -> None:
    """Write a full fp32 tensor (the master weight, or an Adam moment) into ZeRO's partitions."""
    if not hasattr(p, "ds_id"):  # ZeRO-1/2: DeepSpeed's own helpers
        if moment is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, moment)
        return
    # NOTE: ZeRO-3's set_full_hp_param cuts the unpadded tensor, which fails for a parameter with
    # fewer elements than ranks (logit_scale); the partitions are of the padded one.
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=moment)
    rank, world = opt._get_param_partition_rank(p), opt._get_param_partition_world_size(p)
    flat = torch.nn.functional.pad(value.flatten(), (0, part.numel() * world - value.numel()))
    part.data.copy_(flat.narrow(0, part.numel() * rank, part.numel()))


def _get_frozen(p: nn.Parameter) -> Tensor:
    """A parameter the optimizer does not hold, whole, in fp32 on the host (ZeRO-3: gathered)."""
    if hasattr(p, "ds_id"):
        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().float().cpu().clone()
    return p.detach().float().cpu().clone()


def _set_low_precision_param(p: nn.Parameter, value: Tensor) -> None:
    """The module's own (bf16 / fp16 / fp32) copy, which the optimizer only refreshes at its next step."""
    if hasattr(p, "ds_id"):  # ZeRO-3: partitioned; gather, set on rank 0, re-partition
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if torch.distributed.get_rank() == 0:
                p.data.copy_(value.to(p.dtype))
    else:
        with torch.no_grad():
            p.data.copy_(value.to(p.dtype))


def _read_overrides(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"parallel.deepspeed_config: {path} not found")
    try:
        data = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not valid JSON/YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: {path} must hold a mapping of DeepSpeed config keys")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
