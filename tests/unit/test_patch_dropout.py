"""FLIP patch dropout in `VisionTransformer`: what the blocks see, which tokens survive, a draw
that follows the (checkpointed) RNG, FLOP counts, and that eval, weights and p=0 are untouched."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch.utils.flop_counter import FlopCounterMode

from lvmtrain.models import CLIP
from lvmtrain.models.layers import block_macs
from lvmtrain.models.vit import VisionTransformer, unmask_patches_from

PATCHES = 8 * 8  # 32 px images, 4 px patches


def _vit(patch_dropout: float = 0.0, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)  # the same weights for every p: the draw happens in forward only
    kwargs = {"image_size": 32, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2,
              "num_classes": 8, **kwargs}
    return VisionTransformer(**kwargs, patch_dropout=patch_dropout)


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _capture(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every call of `module`."""
    seen = []
    module.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), out.detach())))
    return seen


def _kept_indices(tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> list[list[int]]:
    """Which input patch each output patch is, per image (patch tokens are distinct vectors)."""
    patches_in, patches_out = tokens_in[:, 1:], tokens_out[:, 1:]
    match = (patches_out[:, :, None, :] == patches_in[:, None, :, :]).all(-1)  # (B, kept, all)
    assert (match.sum(-1) == 1).all(), "every kept token is exactly one input patch"
    return match.float().argmax(-1).tolist()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_eval_output_does_not_depend_on_p(global_pool):
    images = _images()
    reference = _vit(0.0, global_pool=global_pool).eval()(images)
    for p in (0.25, 0.5, 0.9):
        model = _vit(p, global_pool=global_pool).eval()
        assert torch.equal(model(images), reference)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("p, keep", [(0.5, 32), (0.25, 48), (0.9, 6), (0.999, 1)])
def test_blocks_see_class_token_plus_kept_patches_in_training(global_pool, p, keep):
    model = _vit(p, global_pool=global_pool).train()
    seen = _capture(model.blocks[0])
    model(_images()).sum().backward()
    assert seen[0][0].shape == (4, 1 + keep, 32)
    assert model.train_seq_len == 1 + keep and model.seq_len == 1 + PATCHES
    model.eval()
    model(_images())
    assert seen[1][0].shape == (4, 1 + PATCHES, 32)


def test_each_image_keeps_its_own_patches_and_the_class_token():
    model = _vit(0.5).train()
    seen = _capture(model.patch_drop)
    image = _images(1).expand(8, -1, -1, -1)  # one image 8 times: only the draw differs
    model(image)
    tokens_in, tokens_out = seen[0]
    assert torch.equal(tokens_out[:, 0], tokens_in[:, 0])
    kept = _kept_indices(tokens_in, tokens_out)
    assert all(row == sorted(row) and len(set(row)) == 32 for row in kept)  # raster order, no repeats
    assert len({tuple(row) for row in kept}) == 8


def test_avg_pool_averages_the_kept_patches_only():
    model = _vit(0.5, global_pool="avg", num_classes=0).train()
    seen = _capture(model.norm)  # an Identity under "avg": its output is the tokens after the blocks
    pooled = model(_images())
    tokens = seen[0][1]
    assert tokens.shape[1] == 1 + 32
    torch.testing.assert_close(pooled, model.fc_norm(tokens[:, 1:].mean(dim=1)))


def _step(model: VisionTransformer, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(_images())
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_draw_follows_the_global_rng_that_a_checkpoint_restores():
    """The same RNG state (a resume restores each rank's; the gradient cache replays it) gives
    the same kept tokens, output and gradients; another state, others."""
    model = _vit(0.5).train()
    out_a, grads_a = _step(model, seed=7)
    out_b, grads_b = _step(model, seed=7)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    out_c, grads_c = _step(model, seed=8)
    assert not torch.equal(out_a, out_c)
    assert not torch.equal(grads_a["pos_embed"], grads_c["pos_embed"])
    torch.manual_seed(3)
    assert not torch.equal(model(_images()), model(_images()))  # a new draw every forward


def test_without_a_class_token_every_token_is_a_patch():
    model = _vit(0.5, global_pool="avg", num_classes=0, class_token=False).train()
    seen = _capture(model.blocks[0])
    model(_images())
    assert model.cls_token is None and model.pos_embed.shape[1] == PATCHES
    assert seen[0][0].shape[1] == 32 and model.train_seq_len == 32
    with pytest.raises(ValueError, match="global_pool 'token' needs the class token"):
        _vit(0.0, class_token=False)


def test_p0_in_training_is_the_plain_forward_and_draws_nothing():
    model = _vit(0.0).train()
    state = torch.get_rng_state()
    train_out = model(_images())
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(train_out, model.eval()(_images()))
    assert model.flops_per_sample(train=True) == model.flops_per_sample(train=False)


def test_no_new_state_dict_entries_and_meta_init():
    assert _vit(0.5).state_dict().keys() == _vit(0.0).state_dict().keys()
    with torch.device("meta"):
        model = _vit(0.5)
    model.to_empty(device="cpu")
    model.init_weights()
    model.train()
    assert torch.isfinite(model(_images())).all()


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan])
def test_p_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match=r"model\.patch_dropout must be in \[0, 1\)"):
        _vit(p)


def test_flops_count_the_tokens_processed():
    model = _vit(0.5)
    width, hidden, depth = 32, 128, 2
    blocks_train = depth * block_macs(1 + 32, width, hidden)
    blocks_eval = depth * block_macs(1 + PATCHES, width, hidden)
    assert model.forward_macs(train=False) - model.forward_macs(train=True) == blocks_eval - blocks_train
    assert model.flops_per_sample() == model.flops_per_sample(train=True) < model.flops_per_sample(train=False)
    # The blocks dominate at scale: ViT-B/16 at p=0.5 is close to the token ratio 99/197.
    with torch.device("meta"):
        vit_b = VisionTransformer(patch_dropout=0.5)
    ratio = vit_b.flops_per_sample(train=True) / vit_b.flops_per_sample(train=False)
    assert ratio == pytest.approx(99 / 197, abs=0.02)


def test_flops_match_torch_flop_counter_in_training():
    """On the meta device: shapes only, but the gather and the shorter sequence are real."""
    with torch.device("meta"):
        model = VisionTransformer(patch_dropout=0.5).train()
        images = torch.randn(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    # NOTE: the counter skips the patch embedding's input gradient (the image needs none): ~0.2%
    assert model.flops_per_sample(train=True) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_clip_passes_patch_dropout_to_the_image_tower_and_counts_it():
    vision = {"image_size": 32, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2}
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "depth": 2, "num_heads": 2}
    model = CLIP(16, vision={**vision, "patch_dropout": 0.5}, text=text).train()
    seen = _capture(model.visual.blocks[0])
    tokens = torch.randint(0, 100, (4, 16))
    model(_images(), tokens)
    assert seen[0][0].shape == (4, 1 + 32, 32)
    saved = model.flops_per_sample(train=False) - model.flops_per_sample(train=True)
    assert saved == model.visual.flops_per_sample(train=False) - model.visual.flops_per_sample(train=True) > 0


def test_autocast_and_compile():
    model = _vit(0.5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(_images()).dtype == torch.bfloat16
    explained = torch._dynamo.explain(model)(_images())
    assert explained.graph_break_count == 0, explained.break_reasons  # the global-RNG draw traces
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(1)
    out = compiled(_images())
    torch.manual_seed(1)
    assert torch.equal(out, model(_images()))


def test_unmasked_tuning_keeps_every_patch_from_its_step_on():
    """FLIP's unmasked tuning: the loop's hook turns patch dropout off from a step on (also when
    first called past it, as after a resume), and the FLOPs then count every token."""
    model = _vit(0.5).train()
    seen = _capture(model.blocks[0])
    hook = unmask_patches_from(model, 5)
    masked = model.flops_per_sample()
    for step in (3, 4, 5, 6):
        hook(step)
        model(_images())
    assert [x.shape[1] for x, _ in seen] == [33, 33, 1 + PATCHES, 1 + PATCHES]
    assert model.flops_per_sample() == model.flops_per_sample(train=False) > masked
