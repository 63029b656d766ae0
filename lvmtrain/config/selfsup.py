"""The `ssl` section: self-supervised objectives of ViTs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SSLConfig:
    """Self-supervised objectives of ViTs: MAE (`train.task=mae`) and DINOv2-style
    self-distillation (`train.task=dino`)."""

    mask_ratio: float = 0.75
    """mae: the fraction of each image's patches hidden from the encoder (drawn per image)."""
    decoder_width: int = 0
    """mae: the decoder's width (0: 512, or the encoder's width if smaller)."""
    decoder_depth: int = 0
    """mae: the decoder's blocks (0: 8, or the encoder's depth if smaller)."""
    norm_pix_loss: bool = True
    """mae: the target is each patch's pixels normalised by their own mean and variance."""
    local_crops: int = 8
    """dino: local crops per image besides the 2 global ones."""
    local_size: int = 0
    """dino: local crops' side (0: 96/224 of model.image_size, a multiple of the patch size)."""
    global_scale_min: float = 0.32
    """dino: the smallest area of a global crop (local crops take 0.05 up to it)."""
    out_dim: int = 65536
    """dino: prototypes of the DINO head (the debug config uses far fewer)."""
    head_hidden: int = 2048
    """dino: the head's MLP width."""
    head_bottleneck: int = 256
    """dino: the head's bottleneck before the weight-normalised prototypes."""
    student_temp: float = 0.1
    """dino: the student's softmax temperature."""
    teacher_temp: float = 0.07
    """dino: the teacher's softmax temperature after its warm-up from `warmup_teacher_temp`."""
    warmup_teacher_temp: float = 0.04
    """dino: the teacher's temperature at step 1."""
    teacher_temp_warmup_steps: int = 0
    """dino: steps of the teacher temperature's linear warm-up (0: 30% of training)."""
    momentum_start: float = 0.992
    """dino: the teacher's EMA momentum at step 1, rising to `momentum_end` on a cosine."""
    momentum_end: float = 1.0
    """dino: the teacher's EMA momentum at the last step."""
    centering: Literal["sinkhorn", "centering"] = "sinkhorn"
    """dino: how the teacher's outputs are balanced: Sinkhorn-Knopp (DINOv2) or a running centre (DINO)."""
    center_momentum: float = 0.9
    """dino with centering: the centre's EMA momentum."""
    koleo_weight: float = 0.1
    """dino: KoLeo regulariser of the class tokens (0: off)."""
    ibot_weight: float = 0.0
    """dino: weight of iBOT's masked-patch loss (0: off; DINOv2 uses 1)."""
    ibot_mask_share: float = 0.5
    """dino with iBOT: the share of global crops that get masked patches."""
    ibot_mask_min: float = 0.1
    """dino with iBOT: the smallest share of a masked crop's patches hidden (the batch's masked
    crops spread their shares evenly from min to max, as DINOv2's collate)."""
    ibot_mask_max: float = 0.5
    """dino with iBOT: the largest share of a masked crop's patches hidden."""
