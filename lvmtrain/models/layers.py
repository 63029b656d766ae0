"""Transformer pieces shared by the image and text towers.

Module and parameter names follow timm's `vision_transformer.py` (`norm1`, `attn.qkv`, `attn.proj`,
`norm2`, `mlp.fc1`, `mlp.fc2`) so that a timm checkpoint loads without renaming; open_clip's names
are mapped onto these in `convert.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by OpenAI's CLIP weights (open_clip `-quickgelu`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; expected 'gelu' or 'quick_gelu'")


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The qkv weight is laid out [q; k; v] with heads contiguous inside each, which is both timm's
    layout and `nn.MultiheadAttention.in_proj_weight`'s, so open_clip weights copy over unchanged.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_hidden_dim(dim: int, mlp_ratio: float) -> int:
    # NOTE: int() truncation, as both timm and open_clip do; ViT-g's 48/11 ratio relies on it.
    return int(dim * mlp_ratio)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        drop_path: float = 0.0,
        is_causal: bool = False,
    ) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim(dim, mlp_ratio), act=act)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), is_causal=self.is_causal))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def make_blocks(depth: int, drop_path_rate: float, **block_kwargs) -> nn.ModuleList:
    # Stochastic depth grows linearly with depth (DeiT / timm schedule).
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(Block(drop_path=r, **block_kwargs) for r in rates)


def run_blocks(blocks: nn.ModuleList, x: Tensor, grad_checkpointing: int) -> Tensor:
    """Run the blocks, recomputing every `grad_checkpointing`-th one in backward (0: none)."""
    for i, blk in enumerate(blocks):
        if grad_checkpointing and i % grad_checkpointing == 0 and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def init_blocks_timm(blocks: nn.ModuleList) -> None:
    """timm's `init_weights_vit_timm`: trunc_normal(0.02) Linear weights, zero biases."""
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()


def init_blocks_clip(blocks: nn.ModuleList, width: int) -> None:
    """open_clip's `TextTransformer.init_parameters`: std scaled by width and depth, zero biases."""
    depth = len(blocks)
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for blk in blocks:
        nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
        nn.init.normal_(blk.attn.proj.weight, std=proj_std)
        nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        for linear in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        blk.norm1.reset_parameters()
        blk.norm2.reset_parameters()


def block_macs(seq_len: int, dim: int, hidden_dim: int) -> int:
    """Multiply-accumulates of one block for one sample: qkv, q@k^T, attn@v, proj, fc1, fc2.

    Causal attention is counted as full attention: the kernel may skip the masked half, but the
    count is meant to be a stable, implementation-independent MFU denominator.
    """
    qkv = seq_len * dim * 3 * dim
    scores = seq_len * seq_len * dim
    weighted_values = seq_len * seq_len * dim
    proj = seq_len * dim * dim
    mlp = 2 * seq_len * dim * hidden_dim
    return qkv + scores + weighted_values + proj + mlp


def fwd_bwd_flops(forward_macs: int) -> int:
    # forward = 2 FLOPs per MAC; backward = 2x forward (grads w.r.t. inputs and weights).
    return 3 * 2 * forward_macs
