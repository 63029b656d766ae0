"""Vision Transformer (Dosovitskiy et al., 2021) with timm's state-dict names.

A timm `vit_*` state dict loads into this module as is, and this module's state dict loads into
timm's `VisionTransformer`; the same class, with CLIP options, is the image tower of `CLIP`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvmtrain.models.layers import (
    block_macs,
    fwd_bwd_flops,
    init_blocks_clip,
    init_blocks_timm,
    make_blocks,
    mlp_hidden_dim,
    run_blocks,
)

GLOBAL_POOLS = ("token", "avg")
INIT_MODES = ("timm", "clip")


def num_kept_patches(num_patches: int, patch_dropout: float) -> int:
    """Patch tokens each image keeps in training under `patch_dropout` (at least one)."""
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(
            f"model.patch_dropout must be in [0, 1) (the fraction of patch tokens dropped in "
            f"training; 0 turns it off), got {patch_dropout}"
        )
    return max(1, round((1.0 - patch_dropout) * num_patches))


class PatchDropout(nn.Module):
    """FLIP's patch dropout (Li et al., 2023): in training, each image keeps its own random subset
    of `keep` patch tokens; the `num_prefix_tokens` leading tokens (the class token) always stay.

    NOTE: drawn from the global RNG, like stochastic depth: a checkpoint saves each rank's RNG state
    and a resume restores it, and the gradient cache replays it for its recomputing forward, so
    the draws are the same after a resume and in both passes. The module holds no parameters or
    buffers.
    """

    def __init__(self, num_patches: int, keep: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.keep = keep
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.keep == self.num_patches:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        noise = torch.rand(patches.shape[:2], device=x.device)
        # NOTE: the kept indices are put back in raster order: attention does not care, but the
        # gather then reads memory in order and a hook sees the patches as they lie in the image.
        kept = noise.topk(self.keep, dim=1).indices.sort(dim=1).values
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"keep={self.keep}/{self.num_patches}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as one strided convolution."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, bias: bool) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Conv2d's own initialisation (the same draws), with the fan-in from the layer's sizes:
        `Conv2d.reset_parameters` reads it from the weight's shape, which a parameter partitioned
        by DeepSpeed's zero.Init no longer has."""
        bound = (self.proj.in_channels * self.patch_size**2) ** -0.5
        nn.init.uniform_(self.proj.weight, -bound, bound)
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of {self.image_size}x{self.image_size}, got {tuple(x.shape[-2:])}; "
                "the position table is built for one size (set image_size when building the model)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with a class token, learned absolute positions and pre-norm blocks.

    Args:
        image_size: square input side in pixels; fixes the length of the position table.
        patch_size: square patch side in pixels.
        width: token dimension (timm's `embed_dim`).
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / width.
        num_classes: output size of `head`; 0 means no head (`forward` returns pooled features).
        global_pool: "token" (class token, then `norm`) or "avg" (mean of patch tokens, then
            `fc_norm`; `norm` is then an identity, exactly as in timm).
        qkv_bias: bias in the fused qkv projection.
        patch_bias: bias in the patch-embedding convolution (CLIP has none).
        pre_norm: LayerNorm after adding positions, before the blocks (CLIP's `ln_pre`).
        head_bias: bias in `head` (CLIP's projection has none).
        act: "gelu" or "quick_gelu".
        norm_eps: LayerNorm epsilon (timm 1e-6, open_clip 1e-5).
        drop_path_rate: stochastic depth at the last block, linear from 0 at the first.
        init_mode: "timm" (trunc_normal 0.02) or "clip" (open_clip's width-scaled normals).
        patch_dropout: fraction of patch tokens dropped in training, in [0, 1) (FLIP, Li et al.
            2023): each image keeps max(1, round((1 - p) x patches)) random patches plus the class
            token, after the position add and before `norm_pre` and the blocks; "avg" pooling then
            averages the kept patches. Nothing is dropped in eval mode; `flops_per_sample(train=...)`
            counts either token count.
        class_token: a leading class token (CLIP, timm); without one (SigLIP) `global_pool` must
            be "avg".
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        global_pool: str = "token",
        in_chans: int = 3,
        qkv_bias: bool = True,
        patch_bias: bool = True,
        pre_norm: bool = False,
        head_bias: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        init_mode: str = "timm",
        patch_dropout: float = 0.0,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        if not class_token and global_pool == "token":
            raise ValueError("global_pool 'token' needs the class token; use 'avg' without one")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
        if init_mode not in INIT_MODES:
            raise ValueError(f"init_mode {init_mode!r} is not one of {INIT_MODES}")
        self.width = self.num_features = width
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.init_mode = init_mode
        self.mlp_hidden_dim = mlp_hidden_dim(width, mlp_ratio)
        self.grad_checkpointing = 0
        self.dynamic_size = False  # other image sizes get resized positions (set by DINO for its local crops)

        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, width, bias=patch_bias)
        self.num_prefix_tokens = int(class_token)
        self.cls_token = nn.Parameter(torch.empty(1, 1, width)) if class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + self.num_prefix_tokens, width))
        num_patches = self.patch_embed.num_patches
        self.patch_drop = PatchDropout(
            num_patches, num_kept_patches(num_patches, patch_dropout), self.num_prefix_tokens
        )
        self.norm_pre = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = make_blocks(
            depth,
            drop_path_rate,
            dim=width,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            act=act,
            norm_eps=norm_eps,
        )
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(width, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(width, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(width, num_classes, bias=head_bias) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def seq_len(self) -> int:
        """Tokens the blocks see in eval (all patches + the class token)."""
        return self.patch_embed.num_patches + self.num_prefix_tokens

    @property
    def train_seq_len(self) -> int:
        """Tokens the blocks see in training, after patch dropout."""
        return self.patch_drop.keep + self.num_prefix_tokens

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; valid after `to_empty()` on a meta-device model."""
        self.patch_embed.reset_parameters()
        for norm in (self.norm_pre, self.norm, self.fc_norm):
            if isinstance(norm, nn.LayerNorm):
                norm.reset_parameters()
        if self.init_mode == "timm":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=1e-6)
            init_blocks_timm(self.blocks)
            head_std = 0.02
        else:
            scale = self.width**-0.5
            nn.init.normal_(self.pos_embed, std=scale)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=scale)
            init_blocks_clip(self.blocks, self.width)
            head_std = scale
        if isinstance(self.head, nn.Linear):
            if self.init_mode == "timm":
                nn.init.trunc_normal_(self.head.weight, std=head_std)
            else:
                nn.init.normal_(self.head.weight, std=head_std)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        """Recompute every block (True / 1), every N-th block (N), or none (False / 0) in backward."""
        self.grad_checkpointing = int(enable)

    @property
    def image_size(self) -> int:
        """Input resolution the position table was built for."""
        return self.patch_embed.image_size

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} if self.cls_token is not None else {"pos_embed"}

    def forward_features(self, x: Tensor, masks: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + patches, width) after the final norm; in training
        with patch dropout, (B, `train_seq_len`, width): the class token, then the kept patches.
        `masks` (B, patches; bool) replaces those patches' embeddings by `mask_token` (width,)
        before the positions are added (iBOT, as DINOv2's `prepare_tokens_with_masks`)."""
        if self.dynamic_size and x.shape[-1] != self.image_size:  # e.g. DINO's local crops
            x, pos = self.patch_embed.proj(x).flatten(2).transpose(1, 2), self.resized_pos_embed(x.shape[-1])
        else:
            x, pos = self.patch_embed(x), self.pos_embed
        if masks is not None:
            x = torch.where(masks[..., None], mask_token.to(x.dtype), x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + pos
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def resized_pos_embed(self, size: int) -> Tensor:
        """The position table for square images of `size` pixels (a multiple of the patch size):
        the patch positions resized bicubically (DINOv2's `interpolate_pos_encoding`)."""
        grid, prefix = self.patch_embed.grid_size, self.num_prefix_tokens
        if size % self.patch_embed.patch_size:
            raise ValueError(f"images of {size} px: not a multiple of the {self.patch_embed.patch_size} px patches")
        new = size // self.patch_embed.patch_size
        patches = self.pos_embed[:, prefix:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(new, new), mode="bicubic", align_corners=False)
        patches = patches.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new * new, -1)
        return torch.cat([self.pos_embed[:, :prefix], patches], dim=1)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """The patch tokens of `forward_features`' output, normalised as pooled features are
        (`norm` already applied, or `fc_norm` with mean pooling)."""
        x = tokens[:, self.num_prefix_tokens :]
        return self.fc_norm(x) if self.global_pool == "avg" else x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            x = x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    fsdp_forward_methods = (("", "encode_image"), ("", "forward_seen"))
    """(unit, method) pairs FSDP2 treats as forwards (see distributed/fsdp.py)."""

    def forward_seen(self, x: Tensor, seen: Tensor) -> Tensor:
        """Tokens (B, prefix + k, width) after the final norm, of images whose blocks see only the
        patches `seen` (B, k indices; MAE). Without a final norm (mean pooling), `fc_norm`."""
        prefix = self.num_prefix_tokens
        x = self.patch_embed(x) + self.pos_embed[:, prefix:]
        x = x.gather(1, seen[..., None].expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        x = run_blocks(self.blocks, self.norm_pre(x), self.grad_checkpointing)
        return self.fc_norm(x) if isinstance(self.norm, nn.Identity) else self.norm(x)

    def encode_image(self, x: Tensor) -> Tensor:
        """The pooled image features before the head (k-NN and linear probes score these)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward_macs(self, train: bool = True) -> int:
        """Multiply-accumulates of one image's forward; `train` counts the blocks on the tokens
        left by patch dropout, `train=False` on all of them (eval). The patch embedding runs on
        every patch either way."""
        patch = self.patch_embed
        in_chans = patch.proj.in_channels
        macs = patch.num_patches * in_chans * patch.patch_size**2 * self.width
        tokens = self.train_seq_len if train else self.seq_len
        macs += len(self.blocks) * block_macs(tokens, self.width, self.mlp_hidden_dim)
        if isinstance(self.head, nn.Linear):
            macs += self.head.in_features * self.head.out_features
        return macs

    def flops_per_sample(self, train: bool = True) -> int:
        """Analytic training FLOPs (forward + backward) for one image.

        `train` (the default, for MFU) counts the tokens a training step processes after patch
        dropout; `train=False` counts a full sequence, as an eval forward sees it.

        forward = 2 x the multiply-accumulates of every matmul / conv: patch embedding, qkv,
        q@k^T, attention@v, output projection, MLP fc1 and fc2, and the head; backward = 2 x
        forward, so the total is 3 x forward. Norms, softmax, GELU, bias adds and the position
        add are ignored (they are O(tokens x width), not O(tokens x width^2)).
        """
        return fwd_bwd_flops(self.forward_macs(train))


def unmask_patches_from(model: nn.Module, step: int):
    """A hook for the training loop (called with each step about to run): from `step` on, every
    `VisionTransformer` in `model` keeps all its patches (FLIP's unmasked tuning). Idempotent, so
    a run resumed past `step` is unmasked at once."""

    def hook(current: int) -> None:
        if current >= step:
            for module in model.modules():
                if isinstance(module, PatchDropout):
                    module.keep = module.num_patches

    return hook
