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
from torch import Tensor, nn

from lvmtrain.checkpoint_files import SHARDED
from lvmtrain.config.schema import ConfigError, OptimConfig, ParallelConfig
from lvmtrain.distributed.dims import Dims
from lvmtrain.distributed.flat_slice import FlatSlice
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

    def _ensure_moments(self) -> None:
        """Adam's moments of every flat partition, zeros where no step has made them yet, linked
        to each parameter's fragment (to be saved from, or loaded into, in place)."""
        base = self.engine.optimizer.optimizer
        # NOTE: ZeRO-3 hands its flat partitions to the optimizer only during step().
        flats = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) \
            or [flat for group in base.param_groups for flat in group["params"]]
        for flat in flats:
            if not base.state[flat]:  # torch's Adam creates its state at the first step
                base.state[flat] = {k: torch.zeros_like(flat) for k in MOMENTS}
                # NOTE: the fused kernel wants its step counts beside the parameters; foreach on the host.
                base.state[flat]["step"] = torch.tensor(0.0, device=flat.device if base.defaults.get("fused") else "cpu")
        self._link_moments()

    def _slices(self, *, saving: bool) -> dict:
        """The fp32 weights and Adam moments this rank's ZeRO partitions hold, as `FlatSlice`s of
        each parameter by name (views: no copy), with the step count and buffers whole (DCP writes
        those once). A frozen parameter (DINO's teacher: no master copy, no moments) is saved
        from its own values, each rank a 1/world range; loaded into them whole (ZeRO-1/2) or
        into its partition (ZeRO-3)."""
        self._ensure_moments()
        base = self.engine.optimizer.optimizer
        steps = [s["step"] for s in base.state.values() if "step" in s]
        step = torch.as_tensor(steps[0]).float().cpu() if steps else torch.tensor(0.0)
        model, moments = {}, {}
        for name, p in self._params():
            shape = _shape(p)
            if not p.requires_grad:
                start, flat = _frozen_range(p, whole=not saving)
                model[name] = FlatSlice(shape, flat, start, torch.float32 if saving else None)
                continue
            start, views = _fp32_ranges(p)
            model[name] = FlatSlice(shape, views[None], start)
            moments[name] = {"step": step.clone(), **{k: FlatSlice(shape, views[k], start) for k in MOMENTS}}
        for name, buf in self.engine.module.named_buffers():
            model[name] = buf.detach()
        return {"model": model, "optim": moments}

    def state_dict(self) -> dict:
        """fp32 weights and Adam moments by parameter name, each rank writing only the ranges its
        ZeRO partitions hold (`FlatSlice`): no parameter is gathered, no rank holds more than its
        partition (plus, while DCP writes it, one chunk). Collective."""
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.engine.optimizer.param_groups, self.group_names)]
        return {SHARDED: self._slices(saving=True), "optimizer": {"param_groups": groups},
                "scheduler": self.scheduler.state_dict(), "scaler": {}}

    def load_template(self) -> dict:
        """This rank's partitions themselves (as `FlatSlice`s): DCP reads the checkpoint, from any
        backend and world size, straight into them."""
        return {SHARDED: self._slices(saving=False), "optimizer": {"param_groups": []},
                "scheduler": self.scheduler.state_dict(), "scaler": {}}

    def load_state_dict(self, state: dict) -> None:
        """`state` as read into `load_template()`: the fp32 partitions already hold the weights
        and moments; here the step counts, the low-precision copies, the hyper-parameters."""
        steps = [s["step"] for s in state[SHARDED]["optim"].values() if "step" in s]
        base = self.engine.optimizer.optimizer
        for flat_state in base.state.values():
            flat_state["step"].fill_(float(steps[0]) if steps else 0.0)
        opt = self.engine.optimizer
        if hasattr(opt, "update_lp_params"):  # ZeRO-1/2: each rank's bf16 partition, all-gathered
            opt.update_lp_params()
        else:  # ZeRO-3: the parameters' own partitions
            for group in range(len(opt.fp16_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(group)
        for group, saved in zip(opt.param_groups, state["optimizer"]["param_groups"]):
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


def _z3_range(p: nn.Parameter) -> tuple[int, int]:
    """(start, length) of a ZeRO-3 parameter's elements in this rank's partition: rank r holds
    [r * n, (r + 1) * n) of the flattened parameter padded to a multiple of the ranks (the last
    ranks' partitions are part or all padding)."""
    part = p.partition_numel()
    start = min(torch.distributed.get_rank(group=getattr(p, "ds_process_group", None)) * part, p.ds_numel)
    return start, min(part, p.ds_numel - start)


def _fp32_ranges(p: nn.Parameter) -> tuple[int, dict[str | None, Tensor]]:
    """(where this rank's range starts in the flattened parameter, {None: its fp32 master weights,
    "exp_avg" / "exp_avg_sq": its moments}): views into ZeRO's flat partitions (empty where this
    rank holds none of it)."""
    if hasattr(p, "ds_id"):  # ZeRO-3
        start, valid = _z3_range(p)
        views = {key: p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                                     optim_state_key=key)[0]
                 for key in (None, *MOMENTS)}
        return start, {key: v.narrow(0, 0, valid) for key, v in views.items()}
    mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: the fragment of the flat group on this rank
    if mapping is None:
        return 0, {key: torch.empty(0) for key in (None, *MOMENTS)}
    return mapping.lp_fragment_address.start, {key: mapping.get_hp_fragment(key) for key in (None, *MOMENTS)}


def _frozen_range(p: nn.Parameter, *, whole: bool) -> tuple[int, Tensor]:
    """(start, the flat values) of a parameter the optimizer does not hold: its ZeRO-3 partition;
    under ZeRO-1/2 (every rank has all of it) all of it when `whole`, else a 1/world share."""
    if hasattr(p, "ds_id"):
        start, valid = _z3_range(p)
        return start, p.ds_tensor.data.narrow(0, 0, valid)
    flat = p.data.view(-1)
    if whole:
        return 0, flat
    share = -(-flat.numel() // torch.distributed.get_world_size())
    start = min(torch.distributed.get_rank() * share, flat.numel())
    return start, flat.narrow(0, start, min(share, flat.numel() - start))


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
