"""MFU's numerator: each model's analytic training FLOPs against a count by hand and against
torch's own FLOP counter on a real forward + backward."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lvmtrain.metrics import device_peak_flops, gpu_peak_tflops, measure_matmul_flops
from lvmtrain.models.registry import build_model


def transformer_macs(tokens: int, width: int, layers: int, mlp: int) -> int:
    """Multiply-accumulates of `layers` pre-norm blocks: qkv, q@k^T, attn@v, out proj, 2 MLP matmuls."""
    return layers * (tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
                     + 2 * tokens * width * mlp)


def train_flops(macs: int) -> int:
    return 3 * 2 * macs  # forward = 2 FLOPs per MAC; backward = 2 x forward


def test_vit_b16_matches_a_hand_count():
    # 224 px / 16 = 14 x 14 patches + the class token; width 768, 12 layers, MLP 3072, 1000 classes
    macs = 196 * (3 * 16 * 16) * 768 + transformer_macs(197, 768, 12, 3072) + 768 * 1000
    with torch.device("meta"):
        model = build_model("vit_b16", num_classes=1000)
    assert model.flops_per_sample() == pytest.approx(train_flops(macs), rel=0.02)
    assert train_flops(macs) / 1e9 == pytest.approx(105.4, rel=0.01)  # the usual "17.6 GMACs" x 6


def test_clip_b32_matches_a_hand_count():
    image = 49 * (3 * 32 * 32) * 768 + transformer_macs(50, 768, 12, 3072) + 768 * 512
    text = transformer_macs(77, 512, 12, 2048) + 512 * 512  # full (not causal) attention, as counted
    with torch.device("meta"):
        model = build_model("clip_b32")
    assert model.flops_per_sample() == pytest.approx(train_flops(image + text), rel=0.02)


@pytest.mark.parametrize("name", ["vit_b16", "clip_b32"])
def test_analytic_flops_match_torch_flop_counter(name):
    """torch's FlopCounterMode on a forward + backward of one sample (on the meta device: shapes only)."""
    with torch.device("meta"):
        model = build_model(name, **({"num_classes": 1000} if name.startswith("vit") else {}))
        image = torch.randn(1, 3, 224, 224)
        text = torch.zeros(1, 77, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        if name.startswith("vit"):
            model(image).sum().backward()
        else:
            out = model(image, text)
            (out["image_features"].sum() + out["text_features"].sum()).backward()
    # NOTE: the counter skips the patch embedding's input gradient (the image needs none): ~0.2%
    assert model.flops_per_sample() == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_peak_flops_table_and_cpu_measurement():
    assert device_peak_flops(torch.device("cpu"), "fp32", override_tflops=312.0) == (312e12, "log.peak_tflops")
    measured = measure_matmul_flops(torch.float32, size=256, repeats=2)
    assert 1e8 < measured < 1e13  # a CPU does between 0.1 GFLOP/s and 10 TFLOP/s in fp32


@pytest.mark.parametrize("name, kind, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", ("H100", 989.4)),
    ("NVIDIA H100 PCIe", "bf16", ("H100 PCIe", 756.0)),
    ("NVIDIA H200", "bf16", ("H200", 989.4)),
    ("NVIDIA A100-SXM4-80GB", "fp32", ("A100", 19.5)),
    ("NVIDIA A100 80GB PCIe", "tf32", ("A100", 156.0)),
    ("Tesla V100-SXM2-32GB", "fp16", None),
])
def test_gpu_peaks_by_device_name(name, kind, expected):
    assert gpu_peak_tflops(name, kind) == expected
