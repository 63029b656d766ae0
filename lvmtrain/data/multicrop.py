"""DINO-style multi-crop views (DINOv2's `DataAugmentationDINO`), made by the loader's workers.

Two global crops and `n_local` local crops of each image, each with its own RandomResizedCrop,
flip, colour jitter, grayscale, blur and (second global crop only) solarisation. Every random
choice is a uniform of `augment_uniforms(seed, epoch, [index], DRAWS)`, so a sample's views are a
pure function of (seed, epoch, index): the same on any rank or worker, and after a resume.

Everything works in place on the uint8 HxWx3 crop with OpenCV: a float copy per crop, or PIL's
per-op image objects, would cost more than the JPEG decode (see transforms.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from lvmtrain.data.transforms import CROP_DRAWS, random_resized_crop

# Where each view's draws sit within its PER_VIEW uniforms (after the crop's CROP_DRAWS).
_JITTER = CROP_DRAWS  # apply, then a factor per op, then a sort key per op (the random order)
_GRAY = _JITTER + 9
_BLUR = _GRAY + 1  # apply, sigma
_SOLARIZE = _BLUR + 2
PER_VIEW = _SOLARIZE + 1

JITTER_P, GRAY_P, SOLARIZE_P = 0.8, 0.2, 0.2
BLUR_SIGMA = (0.1, 2.0)
# torchvision's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1): each factor is
# uniform in [low, low + span)
_JITTER_LOW, _JITTER_SPAN = (0.6, 0.6, 0.8, -0.1), (0.8, 0.8, 0.4, 0.2)
_SOLARIZE_LUT = np.array([v if v < 128 else 255 - v for v in range(256)], np.uint8)  # threshold 128
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as torchvision's rgb_to_grayscale
_TO_GRAY = np.tile(_LUMA, (3, 1))  # RGB -> (luma, luma, luma)


class ViewPlan(NamedTuple):
    """The photometric choices of one view (its crop and flip are `random_resized_crop`'s)."""

    jitter: tuple[tuple[int, float], ...]
    """(op, factor) in the order applied; op 0..3: brightness, contrast, saturation, hue; () when not jittered."""
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


class MultiCropTransform:
    """HxWx3 uint8 array -> 2 global crops (`global_size`) then `n_local` local crops
    (`local_size`), uint8 HxWx3 each. Blur is applied with p=1.0 to the first global crop, 0.1 to
    the second, 0.5 to local crops; solarisation with p=0.2 to the second global crop only."""

    def __init__(self, global_size: int, local_size: int, n_local: int, *,
                 global_scale: tuple[float, float] = (0.32, 1.0), local_scale: tuple[float, float] = (0.05, 0.32)):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.image_size = global_size  # Batch.image is the first global crop
        self.sizes = (global_size,) * 2 + (local_size,) * n_local
        self.scales = (global_scale,) * 2 + (local_scale,) * n_local
        self.blur_p = (1.0, 0.1) + (0.5,) * n_local
        self.solarize_p = (0.0, SOLARIZE_P) + (0.0,) * n_local
        self.DRAWS = PER_VIEW * len(self.sizes)

    def plan(self, uniforms) -> list[ViewPlan]:
        """Each view's photometric choices, from a sample's DRAWS uniforms."""
        u = uniforms.tolist() if isinstance(uniforms, np.ndarray) else list(uniforms)
        plans = []
        for k in range(len(self.sizes)):
            v = u[k * PER_VIEW:(k + 1) * PER_VIEW]
            jitter = ()
            if v[_JITTER] < JITTER_P:
                order = sorted(range(4), key=lambda op: v[_JITTER + 5 + op])
                jitter = tuple((op, _JITTER_LOW[op] + _JITTER_SPAN[op] * v[_JITTER + 1 + op]) for op in order)
            sigma = None
            if v[_BLUR] < self.blur_p[k]:
                # NOTE: DINOv2's sigmas are for 224 px global / 96 px local crops: scaled to this
                # crop's size, the blur is as strong relative to the image (at 28 px it would erase it)
                sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * v[_BLUR + 1]
                sigma *= self.sizes[k] / (224 if k < 2 else 96)
            plans.append(ViewPlan(jitter, v[_GRAY] < GRAY_P, sigma, v[_SOLARIZE] < self.solarize_p[k]))
        return plans

    def __call__(self, array: np.ndarray, uniforms, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """The views of `array`, written into `out` (C-contiguous arrays of `sizes`) when given."""
        u = uniforms.tolist() if isinstance(uniforms, np.ndarray) else list(uniforms)
        views = out if out is not None else [np.empty((s, s, 3), np.uint8) for s in self.sizes]
        for k, (view, plan) in enumerate(zip(views, self.plan(u))):
            random_resized_crop(array, u[k * PER_VIEW:k * PER_VIEW + CROP_DRAWS], self.scales[k], view)
            apply_plan(view, plan)
        return views


def apply_plan(img: np.ndarray, plan: ViewPlan) -> None:
    """Colour jitter, grayscale, blur, solarisation, in DINOv2's order, in place on uint8 `img`."""
    for op, factor in plan.jitter:
        _JITTER_OPS[op](img, factor)
    if plan.grayscale:
        cv2.transform(img, _TO_GRAY, dst=img)
    if plan.blur_sigma is not None:
        # NOTE: the separable filter with GaussianBlur's own kernel: ~1.7x faster than cv2.GaussianBlur
        # on uint8 (its bit-exact path). Kernel +-3 sigma, as OpenCV derives it.
        kernel = cv2.getGaussianKernel(2 * math.ceil(3 * plan.blur_sigma) + 1, plan.blur_sigma)
        cv2.sepFilter2D(img, -1, kernel, kernel, dst=img)
    if plan.solarize:
        cv2.LUT(img, _SOLARIZE_LUT, dst=img)


def _brightness(img: np.ndarray, factor: float) -> None:
    cv2.addWeighted(img, factor, img, 0.0, 0.0, dst=img)  # saturating, as torchvision's clamp


def _contrast(img: np.ndarray, factor: float) -> None:
    mean = float(np.dot(cv2.mean(img)[:3], _LUMA))
    cv2.addWeighted(img, factor, img, 0.0, (1 - factor) * mean, dst=img)


def _saturation(img: np.ndarray, factor: float) -> None:
    # NOTE: one colour matrix (a blend with the luma): 2.5x faster than blending with a grey image
    cv2.transform(img, (1 - factor) * _TO_GRAY + factor * np.eye(3, dtype=np.float32), dst=img)


def _hue(img: np.ndarray, factor: float) -> None:
    # NOTE: uint8 HSV with the hue on 0..255 ("FULL"): uint8 addition wraps around the hue circle;
    # ~6x faster than a float32 round trip, at most a few levels off on weakly saturated pixels.
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0]
    hue += np.uint8(round(factor * 256) % 256)
    cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL, dst=img)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)
