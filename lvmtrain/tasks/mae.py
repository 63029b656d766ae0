"""MAE (He et al. 2022): the ViT encoder sees a random 25% of each image's patches; a light decoder
predicts the pixels of the others (MSE on each patch's normalised pixels, masked patches only).

The masks come from torch's RNG (the checkpoint saves and restores it: a resumed run draws the
same masks); the loss is a mean over images with equally many masked patches each, so
micro-batches accumulate exactly. The encoder's weights are a plain ViT's under `encoder.`: an
export (`ckpt export --format timm`) is that ViT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lvmtrain.data.batch import Batch
from lvmtrain.models.layers import block_macs, fwd_bwd_flops, init_blocks_timm, make_blocks, mlp_hidden_dim, run_blocks
from lvmtrain.models.vit import VisionTransformer
from lvmtrain.tasks.base import TaskDefaults, accumulate

BACKBONE = "encoder."  # the prefix of the encoder's weights: what an export keeps


class Decoder(nn.Module):
    """MAE's light decoder: the seen tokens, mask tokens for the others, back in patch order,
    through `depth` blocks to each patch's pixels."""

    def __init__(self, encoder: VisionTransformer, width: int, depth: int):
        super().__init__()
        self.prefix = encoder.num_prefix_tokens
        self.embed = nn.Linear(encoder.width, width)
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, encoder.seq_len, width))
        self.blocks = make_blocks(depth, 0.0, dim=width, num_heads=max(1, width // 64), mlp_ratio=4.0, qkv_bias=True,
                                  act="gelu", norm_eps=1e-6)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, encoder.patch_embed.patch_size**2 * 3)

    def forward(self, x: Tensor, restore: Tensor) -> Tensor:
        """Encoder tokens (B, prefix + seen, D) and each patch's rank in the shuffle -> pixels (B, N, p*p*3)."""
        y = self.embed(x)
        b, seen = y.shape[0], y.shape[1] - self.prefix
        body = torch.cat([y[:, self.prefix:], self.mask_token.expand(b, restore.shape[1] - seen, -1)], dim=1)
        body = body.gather(1, restore[..., None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :self.prefix], body], dim=1) + self.pos_embed
        return self.pred(self.norm(run_blocks(self.blocks, y, 0))[:, self.prefix:])


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.75, decoder_width: int = 512,
                 decoder_depth: int = 8, norm_pix_loss: bool = True):
        super().__init__()
        self.encoder = encoder
        patches = encoder.patch_embed.num_patches
        self.patch_size = encoder.patch_embed.patch_size
        self.keep = max(1, round((1 - mask_ratio) * patches))
        self.norm_pix_loss = norm_pix_loss
        self.decoder = Decoder(encoder, decoder_width, decoder_depth)
        self.decoder_width = decoder_width
        self.init_weights(encoder=False)

    @torch.no_grad()
    def init_weights(self, encoder: bool = True) -> None:
        """(Re)initialise (meta-device builds); the encoder's own init unless `encoder=False`."""
        if encoder:
            self.encoder.init_weights()
        d = self.decoder
        nn.init.normal_(d.mask_token, std=0.02)
        nn.init.trunc_normal_(d.pos_embed, std=0.02)
        init_blocks_timm(d.blocks)
        for linear in (d.embed, d.pred):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        d.norm.reset_parameters()

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def set_grad_checkpointing(self, enable: bool | int = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.mask_token", "decoder.pos_embed"}

    fsdp_forward_methods = (("encoder", "forward_seen"), ("encoder", "encode_image"))

    def encode_image(self, x: Tensor) -> Tensor:
        """The encoder's pooled features of whole images (k-NN and linear probes)."""
        return self.encoder.encode_image(x)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, patches, p*p*3), patches in the encoder's order."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        b, n = images.shape[0], self.encoder.patch_embed.num_patches
        order = torch.rand(b, n, device=images.device).argsort(dim=1)  # the first `keep` of each row are seen
        restore = order.argsort(dim=1)
        x = self.encoder.forward_seen(images, order[:, :self.keep])

        pred = self.decoder(x, restore).float()

        target = self.patchify(images.float())
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = (restore >= self.keep).float()  # 1 where the encoder did not see the patch
        per_patch = (pred - target).square().mean(-1)
        return {"loss": (per_patch * masked).sum() / masked.sum()}

    def forward_macs(self) -> int:
        enc = self.encoder
        macs = enc.patch_embed.num_patches * 3 * self.patch_size**2 * enc.width
        macs += len(enc.blocks) * block_macs(self.keep + enc.num_prefix_tokens, enc.width, enc.mlp_hidden_dim)
        seq, dw = enc.seq_len, self.decoder_width
        macs += (self.keep + enc.num_prefix_tokens) * enc.width * dw + seq * dw * self.patch_size**2 * 3
        macs += len(self.decoder.blocks) * block_macs(seq, dw, mlp_hidden_dim(dw, 4.0))
        return macs

    def flops_per_sample(self, train: bool = True) -> int:
        """Training FLOPs per image: the encoder on the seen patches, the decoder on all."""
        return fwd_bwd_flops(self.forward_macs())


class MaeTask(TaskDefaults):
    """batch {"image"} -> {"loss"}: pixels of the masked patches."""

    name = "mae"
    fields: tuple[str, ...] = ()
    eval_kind = "knn"
    backbone_prefix = BACKBONE

    def __init__(self, cfg):
        self.ssl = cfg.ssl

    @classmethod
    def from_config(cls, cfg, *, context_length: int | None = None) -> MaeTask:
        return cls(cfg)

    def model_args(self) -> dict:
        return {"num_classes": 0}

    def wrap_model(self, backbone: nn.Module) -> nn.Module:
        s = self.ssl
        return MaskedAutoencoder(backbone, mask_ratio=s.mask_ratio,
                                 decoder_width=s.decoder_width or min(512, backbone.width),
                                 decoder_depth=s.decoder_depth or min(8, len(backbone.blocks)),
                                 norm_pix_loss=s.norm_pix_loss)

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return model(batch.image)

    def train_step(self, strategy, batches: list[Batch]) -> dict[str, Tensor]:
        return accumulate(strategy, batches, self)

