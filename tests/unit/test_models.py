"""Presets, forward contracts, grad checkpointing, meta-device init and FLOP counts."""

from __future__ import annotations

import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

from lvmtrain.models import CLIP, build_model, get_preset, list_presets, lvm_to_open_clip, model_family
from lvmtrain.models.convert import TIMM_ARCHITECTURES
from tests.conftest import OPEN_CLIP_DEBUG_CFG

VIT_PRESETS = ["vit_debug", "vit_ti16", "vit_s16", "vit_b32", "vit_b16", "vit_l14", "vit_h14", "vit_g14"]
CLIP_PRESETS = ["clip_debug", "clip_b32", "clip_b16", "clip_l14", "clip_h14", "clip_g14", "siglip_debug", "siglip_b16"]
# Materialised in fp32 on CPU; the rest (up to ~1B parameters) are only run on the meta device.
# vit_b16 and clip_b32 run for real at 224 in test_convert.py.
SMALL = {"vit_debug", "vit_ti16", "vit_s16", "vit_b32", "clip_debug", "siglip_debug"}

# timm's model of each preset's shape (vit_debug has none: its nearest name only names the family)
TIMM_NAMES = {name: timm_name for name, timm_name in TIMM_ARCHITECTURES.items() if name != "vit_debug"}
OPEN_CLIP_NAMES = {
    "clip_b32": "ViT-B-32",
    "clip_b16": "ViT-B-16",
    "clip_l14": "ViT-L-14",
    "clip_h14": "ViT-H-14",
    "clip_g14": "ViT-g-14",
}



def _small_image_size(name: str) -> int:
    patch = get_preset(name).patch_size if model_family(name) == "vit" else get_preset(name).vision.patch_size
    return 2 * patch if patch >= 14 else 32


def _tokens(batch: int, length: int = 77) -> torch.Tensor:
    # Random ids below the EOT id, then an EOT (the vocabulary's largest id) and zero padding.
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = 3 + i
        tokens[i, 0] = 49406
        tokens[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
        tokens[i, n + 1] = 49407
    return tokens


def test_presets_listed_with_family():
    assert sorted(VIT_PRESETS + CLIP_PRESETS) == list_presets()
    assert all(model_family(n) == "vit" for n in VIT_PRESETS)
    assert all(model_family(n) == "clip" for n in CLIP_PRESETS)


def test_unknown_preset_names_nearest():
    with pytest.raises(ValueError, match="vit_b16"):
        build_model("vit_b61")
    with pytest.raises(ValueError, match="clip_l14"):
        model_family("clip_l41")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_preset_forward(name):
    torch.manual_seed(0)
    size = _small_image_size(name)
    model = build_model(name, image_size=size).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if model_family(name) == "vit":
            out = model(images)
            assert out.shape == (2, get_preset(name).num_classes)
        else:
            out = model(images, _tokens(2))
            embed_dim = get_preset(name).embed_dim
            assert out["image_features"].shape == out["text_features"].shape == (2, embed_dim)
            out = out["image_features"]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", VIT_PRESETS + CLIP_PRESETS)
def test_preset_shapes_on_meta(name):
    with torch.device("meta"):
        model = build_model(name)
        size = (model.visual if isinstance(model, CLIP) else model).patch_embed.image_size
        images = torch.empty(2, 3, size, size)
        if isinstance(model, CLIP):
            out = model(images, torch.zeros(2, 77, dtype=torch.long))
            assert out["image_features"].shape == (2, model.embed_dim)
            assert out["text_features"].shape == (2, model.embed_dim)
        else:
            tokens = model.forward_features(images)
            assert tokens.shape == (2, (size // get_preset(name).patch_size) ** 2 + 1, model.width)
            assert model.forward_head(tokens).shape == (2, model.num_classes)


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("name", sorted(TIMM_NAMES) + sorted(OPEN_CLIP_NAMES) + ["clip_debug"])
def test_preset_matches_reference_architecture(name):
    """Every key and shape equals timm's / open_clip's model of the same name (built on meta)."""
    with torch.device("meta"):
        ours = build_model(name)
        if name in TIMM_NAMES:
            # NOTE: timm's ViT-H/14 defaults to no head (in21k weights); our presets have 1000 classes.
            ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
            assert _shapes(ours.state_dict()) == _shapes(ref.state_dict())
            return
        if name in OPEN_CLIP_NAMES:
            ref = open_clip.CLIP(**open_clip.get_model_config(OPEN_CLIP_NAMES[name]))
        else:
            ref = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG)
        assert _shapes(lvm_to_open_clip(ours.state_dict())) == _shapes(ref.state_dict())


def test_build_overrides():
    model = build_model("vit_debug", num_classes=0, global_pool="avg", drop_path_rate=0.2, image_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 128)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.blocks[0].drop_path1.drop_prob == 0.0

    clip = build_model("clip_debug", context_length=16)
    assert clip.text.pos_embed.shape == (1, 16, 128)
    with pytest.raises(ValueError, match="context_length"):
        build_model("vit_debug", context_length=16)
    with pytest.raises(ValueError, match="context_length"):
        build_model("clip_debug", context_length=78)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("clip_debug", num_classes=10)
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit_debug", image_size=30)
    with pytest.raises(ValueError, match="32x32"):
        build_model("vit_debug")(torch.randn(1, 3, 64, 64))


def test_clip_forward_contract():
    torch.manual_seed(0)
    model = build_model("clip_debug").eval()
    images, tokens = torch.randn(3, 3, 32, 32), _tokens(3)
    out = model(images, tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert model.logit_scale.shape == (1,)  # 1-d: shardable by FSDP2 and ZeRO-3
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    raw = model.encode_image(images)
    torch.testing.assert_close(F.normalize(raw, dim=-1), out["image_features"])
    torch.testing.assert_close(model.encode_text(tokens, normalize=True), out["text_features"])
    assert model.forward_features(images).shape == (3, 8 * 8 + 1, 128)


def test_text_is_causal_and_pooled_at_eot():
    torch.manual_seed(0)
    text = build_model("clip_debug").text.eval()
    tokens = _tokens(2)
    with torch.no_grad():
        base_feats, base_pooled = text.forward_features(tokens), text(tokens)
        later = tokens.clone()
        later[:, 20] = 123  # after every EOT: must not change anything before it, nor the pooled value
        torch.testing.assert_close(text.forward_features(later)[:, :20], base_feats[:, :20])
        torch.testing.assert_close(text(later), base_pooled)
        earlier = tokens.clone()
        earlier[:, 1] = 7
        assert not torch.allclose(text(earlier), base_pooled)
        expected = text.proj(base_feats[torch.arange(2), tokens.argmax(-1)])
        torch.testing.assert_close(base_pooled, expected)


def test_no_weight_decay_names_exist():
    vit = build_model("vit_debug")
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    clip = build_model("clip_debug")
    expected = {"logit_scale", "visual.pos_embed", "visual.cls_token", "text.pos_embed"}
    assert clip.no_weight_decay() == expected
    assert expected <= dict(clip.named_parameters()).keys()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # same drop-path draws in both runs
    if isinstance(model, CLIP):
        out = model(*batch)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(logits.shape[0])
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["vit_debug", "clip_debug"])
def test_grad_checkpointing_equivalence(name):
    torch.manual_seed(0)
    model = build_model(name, drop_path_rate=0.1).train()
    images = torch.randn(3, 3, 32, 32)
    batch = (images, _tokens(3)) if name == "clip_debug" else (images, torch.randint(0, 10, (3,)))
    block = model.visual.blocks[0] if name == "clip_debug" else model.blocks[0]
    calls = []
    # A pre-hook: non-reentrant checkpointing stops the recomputation early, before forward hooks.
    block.register_forward_pre_hook(lambda *_: calls.append(1))

    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    calls.clear()
    loss, grads = _loss_and_grads(model, batch)
    assert len(calls) == 2, "with checkpointing, the block's forward is recomputed in backward"
    second = (model.visual.blocks if name == "clip_debug" else model.blocks)[1]
    second.register_forward_pre_hook(lambda *_: calls.append(2))
    model.set_grad_checkpointing(2)  # every other block: block 0 recomputed, block 1 not
    calls.clear()
    _loss_and_grads(model, batch)
    assert calls.count(1) == 2 and calls.count(2) == 1

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = build_model("vit_debug", drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("name", ["vit_debug", "clip_debug"])
def test_meta_build_to_empty_init_weights(name):
    with torch.device("meta"):
        model = build_model(name)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))  # any tensor init_weights forgets stays NaN
    model.init_weights()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), f"{n} not initialised"
    images = torch.randn(2, 3, 32, 32)
    out = model(images, _tokens(2))["image_features"] if name == "clip_debug" else model(images)
    assert torch.isfinite(out).all()
    if name == "clip_debug":
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
        assert model.text.pos_embed.std().item() == pytest.approx(0.01, rel=0.1)
    else:
        assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def _hand_vit_forward_macs(image, patch, width, depth, mlp_hidden, num_classes):
    patches = (image // patch) ** 2
    tokens = patches + 1
    embed = patches * (3 * patch * patch) * width
    per_block = (
        tokens * width * 3 * width  # qkv
        + tokens * tokens * width  # q @ k^T over all heads
        + tokens * tokens * width  # attn @ v
        + tokens * width * width  # out proj
        + 2 * tokens * width * mlp_hidden  # fc1 + fc2
    )
    return embed + depth * per_block + width * num_classes


def test_flops_vit_b16_hand_count():
    with torch.device("meta"):
        model = build_model("vit_b16")
    hand = 3 * 2 * _hand_vit_forward_macs(224, 16, 768, 12, 3072, 1000)
    assert model.flops_per_sample() == pytest.approx(hand, rel=0.01)
    # ViT-B/16 at 224 is the well-known ~17.6 G multiply-accumulates per forward (often quoted
    # as "17.6 GFLOPs"), i.e. ~35 GFLOPs forward and ~105 GFLOPs forward + backward.
    assert model.flops_per_sample() / 6 == pytest.approx(17.6e9, rel=0.02)


def test_flops_clip_b32_hand_count():
    with torch.device("meta"):
        model = build_model("clip_b32")
    vision = _hand_vit_forward_macs(224, 32, 768, 12, 3072, 512)  # head = visual projection
    t, w = 77, 512
    text = 12 * (4 * t * w * w + 2 * t * t * w + 2 * t * w * 4 * w) + w * 512
    assert model.flops_per_sample() == pytest.approx(6 * (vision + text), rel=0.01)
    assert model.flops_per_sample() > model.visual.flops_per_sample()
