"""DINOv2-style self-distillation (Oquab et al. 2023; reference: dinov2/train/ssl_meta_arch.py):
a student ViT + DINO head learns to match a teacher's (the student's EMA) prototype assignments
across crops: the teacher sees the 2 global crops, the student every crop (2 global + the local
ones, made by the loader's workers). The teacher's outputs are balanced by Sinkhorn-Knopp
(DINOv2) or a running centre (DINO); a KoLeo term spreads the student's features.

State carried across a resume: the teacher (weights, in the model: checkpointed and resharded with
it), the centre and the step that drives the momentum and teacher-temperature schedules (the
task's `state_dict`). The EMA runs on each rank's own shards under FSDP2 and ZeRO-3 (no gather).

iBOT (`ssl.ibot_weight`): some of the student's global crops have patches replaced by a learned
mask token; the student predicts, with the shared head, the teacher's (Sinkhorn-balanced)
assignments of those patches, seen unmasked. DINOv2 masks blocks of patches; here the masked
patches are drawn independently (at 28 px, 49 patches, a block is most of the image).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.config.schema import ConfigError
from lvmtrain.data.batch import Batch
from lvmtrain.models.layers import fwd_bwd_flops
from lvmtrain.models.vit import VisionTransformer
from lvmtrain.tasks.base import TaskDefaults, accumulate


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce(t: Tensor) -> Tensor:
    if _world() > 1:
        dist.all_reduce(t)
    return t


class DinoHead(nn.Module):
    """MLP (3 layers, GELU) to a bottleneck, L2-normalised, then weight-normalised prototypes
    (DINOv2's `DINOHead` with its norm fixed to 1: the prototypes' rows are normalised)."""

    def __init__(self, dim: int, out_dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


class Branch(nn.Module):
    """A backbone and its head (the student, or the teacher), and iBOT's mask token."""

    def __init__(self, backbone: VisionTransformer, head: DinoHead, mask_token: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(backbone.width)) if mask_token else None

    def features(self, images: Tensor) -> Tensor:
        return self.backbone.encode_image(images)

    def forward(self, images: Tensor, masks: Tensor | None = None,
                pick: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(pooled features, their head logits, head logits of the patches `pick` selects (B,
        patches; bool) or None). `masks` hides those patches behind the mask token."""
        tokens = self.backbone.forward_features(images, masks, self.mask_token)
        features = self.backbone.forward_head(tokens, pre_logits=True)
        if pick is None:
            return features, self.head(features), None
        logits = self.head(torch.cat([features, self.backbone.patch_tokens(tokens)[pick]]))
        return features, logits[:len(features)], logits[len(features):]


def draw_masks(n: int, patches: int, share: float, low: float, high: float, device) -> Tensor:
    """iBOT masks (n, patches; bool): round(share x n) random images (at least one) mask a
    ratio of their patches spread over [low, high] as DINOv2's collate does; the rest none.
    Drawn from the global RNG, which the checkpoint carries: a resumed run masks alike."""
    masked = max(1, round(share * n))
    bounds = torch.linspace(low, high, masked + 1)
    ratios = bounds[:-1] + torch.rand(masked) * (bounds[1:] - bounds[:-1])
    counts = (ratios * patches).round().clamp(min=1).long()
    order = torch.rand(masked, patches).argsort(dim=1)
    rows = order < counts[:, None]  # each row: `count` random patches
    masks = torch.zeros(n, patches, dtype=torch.bool)
    masks[torch.randperm(n)[:masked]] = rows
    return masks.to(device)


class Dino(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: DinoHead,
                 ibot: tuple[float, float, float] | None = None):
        super().__init__()
        backbone.dynamic_size = True
        self.ibot = ibot  # (share of images masked, lowest ratio, highest ratio)
        self.student = Branch(backbone, head, mask_token=ibot is not None)
        self.teacher = copy.deepcopy(self.student)  # starts as the student (DINOv2)
        self.teacher.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.student.backbone.init_weights()
        self.student.head.init_weights()
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.copy_(s)

    @property
    def image_size(self) -> int:
        return self.student.backbone.image_size

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        self.student.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"student.backbone.{n}" for n in self.student.backbone.no_weight_decay()} | {"student.mask_token"}

    fsdp_forward_methods = (("teacher", "features"),)

    def encode_image(self, x: Tensor) -> Tensor:
        """The teacher backbone's features (DINO evaluates the teacher)."""
        return self.teacher.features(x)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        """teacher: logits of the 2 global crops [2B, K]; student: logits of every crop, globals
        first [(2 + n_local) B, K]; features: the student's of the global crops [2B, D]; with
        iBOT, masks [2B, patches] and both branches' logits of the masked patches [M, K]."""
        globals_ = torch.cat(views[:2])
        masks = None
        if self.ibot is not None:
            masks = draw_masks(len(globals_), self.student.backbone.patch_embed.num_patches, *self.ibot,
                               device=globals_.device)
        with torch.no_grad():
            _, teacher, teacher_patch = self.teacher(globals_, pick=masks)
        features, student_global, student_patch = self.student(globals_, masks, pick=masks)
        student = [student_global]
        if len(views) > 2:
            student.append(self.student(torch.cat(views[2:]))[1])
        out = {"teacher": teacher, "student": torch.cat(student), "features": features}
        if masks is not None:
            out.update(masks=masks, teacher_patch=teacher_patch, student_patch=student_patch)
        return out

    def flops_per_sample(self, train: bool = True) -> int:
        """Student forward + backward on every crop, teacher forward on the global ones (per image,
        2 global crops at the model's size; local crops counted at their token count)."""
        vit = self.student.backbone
        macs = 2 * vit.forward_macs(train=False)
        return fwd_bwd_flops(macs) + 2 * macs + self.local_flops

    local_flops = 0  # set by the task from the local crops' size and number


def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3, rows_vary: bool = False) -> Tensor:
    """Balanced soft assignments [B, K] of the teacher's logits over the global batch (every
    rank's rows: sums are all-reduced), as DINOv2's `SinkhornKnopp`."""
    q = torch.exp(logits.float() / temp).T  # K x B
    # NOTE: `rows_vary` (iBOT's masked patches): ranks hold different row counts, summed by one
    # more all-reduce; the class tokens' rows are alike on every rank
    total_b = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device)) if rows_vary else q.shape[1] * _world()
    k = q.shape[0]
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= total_b
    return (q * total_b).T


def koleo(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimator's loss: -log of each normalised feature's distance to
    its nearest neighbour in the batch, averaged (DINOv2's `KoLeoLoss`)."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    sims = x @ x.T
    sims.fill_diagonal_(-1)
    nearest = sims.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nearest]) + eps).mean()


def local_tensor(p: Tensor) -> Tensor:
    """This rank's own values of parameter `p`: a DTensor's local shard (FSDP2), a ZeRO-3
    partition (`ds_tensor`), or the tensor itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum x teacher + (1 - momentum) x student, on each rank's own shards, in one
    fused foreach call (no gather: both are sharded alike)."""
    t = [local_tensor(p) for p in teacher.parameters()]
    s = [local_tensor(p) for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


class DinoTask(TaskDefaults):
    """batch {"views"} -> {"loss", "dino_loss", "koleo", "teacher_temp", "momentum"}."""

    name = "dino"
    fields = ("views",)
    eval_kind = "knn"
    backbone_prefix = "student.backbone."
    teacher_prefix = "teacher.backbone."

    def __init__(self, cfg, total_steps: int | None = None):
        self.ssl, self.total_steps = cfg.ssl, total_steps
        self.image_size = cfg.model.image_size
        self.step = 0  # optimizer steps done: drives the schedules
        self.crops: tuple[int, int, int] | None = None
        self.center: Tensor | None = None

    @classmethod
    def from_config(cls, cfg, *, context_length: int | None = None) -> DinoTask:
        return cls(cfg)

    def model_args(self) -> dict:
        return {"num_classes": 0}

    def views(self, image_size: int, patch_size: int) -> tuple[int, int, int]:
        """(global size, local size, local crops) the loader makes."""
        local = self.ssl.local_size or max(patch_size, round(image_size * 96 / 224 / patch_size) * patch_size)
        if local % patch_size:
            raise ConfigError(f"ssl.local_size: {local} px is not a multiple of the model's {patch_size} px patches")
        return image_size, local, self.ssl.local_crops

    def wrap_model(self, backbone: nn.Module) -> nn.Module:
        s = self.ssl
        ibot = (s.ibot_mask_share, s.ibot_mask_min, s.ibot_mask_max) if s.ibot_weight else None
        model = Dino(backbone, DinoHead(backbone.width, s.out_dim, s.head_hidden, s.head_bottleneck), ibot)
        self.crops = self.views(backbone.image_size, backbone.patch_embed.patch_size)  # what the loader makes
        _, local, n = self.crops
        tokens = (local // backbone.patch_embed.patch_size) ** 2
        macs = backbone.forward_macs(train=False) * tokens / backbone.patch_embed.num_patches  # about: linear part
        model.local_flops = int(n * fwd_bwd_flops(int(macs)))
        return model

    def schedules(self) -> tuple[float, float]:
        """(teacher temperature, EMA momentum) at the step about to run."""
        s, total = self.ssl, max(self.total_steps or 1, 1)
        warm = s.teacher_temp_warmup_steps or int(0.3 * total)
        temp = s.teacher_temp if self.step >= warm else (
            s.warmup_teacher_temp + (s.teacher_temp - s.warmup_teacher_temp) * self.step / max(warm, 1))
        momentum = s.momentum_end - (s.momentum_end - s.momentum_start) * (math.cos(math.pi * self.step / total) + 1) / 2
        return temp, momentum

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        temp, _ = self.schedules()
        out = model(batch.views)
        teacher, student, features = out["teacher"], out["student"], out["features"]
        b = teacher.shape[0] // 2
        if self.ssl.centering == "sinkhorn":
            targets = sinkhorn_knopp(teacher, temp)
        else:
            if self.center is None:
                self.center = torch.zeros(1, teacher.shape[1], device=teacher.device)
            self.center = self.center.to(teacher.device)
            targets = F.softmax((teacher.float() - self.center) / temp, dim=-1)
            batch_center = _all_reduce(teacher.float().sum(0, keepdim=True)) / (teacher.shape[0] * _world())
            m = self.ssl.center_momentum
            self.center = self.center * m + batch_center * (1 - m)
        log_probs = self.log_probs(student)
        views = student.shape[0] // b
        terms = []
        for i in range(2):  # each teacher global crop against every other student crop
            for j in range(views):
                if j != i:
                    terms.append(-(targets[i * b:(i + 1) * b] * log_probs[j * b:(j + 1) * b]).sum(-1).mean())
        dino = torch.stack(terms).mean()
        losses = {"loss": dino, "dino_loss": dino.detach()}
        if self.ssl.koleo_weight:
            kl = sum(koleo(features[i * b:(i + 1) * b]) for i in range(2))
            losses["loss"] = losses["loss"] + self.ssl.koleo_weight * kl
            losses["koleo"] = kl.detach()
        if "masks" in out:
            ibot = self.ibot_loss(out["teacher_patch"], out["student_patch"], out["masks"], temp)
            losses["loss"] = losses["loss"] + self.ssl.ibot_weight * ibot
            losses["ibot_loss"] = ibot.detach()
        return losses

    def log_probs(self, student: Tensor) -> Tensor:
        return F.log_softmax(student.float() / self.ssl.student_temp, dim=-1)

    def ibot_loss(self, teacher: Tensor, student: Tensor, masks: Tensor, temp: float) -> Tensor:
        """Cross-entropy of the student's masked patches against the teacher's balanced
        assignments; each image's patches weigh 1 / its masked count, the sum over the images
        (DINOv2's `iBOTPatchLoss.forward_masked`)."""
        targets = sinkhorn_knopp(teacher, temp, rows_vary=True)
        per_patch = -(targets * self.log_probs(student)).sum(-1)
        weights = (1.0 / masks.sum(-1).clamp(min=1))[:, None].expand_as(masks)[masks]
        return (per_patch * weights).sum() / masks.shape[0]

    def train_step(self, strategy, batches: list[Batch]) -> dict[str, Tensor]:
        totals = accumulate(strategy, batches, self)
        temp, momentum = self.schedules()
        # NOTE: host floats, as the lr is: a device tensor made each step is a copy to the GPU for nothing
        return {**totals, "teacher_temp": temp, "momentum": momentum}

    def on_step_end(self, strategy) -> None:
        """After the optimizer step: the teacher follows the student."""
        _, momentum = self.schedules()
        model = strategy.unwrapped()
        ema_update(model.teacher, model.student, momentum)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "center": None if self.center is None else self.center.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step", 0)
        center = state.get("center")
        self.center = None if center is None else center
