"""The typed configuration of a run.

Every field has a docstring right under it: `lvmtrain config docs` turns them into the config
reference in README.md, so the documentation is the schema. Defaults < YAML file < dotted CLI
overrides; the loader (`config/loader.py`) refuses unknown keys and wrong types, and
`Config.validate()` (`config/checks.py`) holds every cross-field check in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lvmtrain.config.health import HealthConfig
from lvmtrain.config.selfsup import SSLConfig


class ConfigError(ValueError):
    """A configuration a run cannot start with. The message names the key and what to do."""


@dataclass
class RunConfig:
    name: str = ""
    """Name of the run; its directory is `log.dir/run.name/`. Empty: the config file's name and a
    hash of every key a resume must keep (`clip-1f3a9c2e`), so the same experiment finds its run
    again (a restart, a longer `train.steps`) and a changed one (another lr) gets its own."""
    overwrite: bool = False
    """Start from scratch even if `log.dir/run.name/` holds a finished or older run (its
    checkpoints are deleted, once every start-up check has passed). Without it, an existing run
    directory is resumed or refused. A restart of the same launch (torchrun's elastic restart,
    Slurm's requeue) resumes instead."""
    allow_changes: list[str] = field(default_factory=list)
    """Keys that may differ from the checkpoint's config on resume beyond those that always may
    (e.g. [optim.lr, optim.weight_decay]): anything else that differs is refused."""


# Keys that may differ between a run's checkpoint and the config that resumes it: how and where
# the run executes, not what it learns. Everything else (model, data, optimizer, seed, precision,
# and the global batch, checked as data.batch_size x ranks x train.grad_accum_steps) must match,
# or be named in run.allow_changes. A trailing ".*" covers a whole section.
RESUMABLE = ("run.*", "train.steps", "train.epochs", "train.threads", "train.grad_accum_steps",
             "data.batch_size", "data.workers", "data.ledger", "data.max_bad_fraction", "data.val",
             "data.io_timeout_s", "data.io_retries", "model.grad_checkpointing", "model.init_from", "parallel.*",
             "checkpoint.*", "log.*", "eval.*", "health.*")


def may_change_on_resume(key: str, allowed: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether dotted `key` may differ from the checkpoint's config when a run resumes."""
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in (*RESUMABLE, *allowed))


@dataclass
class ModelConfig:
    name: str = "clip_debug"
    """Preset name (`lvmtrain models` lists them): vit_debug, vit_ti16, vit_s16, vit_b32, vit_b16,
    vit_l14, vit_h14, vit_g14, clip_debug, clip_b32, clip_b16, clip_l14, clip_h14, clip_g14,
    siglip_debug, siglip_b16. A `vit_*` preset trains a classifier, a `clip_*` preset CLIP's
    InfoNCE, a `siglip_*` preset the SigLIP sigmoid loss (`train.task` picks another objective)."""
    image_size: int | None = None
    """Input resolution in pixels; null keeps the preset's. Must be divisible by the patch size."""
    patch_size: int | None = None
    """Patch size in pixels of the image tower; null keeps the preset's. Larger patches mean fewer
    tokens: quadratically less attention and linearly less of everything else."""
    num_classes: int | None = None
    """Classifier outputs for `vit_*` presets; null keeps the preset's."""
    global_pool: Literal["token", "avg"] | None = None
    """ViT pooling: the class token or the mean of patch tokens; null keeps the preset's."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate (linearly increasing over blocks)."""
    patch_dropout: float = 0.0
    """FLIP patch dropout (Li et al. 2023): the fraction of each training image's patch tokens
    dropped at random before the image tower's blocks (class token kept; none in evaluation).
    0.5 halves the image tower's compute; FLOPs and MFU count the tokens kept."""
    init_from: str = ""
    """Start the ViT (a classifier's, MAE's encoder, DINO's student and teacher) from these weights:
    an lvmtrain run or checkpoint directory, a `ckpt export` safetensors file, or timm's weights
    (model.safetensors, or a folder holding it); a head the weights lack keeps its init."""
    patch_dropout_unmasked: float = 0.0
    """The fraction of training's last steps run with patch dropout off (FLIP's unmasked tuning: it
    wins back part of the accuracy dropout costs; 0.1: the last 10%)."""
    context_length: int | None = None
    """Text context length in tokens for `clip_*` presets (null: 77, CLIP's). Shorter captions
    train faster; longer ones are truncated keeping the end-of-text token."""
    grad_checkpointing: int = 0
    """Activation checkpointing: recompute every N-th transformer block in the backward pass
    (1: all blocks, ~30% more compute for the least memory; 2: every other block; 0: off)."""


@dataclass
class DataConfig:
    train: str = ""
    """Training shards: a brace-expanded spec such as `/data/laion/{00000..00099}.tar`; several
    specs joined with `::`."""
    train_weights: list[float] = field(default_factory=list)
    """Mixing weights, one per `::`-separated source of `data.train` (empty: 1 each). A source of
    weight w is seen w times per epoch (2: twice; 0.5: a different half each epoch)."""
    val: str = ""
    """Evaluation shards (same syntax); empty disables evaluation."""
    batch_size: int = 32
    """Samples per rank per micro-step. Global batch = batch_size x world size x grad_accum_steps."""
    workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    image_key: str = "jpg;png;jpeg;webp"
    """Extensions tried in order for a sample's image, separated by `;`."""
    caption_key: str = "txt"
    """Extension holding the caption (CLIP)."""
    label_key: str = "cls"
    """Extension holding the integer class label (classification, zero-shot evaluation)."""
    shuffle_block: int = 64
    """Consecutive samples of a shard kept together in the epoch's order (read locality)."""
    shuffle_window: int = 4
    """Number of blocks whose samples are shuffled together after the block permutation."""
    crop_scale_min: float = 0.9
    """Lower bound of RandomResizedCrop's area scale for training images (1.0: resize only)."""
    hflip: bool = True
    """Random horizontal flips for training images."""
    max_bad_fraction: float = 0.01
    """Share of samples that may be skipped as unusable (corrupt image, missing or non-UTF-8
    caption, ...) before the run stops with a message naming the kind; each is counted in
    metrics.jsonl as data/<kind>."""
    ledger: bool = False
    """Append the keys each rank trained on per step to `run_dir/ledger/rank{R}.jsonl`."""
    io_timeout_s: float = 60.0
    """Seconds one network operation on a remote shard (`https://`, `s3://`, ...: open, one
    range read of up to a few MB) may take before it is abandoned and retried. Local files and
    `pipe:` streams have none."""
    io_retries: int = 3
    """Further attempts of a remote operation that timed out or failed (pauses of 0.5, 1, 2, ...
    s between them). A shard still unreadable at start-up is skipped and counted
    (data/unreadable_shard), a sample during training counts as data/unreadable_sample; after 3
    such failures in a row, a host's other reads fail at once for a minute."""
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel normalisation mean (CLIP's by default)."""
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel normalisation standard deviation (CLIP's by default)."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms, biases, position embeddings, the
    class token or logit_scale."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr`, in optimizer steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    label_smoothing: float = 0.0
    """Label smoothing of the classification loss."""


@dataclass
class ParallelConfig:
    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """Data-parallel engine: ddp (every rank holds the whole model), fsdp (PyTorch FSDP2,
    parameters, gradients and optimizer state sharded per block) or deepspeed (ZeRO, needs
    `pip install lvmtrain[deepspeed]`). A single process needs no wrapper and runs the model as is."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered parameters after its forward and gather them again for
    backward (full shard, ZeRO-3-like); false keeps them until backward (shard-grad-op,
    ZeRO-2-like: more memory, a third less communication)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2 / DeepSpeed under bf16 or fp16 precision: dtype gradients are reduced in across ranks."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU and run the optimizer step there (DeepSpeed
    offload_optimizer; FSDP2's CPU offload, which moves parameters and gradients too)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (DeepSpeed ZeRO-3 offload_param; FSDP2: as
    offload_optimizer)."""
    meta_init: bool = False
    """Build the model without allocating it whole on any rank: FSDP2 builds on the meta device,
    shards, then initialises each shard; DeepSpeed ZeRO-3 builds inside `zero.Init`. Weights then
    differ from a plain build with the same seed."""
    deepspeed_config: str = ""
    """JSON or YAML file merged over the DeepSpeed config lvmtrain generates (keys you set win)."""
    compile: Literal["none", "blocks", "model"] = "none"
    """torch.compile each transformer block (quick to compile, works under every backend) or the
    whole model; applied after activation checkpointing and before sharding."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto picks nccl on CUDA, gloo on CPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Device: auto uses CUDA when available."""
    bucket_mb: int = 25
    """Gradient bucket size in MiB: DDP's buckets, DeepSpeed's reduce and all-gather buckets
    (whose own default, 500M elements, would hold GBs of buffers per rank)."""
    ddp_static_graph: bool = False
    """DDP static_graph: valid when every step uses the same parameters (true for lvmtrain's
    models); lets DDP overlap more communication with activation checkpointing."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0: only at the end of training)."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: off)."""
    keep: int = 3
    """Number of most recent checkpoints kept on disk."""
    keep_every: int = 0
    """Also keep, forever, every checkpoint whose step is a multiple of this (0: none)."""
    async_save: bool = False
    """Write checkpoints in a background thread: the step loop only waits for the copy of the
    state to host memory. At most one save is in flight; its error surfaces at the next save
    or at the end of training."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of this run if there is one;
    none: start fresh; or a path to a checkpoint directory."""


@dataclass
class LogConfig:
    dir: str = "runs"
    """Root of run directories."""
    every: int = 10
    """Log metrics every N optimizer steps."""
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    """Weights & Biases mode (rank 0 only); W&B missing, offline or failing never stops training.
    A resumed run continues the same W&B run (its id is in the checkpoint)."""
    wandb_project: str = "lvmtrain"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); null: your default."""
    wandb_group: str | None = None
    """W&B run group (e.g. a sweep or an ablation)."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    wandb_checkpoint: Literal["none", "reference", "upload"] = "reference"
    """The final checkpoint as a W&B artifact: a reference to its path (no copy), an upload of its
    files, or none."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Console on rank 0: a live progress bar (step/total, loss, samples/s, ETA) or one line per
    `log.every` steps; auto: the bar on a terminal, lines otherwise (Slurm logs)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0: from the table of known GPUs for the run's precision,
    or measured with a matmul at start-up on CPU."""


@dataclass
class EvalSetConfig:
    """One evaluation set of `eval.sets`: its scores go to eval/NAME/..."""

    name: str = ""
    """Its name in the metrics (eval/NAME/top1); letters, digits, - and _."""
    kind: Literal["zeroshot", "retrieval", "knn", "linear", "classify"] = "zeroshot"
    """zeroshot: image-text models, labelled shards scored against class prompts (top-1, top-5,
    mean per-class recall); retrieval: image-caption shards, several captions per image one per
    line of the caption (recall@1/5/10 both ways); knn: weighted k-NN of frozen image features
    against `train`'s (DINO's); linear: a logistic-regression probe of frozen image features
    fitted on `train`; classify: the model's own classifier head."""
    data: str = ""
    """Shards scored (a spec as data.train's, or a dataset index .json)."""
    train: str = ""
    """knn and linear: labelled shards of the memory bank / the probe's training split."""
    class_names: list[str] = field(default_factory=list)
    """zeroshot: class names by label (or `class_names_file`)."""
    class_names_file: str = ""
    """A file of class names: one per line, or JSON (a list, or an object with "class_names")."""
    templates: list[str] = field(default_factory=list)
    """zeroshot prompts, `{}` the class name (embeddings averaged); empty: `templates_file`, else
    eval.templates."""
    templates_file: str = ""
    """A file of prompts, one per line, or a built-in set: openai_imagenet (the CLIP paper's 80)."""
    k: int = 20
    """knn: neighbours voting."""
    temperature: float = 0.07
    """knn: votes are weighted by exp(cosine similarity / temperature)."""
    probe_steps: int = 100
    """linear: L-BFGS iterations of the full-batch logistic regression (on standardised features)."""
    probe_weight_decay: list[float] = field(default_factory=lambda: [1e-4])
    """linear: L2 penalty; several: each is fitted on 90% of `train`, the best on the other 10% is
    refitted on all of it."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N optimizer steps (0: only at the end of training)."""
    batch_size: int = 256
    """Evaluation batch size per rank."""
    sets: list[EvalSetConfig] = field(default_factory=list)
    """Named evaluation sets, each scored at every evaluation (the `eval.sets[]` table below);
    data.val with eval.class_names is the set `val` of the task's kind."""
    class_names: list[str] = field(default_factory=list)
    """Class names, indexed by label, for CLIP zero-shot classification of data.val."""
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    """Zero-shot prompt templates; `{}` is replaced by the class name, embeddings are averaged."""


@dataclass
class TrainConfig:
    steps: int = 0
    """Optimizer steps to train; 0 means use `train.epochs`."""
    epochs: float = 0.0
    """Epochs over `data.train` (may be fractional) when `train.steps` is 0."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seed of model init, data order and augmentation; the same seed gives the same run."""
    task: str = ""
    """The objective: classify, mae or dino (self-supervised, `ssl.*`) for `vit_*` presets; clip
    (InfoNCE) or siglip (sigmoid loss) for image-text presets; empty: the preset's own
    (`lvmtrain models`)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype for forward/backward (weights and optimizer stay fp32). bf16 is fast on
    recent GPUs and very slow on CPUs without bf16 units."""
    threads: int = 0
    """torch intra-op threads per rank on CPU (0: Slurm's --cpus-per-task, else cores / local ranks)."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms; cuDNN autotuning off):
    repeatable to the bit on the same hardware, somewhat slower."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def validate(self) -> None:
        """Every check that spans fields, in one place (`config/checks.py`); raises ConfigError
        naming the key."""
        from lvmtrain.config.checks import validate

        validate(self)
