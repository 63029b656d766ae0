"""Image preprocessing. Random choices come from a per-sample generator, so augmentation is a pure
function of (seed, epoch, sample index): the same on any number of ranks and workers, and repeated
exactly after a resume.

Workers produce uint8 HWC tensors; layout change and normalisation to float happen once per batch
on the device (`ImageNormalizer`): a float image is 4x the bytes through worker IPC and
host-to-device copies, and per-image float ops or transposes in a worker cost as much as the JPEG
decode itself.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

try:  # libjpeg-turbo without PIL's per-image overhead: ~1.6x faster decodes
    import simplejpeg
except ImportError:  # pragma: no cover - optional speed-up
    simplejpeg = None
try:  # SIMD resize: ~6x faster than PIL's for these sizes
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from DataLoader workers
except ImportError:  # pragma: no cover - optional speed-up
    cv2 = None


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image, whatever the mode (palette, alpha, greyscale, CMYK)."""
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


def decode_rgb_array(data: bytes) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB array; the fast path for baseline/progressive RGB JPEGs."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # CMYK and other exotic JPEGs: PIL handles them below
    return np.asarray(decode_rgb(data))


def resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking 2x or more (where bilinear aliases),
    bilinear otherwise (OpenCV's area filter costs 5x bilinear at non-integer ratios near 1)."""
    if cv2 is not None:
        shrink = max(array.shape[0], array.shape[1]) / size
        return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))


class ImageTransform:
    """RandomResizedCrop + flip for training, centre crop + resize for evaluation: HxWx3 uint8
    array -> SxSx3 uint8 tensor."""

    def __init__(self, image_size: int, *, train: bool, scale_min: float = 0.9, hflip: bool = True):
        self.image_size = image_size
        self.train = train
        self.scale = (scale_min, 1.0)
        self.hflip = hflip

    def __call__(self, array: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        height, width = array.shape[:2]
        if self.train:
            top, left, h, w = self._crop_box(width, height, rng)
        else:
            side = min(width, height)
            top, left, h, w = (height - side) // 2, (width - side) // 2, side, side
        out = resize(array[top:top + h, left:left + w], self.image_size)
        if self.train and self.hflip and rng.random() < 0.5:
            # NOTE: numpy copies a reversed view element by element: 10x slower than cv2.flip.
            out = cv2.flip(out, 1) if cv2 is not None else np.ascontiguousarray(out[:, ::-1])
        return torch.from_numpy(out)

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


class ImageNormalizer:
    """uint8 NHWC batch -> float NCHW (channels-last in memory), scaled to [0, 1] and normalised
    per channel, on the batch's device."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
