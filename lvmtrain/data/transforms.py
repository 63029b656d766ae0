"""Image preprocessing. Random choices are a hash of (seed, epoch, sample index), so augmentation is
a pure function of them: the same on any number of ranks and workers, and repeated
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


def resize_into(array: np.ndarray, out: np.ndarray) -> None:
    """Resize to out's size, written into `out` (a slot of the batch buffer: no extra copy).
    Area averaging when shrinking 2x or more (where bilinear aliases), bilinear otherwise
    (OpenCV's area filter costs 5x bilinear at non-integer ratios near 1)."""
    size = out.shape[0]
    if array.shape[:2] == out.shape[:2]:
        np.copyto(out, array)
    elif cv2 is not None:
        shrink = max(array.shape[0], array.shape[1]) / size
        cv2.resize(array, (size, size), dst=out, interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR)
    else:
        np.copyto(out, np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR)))


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def augment_uniforms(seed: int, epoch: int, indices, draws: int) -> np.ndarray:
    """(len(indices), draws) uniforms in [0, 1), a pure function of (seed, epoch, sample index).

    NOTE: counter-based (a hash of the coordinates), computed for a whole batch at once: a
    seeded numpy Generator per sample cost ~20 us, a tenth of a JPEG decode.
    """
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.asarray(seed, np.uint64) + _GOLDEN) ^ (np.asarray(epoch, np.uint64) * _GOLDEN))
        base = _mix(key ^ (np.asarray(indices, np.uint64)[:, None] + _GOLDEN) * _M1)
        bits = _mix(base + np.arange(1, draws + 1, dtype=np.uint64) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


ATTEMPTS = 10
CROP_DRAWS = 2 * ATTEMPTS + 3  # (scale, ratio) per attempt, top, left, flip


def random_resized_crop(array: np.ndarray, u, scale: tuple[float, float], out: np.ndarray, *,
                        hflip: bool = True) -> None:
    """torchvision's RandomResizedCrop (ratio 3/4 to 4/3) of `array` into `out`, then a horizontal
    flip with p=0.5 when `hflip`; its random numbers are the first CROP_DRAWS of `u`."""
    u = u.tolist() if isinstance(u, np.ndarray) else list(u)
    height, width = array.shape[:2]
    top, left, h, w = _crop_box(width, height, u, scale)
    resize_into(array[top:top + h, left:left + w], out)
    if hflip and u[2 * ATTEMPTS + 2] < 0.5:
        # NOTE: in place; numpy copies a reversed view element by element, 10x slower than cv2.flip.
        if cv2 is not None:
            cv2.flip(out, 1, dst=out)
        else:
            out[:] = out[:, ::-1].copy()


def _crop_box(width: int, height: int, u: list[float], scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: (top, left, height, width)."""
    area = width * height
    lo_ratio, hi_ratio = math.log(3 / 4), math.log(4 / 3)
    lo_scale, hi_scale = scale
    for k in range(ATTEMPTS):
        target = area * (lo_scale + (hi_scale - lo_scale) * u[2 * k])
        ratio = math.exp(lo_ratio + (hi_ratio - lo_ratio) * u[2 * k + 1])
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2 * ATTEMPTS] * (height - h + 1)), int(u[2 * ATTEMPTS + 1] * (width - w + 1)), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


class ImageTransform:
    """RandomResizedCrop + flip for training, centre crop + resize for evaluation: HxWx3 uint8
    array -> SxSx3 uint8. Training draws its randomness from `draws` uniforms per sample
    (`augment_uniforms`), so the same sample is augmented the same way on any rank or worker."""

    DRAWS = CROP_DRAWS

    def __init__(self, image_size: int, *, train: bool, scale_min: float = 0.9, hflip: bool = True):
        self.image_size = image_size
        self.train = train
        self.scale = (scale_min, 1.0)
        self.hflip = hflip

    def __call__(self, array: np.ndarray, uniforms=None, out: np.ndarray | None = None) -> torch.Tensor | None:
        """Transform `array`; into `out` (SxSx3 uint8) when given, else into a new tensor returned."""
        target = out if out is not None else np.empty((self.image_size, self.image_size, 3), np.uint8)
        if self.train:
            random_resized_crop(array, uniforms, self.scale, target, hflip=self.hflip)
        else:
            height, width = array.shape[:2]
            side = min(width, height)
            top, left = (height - side) // 2, (width - side) // 2
            resize_into(array[top:top + side, left:left + side], target)
        return None if out is not None else torch.from_numpy(target)


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
