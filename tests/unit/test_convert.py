"""Weights move between lvmtrain and timm / open_clip with identical outputs, both ways."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch

from lvmtrain.models import (
    CLIP,
    build_model,
    load_open_clip,
    load_timm,
    lvm_to_open_clip,
    lvm_to_timm,
    open_clip_to_lvm,
    timm_to_lvm,
)
from tests.conftest import OPEN_CLIP_DEBUG_CFG

ATOL = 1e-4
CAPTIONS = ["a photo of a dog", "a diagram", "two cats asleep on a red sofa in the sun"]



def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "timm_name, preset, kwargs, overrides",
    [
        ("vit_base_patch16_224", "vit_b16", {}, {}),
        (
            "vit_small_patch16_224",
            "vit_s16",
            dict(img_size=64, global_pool="avg", num_classes=10),
            dict(image_size=64, global_pool="avg", num_classes=10),
        ),
        (
            "vit_tiny_patch16_224",
            "vit_ti16",
            dict(img_size=32, num_classes=0),
            dict(image_size=32, num_classes=0),
        ),
    ],
)
def test_timm_round_trip(timm_name, preset, kwargs, overrides):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    ours = build_model(preset, **overrides).eval()
    load_timm(ours, ref.state_dict())
    size = overrides.get("image_size", 224)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref(images)
        assert _max_diff(ours(images), expected) < ATOL
        assert _max_diff(ours.forward_features(images), ref.forward_features(images)) < ATOL

        torch.manual_seed(1)
        back = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
        assert _max_diff(back(images), expected) > ATOL  # a fresh model really is different
        back.load_state_dict(lvm_to_timm(ours.state_dict()), strict=True)
        assert _max_diff(back(images), expected) < ATOL


def _open_clip_outputs(model, images, tokens):
    image = model.encode_image(images, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    return image, text, model.logit_scale.exp() * image @ text.T


def _lvm_outputs(model, images, tokens):
    out = model(images, tokens)
    image, text = out["image_features"], out["text_features"]
    return image, text, out["logit_scale"] * image @ text.T


def _assert_clip_equal(ref, ours, images, tokens):
    with torch.no_grad():
        expected = _open_clip_outputs(ref, images, tokens)
        got = _lvm_outputs(ours, images, tokens)
        raw_image = _max_diff(ours.encode_image(images), ref.encode_image(images))
        raw_text = _max_diff(ours.encode_text(tokens), ref.encode_text(tokens))
    for name, a, b in zip(("image", "text", "logits"), got, expected):
        assert _max_diff(a, b) < ATOL, name
    assert raw_image < ATOL and raw_text < ATOL
    return expected


def test_open_clip_b32_round_trip():
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(2.5)  # away from the init value, so a dropped logit_scale shows
    ours = build_model("clip_b32").eval()
    load_open_clip(ours, ref.state_dict())
    images, tokens = torch.randn(2, 3, 224, 224), open_clip.tokenize(CAPTIONS[:2])
    expected = _assert_clip_equal(ref, ours, images, tokens)

    torch.manual_seed(1)
    back = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    back.load_state_dict(lvm_to_open_clip(ours.state_dict()), strict=True)
    with torch.no_grad():
        for a, b in zip(_open_clip_outputs(back, images, tokens), expected):
            assert _max_diff(a, b) < ATOL


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_debug_round_trip(quick_gelu):
    torch.manual_seed(0)
    ref = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG, quick_gelu=quick_gelu).eval()
    if quick_gelu:
        vision = dict(image_size=32, patch_size=4, width=128, depth=4, num_heads=4)
        text = dict(width=128, depth=3, num_heads=4)
        ours = CLIP(128, vision=vision, text=text, act="quick_gelu").eval()
    else:
        ours = build_model("clip_debug").eval()
    load_open_clip(ours, ref.state_dict())
    images, tokens = torch.randn(3, 3, 32, 32), open_clip.tokenize(CAPTIONS)
    _assert_clip_equal(ref, ours, images, tokens)

    back = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG, quick_gelu=quick_gelu).eval()
    back.load_state_dict(lvm_to_open_clip(ours.state_dict()), strict=True)
    _assert_clip_equal(back, ours, images, tokens)


def test_open_clip_mapping_is_one_to_one():
    with torch.device("meta"):
        ref_sd = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG).state_dict()
        ours_sd = build_model("clip_debug").state_dict()
    converted = open_clip_to_lvm(ref_sd)
    assert len(converted) == len(ref_sd) == len(ours_sd)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours_sd.items()}
    assert lvm_to_open_clip(converted).keys() == ref_sd.keys()


def test_open_clip_buffers_dropped_and_vector_logit_scale():
    torch.manual_seed(0)
    ref = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG, nonscalar_logit_scale=True)
    sd = dict(ref.state_dict())
    sd["attn_mask"] = ref.attn_mask
    assert sd["logit_scale"].shape == (1,)
    ours = build_model("clip_debug")
    load_open_clip(ours, sd)
    assert ours.logit_scale.shape == (1,)
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item())


def test_open_clip_shorter_context_truncates_positions():
    torch.manual_seed(0)
    ref = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG).eval()
    full, short = build_model("clip_debug").eval(), build_model("clip_debug", context_length=16).eval()
    load_open_clip(full, ref.state_dict())
    load_open_clip(short, ref.state_dict())
    tokens = open_clip.tokenize(CAPTIONS[:2])  # every caption ends well before position 16
    with torch.no_grad():
        assert _max_diff(short.encode_text(tokens[:, :16]), ref.encode_text(tokens)) < ATOL
        assert _max_diff(short.encode_text(tokens[:, :16]), full.encode_text(tokens)) < ATOL


def test_unknown_and_missing_keys_are_named():
    with torch.device("meta"):
        ref_sd = open_clip.CLIP(**OPEN_CLIP_DEBUG_CFG).state_dict()
        vit_sd = build_model("vit_debug").state_dict()
    with pytest.raises(KeyError, match="visual.attn_pool.query"):
        open_clip_to_lvm({**ref_sd, "visual.attn_pool.query": torch.zeros(1)})
    with pytest.raises(KeyError, match="model lacks: 'logit_bias'"):  # SigLIP's bias, into a CLIP built without one
        load_open_clip(build_model("clip_debug"), {**ref_sd, "logit_bias": torch.zeros(())})
    with pytest.raises(KeyError, match="text.extra"):
        lvm_to_open_clip({"text.extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="reg_token"):
        timm_to_lvm({**vit_sd, "reg_token": torch.zeros(1, 4, 128)})

    missing = {k: v for k, v in ref_sd.items() if k != "ln_final.weight"}
    with pytest.raises(KeyError, match=r"text.norm.weight.*open_clip: 'ln_final.weight'"):
        load_open_clip(build_model("clip_debug"), missing)
    missing_vit = {k: v for k, v in build_model("vit_debug").state_dict().items() if k != "head.bias"}
    with pytest.raises(KeyError, match="head.bias"):
        load_timm(build_model("vit_debug"), missing_vit)
