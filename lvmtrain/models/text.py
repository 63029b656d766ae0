"""CLIP text tower: a causal transformer over BPE token ids, pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lvmtrain.models.layers import (
    block_macs,
    fwd_bwd_flops,
    init_blocks_clip,
    make_blocks,
    mlp_hidden_dim,
    run_blocks,
)


class TextTransformer(nn.Module):
    """open_clip's `TextTransformer` (argmax pooling, linear projection) with timm-style names.

    Args:
        context_length: length of the position table; token sequences may be shorter, not longer.
        vocab_size: rows of the token embedding.
        width: token dimension.
        depth: number of blocks.
        num_heads: attention heads per block.
        embed_dim: output size of the projection into the joint image-text space.
        mlp_ratio: MLP hidden width / width.
        act: "gelu" or "quick_gelu" (open_clip's `-quickgelu` variants).
        norm_eps: LayerNorm epsilon (open_clip uses torch's 1e-5).
        drop_path_rate: stochastic depth at the last block, linear from 0 at the first.
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        embed_dim: int = 512,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.mlp_hidden_dim = mlp_hidden_dim(width, mlp_ratio)
        self.grad_checkpointing = 0

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, context_length, width))
        self.blocks = make_blocks(
            depth,
            drop_path_rate,
            dim=width,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            act=act,
            norm_eps=norm_eps,
            is_causal=True,
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's init; valid after `to_empty()` on a meta-device model."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        init_blocks_clip(self.blocks, self.width)
        self.norm.reset_parameters()
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        """Recompute every block (True / 1), every N-th block (N), or none (False / 0) in backward."""
        self.grad_checkpointing = int(enable)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward_features(self, tokens: Tensor) -> Tensor:
        """Token ids (B, L) -> all token features (B, L, width) after the final norm."""
        seq_len = tokens.shape[1]
        if seq_len > self.context_length:
            raise ValueError(
                f"token sequence of length {seq_len} exceeds context_length {self.context_length}; "
                "tokenize with the model's context_length"
            )
        x = self.token_embedding(tokens) + self.pos_embed[:, :seq_len]
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.forward_features(tokens)
        # NOTE: CLIP's BPE gives end-of-text the largest id in the vocabulary, so argmax finds it
        # (padding is 0); this is open_clip's `pool_type='argmax'`.
        eot = tokens.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return self.proj(x)

    def forward_macs(self) -> int:
        macs = len(self.blocks) * block_macs(self.context_length, self.width, self.mlp_hidden_dim)
        return macs + self.proj.in_features * self.proj.out_features

    def flops_per_sample(self) -> int:
        """Analytic training FLOPs (forward + backward) for one caption of `context_length` tokens.

        forward = 2 x the multiply-accumulates of qkv, q@k^T (counted as full, not causal),
        attention@v, output projection, MLP and the final projection; total = 3 x forward. The
        embedding lookup, norms, softmax and GELU are ignored.
        """
        return fwd_bwd_flops(self.forward_macs())
