"""Image preprocessing. Random choices come from a per-sample generator, so augmentation is a pure
function of (seed, epoch, sample index): the same on any number of ranks and workers, and repeated
exactly after a resume."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to RGB, whatever the mode (palette, alpha, greyscale, CMYK)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # NOTE: composite on white rather than dropping alpha, which would leave transparent pixels
        # with whatever colour they happen to store (often black).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageTransform:
    """RandomResizedCrop + flip for training, resize + centre crop for evaluation, then normalise."""

    def __init__(self, image_size: int, *, train: bool, mean: list[float], std: list[float],
                 scale_min: float = 0.9, hflip: bool = True):
        self.image_size = image_size
        self.train = train
        self.mean = mean
        self.std = std
        self.scale = (scale_min, 1.0)
        self.hflip = hflip

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        size = [self.image_size, self.image_size]
        if self.train:
            top, left, h, w = self._crop_box(img.width, img.height, rng)
            img = F.resized_crop(img, top, left, h, w, size, antialias=True)
            if self.hflip and rng.random() < 0.5:
                img = F.horizontal_flip(img)
        else:
            img = F.resize(img, self.image_size, antialias=True)
            img = F.center_crop(img, size)
        x = F.to_dtype(F.to_image(img), torch.float32, scale=True)
        return F.normalize(x, self.mean, self.std)

    def _crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop sampling, drawn from `rng` instead of the global RNG."""
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side
