"""The cross-field checks of a `Config`: run before any work starts, each raising ConfigError
naming the key and what to do."""

from __future__ import annotations

from pathlib import Path

from lvmtrain.config.schema import Config, ConfigError


def validate(cfg: Config) -> None:
    """Every check that spans fields, in one place."""
    from lvmtrain.models.registry import list_presets, model_family

    if cfg.model.name not in list_presets():
        import difflib

        near = difflib.get_close_matches(cfg.model.name, list_presets(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"model.name: unknown preset '{cfg.model.name}'{hint}")
    family = model_family(cfg.model.name)
    from lvmtrain.tasks import check_task

    check_task(cfg)
    if not 0.0 <= cfg.model.patch_dropout < 1.0:
        raise ConfigError(f"model.patch_dropout: {cfg.model.patch_dropout} must be in [0, 1)")
    if not 0.0 <= cfg.model.patch_dropout_unmasked <= 1.0:
        raise ConfigError(f"model.patch_dropout_unmasked: {cfg.model.patch_dropout_unmasked} must be in [0, 1]")
    if cfg.model.init_from and family != "vit":
        raise ConfigError("model.init_from: starts ViTs (vit_* presets); CLIP models load open_clip weights with "
                          "`lvmtrain.models.convert.load_open_clip`")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"model.init_from: {cfg.model.init_from} not found")
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given (e.g. data.train=/data/{000..009}.tar)")
    if cfg.train.steps < 0 or cfg.train.epochs < 0:
        raise ConfigError("train.steps / train.epochs: must be >= 0 (set one of them to a positive value)")
    if cfg.train.steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("train.steps / train.epochs: set one of them to a positive value")
    for key in ("image_size", "patch_size", "num_classes", "context_length"):
        if getattr(cfg.model, key) is not None and getattr(cfg.model, key) <= 0:
            raise ConfigError(f"model.{key}: must be > 0 (or null for the preset's)")
    _positive(cfg, "data.batch_size", "train.grad_accum_steps", "log.every", "eval.batch_size",
              "checkpoint.keep", "data.shuffle_block", "data.shuffle_window")
    if cfg.checkpoint.every_minutes < 0 or cfg.checkpoint.keep_every < 0 or cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.every / every_minutes / keep_every: must be >= 0 (0 turns it off)")
    if cfg.data.workers < 0:
        raise ConfigError("data.workers: must be >= 0")
    if cfg.data.io_timeout_s <= 0 or cfg.data.io_retries < 0:
        raise ConfigError("data.io_timeout_s must be > 0 and data.io_retries >= 0")
    sources = len([p for p in cfg.data.train.split("::") if p.strip()])
    if cfg.data.train_weights and (len(cfg.data.train_weights) != sources
                                    or min(cfg.data.train_weights) <= 0):
        raise ConfigError(f"data.train_weights: give {sources} positive weight(s), one per '::'-separated "
                          f"source of data.train, not {cfg.data.train_weights}")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError("data.max_bad_fraction: must be in [0, 1]")
    if not 0 < cfg.data.crop_scale_min <= 1:
        raise ConfigError("data.crop_scale_min: must be in (0, 1]")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean / data.std: give three values (R, G, B)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: give two values [beta1, beta2]")
    if cfg.optim.warmup_steps < 0 or cfg.optim.lr <= 0:
        raise ConfigError("optim.lr must be > 0 and optim.warmup_steps >= 0")
    patch = cfg.model.patch_size
    if cfg.model.image_size and patch and cfg.model.image_size % patch:
        raise ConfigError(f"model.image_size {cfg.model.image_size} is not divisible by model.patch_size {patch}")
    if family == "vit" and cfg.model.context_length is not None:
        raise ConfigError("model.context_length: only CLIP presets have a text tower")
    if family == "clip" and cfg.model.num_classes is not None:
        raise ConfigError("model.num_classes: CLIP presets have no classifier head")
    if family == "clip" and cfg.data.val and not cfg.eval.class_names:
        raise ConfigError("eval.class_names: CLIP zero-shot evaluation of data.val needs the class names")
    from lvmtrain.evaluation.sets import check_set_configs

    check_set_configs(cfg, family)
    par = cfg.parallel
    if par.backend == "deepspeed" and par.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: {par.zero_stage}; DeepSpeed ZeRO stages are 1, 2 and 3")
    if par.backend == "deepspeed" and par.offload_params and par.zero_stage != 3:
        raise ConfigError("parallel.offload_params: DeepSpeed offloads parameters only with "
                          "parallel.zero_stage=3")
    if par.backend != "deepspeed" and par.deepspeed_config:
        raise ConfigError("parallel.deepspeed_config: only read with parallel.backend=deepspeed")
    if par.deepspeed_config and not Path(par.deepspeed_config).is_file():
        raise ConfigError(f"parallel.deepspeed_config: {par.deepspeed_config} not found")
    if par.meta_init and par.backend == "ddp":
        raise ConfigError("parallel.meta_init: needs a sharding backend (parallel.backend=fsdp or deepspeed "
                          "with zero_stage=3); DDP holds the whole model on every rank anyway")
    if par.meta_init and par.backend == "deepspeed" and par.zero_stage != 3:
        raise ConfigError("parallel.meta_init: DeepSpeed builds the model sharded (zero.Init) only with "
                          "parallel.zero_stage=3")
    if par.backend == "fsdp" and cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 with parallel.backend=fsdp: use bf16 (FSDP2 has no "
                          "fp16 loss scaling here), or ddp / deepspeed for fp16")
    if cfg.model.grad_checkpointing < 0:
        raise ConfigError("model.grad_checkpointing: 0 (off) or N to recompute every N-th block")
    for key in cfg.run.allow_changes:
        section, _, name = key.partition(".")
        if not hasattr(getattr(cfg, section, None), name) or section == key:
            raise ConfigError(f"run.allow_changes: '{key}' is not a config key (write section.key, e.g. optim.lr)")
    if cfg.checkpoint.resume not in ("auto", "none") and not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume: auto, none or a checkpoint path")
    _check_ssl(cfg.ssl)
    health = cfg.health
    if health.hang_timeout_s < 0:
        raise ConfigError("health.hang_timeout_s: must be >= 0 (0 turns the watchdog off)")
    if health.profile_steps and (len(health.profile_steps) != 2 or not 1 <= health.profile_steps[0] <= health.profile_steps[1]):
        raise ConfigError(f"health.profile_steps: {health.profile_steps} must be [start, end] with 1 <= start <= end "
                          "(steps are numbered from 1), or [] for none")
    skips = health.on_nan == "skip" or (health.spike_zscore > 0 and health.on_spike == "skip")
    if skips and cfg.parallel.backend == "deepspeed":
        raise ConfigError("health.on_nan / health.on_spike=skip: DeepSpeed steps its own optimizer, which cannot "
                          "drop one update; use rollback (or stop) with parallel.backend=deepspeed")
    if not 0 < health.rollback_lr_scale <= 1 or health.rollback_lr_steps < 0:
        raise ConfigError("health.rollback_lr_scale: in (0, 1]; health.rollback_lr_steps: >= 0")
    if health.spike_zscore < 0 or health.spike_window < 2:
        raise ConfigError("health.spike_zscore: >= 0 (0: off); health.spike_window: >= 2 steps")
    if health.nan_max_events < 0 or health.nan_window_steps < 1 or health.inject_nan_at < 0:
        raise ConfigError("health.nan_max_events >= 0, health.nan_window_steps >= 1, health.inject_nan_at >= 0")
    if health.profile_signal_steps < 1:
        raise ConfigError("health.profile_signal_steps: must be >= 1")


def _check_ssl(ssl) -> None:
    if not 0.0 < ssl.mask_ratio < 1.0:
        raise ConfigError(f"ssl.mask_ratio: {ssl.mask_ratio} must be in (0, 1) (MAE: 0.75)")
    if ssl.ibot_weight < 0 or ssl.koleo_weight < 0:
        raise ConfigError("ssl.ibot_weight / ssl.koleo_weight: must be >= 0 (0 turns the term off)")
    if not 0.0 < ssl.ibot_mask_share <= 1.0:
        raise ConfigError(f"ssl.ibot_mask_share: {ssl.ibot_mask_share} must be in (0, 1]")
    if not 0.0 < ssl.ibot_mask_min <= ssl.ibot_mask_max < 1.0:
        raise ConfigError(f"ssl.ibot_mask_min / ssl.ibot_mask_max: need 0 < min <= max < 1 "
                          f"(got {ssl.ibot_mask_min}, {ssl.ibot_mask_max}; DINOv2: 0.1, 0.5)")


def _positive(cfg: Config, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key}: must be > 0")
