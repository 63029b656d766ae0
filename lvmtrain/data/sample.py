"""Whether a sample can be used: the one decision the loader and `lvmtrain data check` share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lvmtrain.data.remote import RemoteReadError
from lvmtrain.data.tarindex import Sample


@dataclass
class Fields:
    """Which extensions of a sample hold the image, caption and label. Without `optional` (training)
    a named caption or label must be there; with it (`data check`) only one that is there must
    be valid."""

    image: list[str]
    caption: str | None
    label: str | None
    optional: bool = False


class BadSample(Exception):
    """A sample that cannot be trained on; `kind` is the counter it is reported under (BAD_KINDS)."""

    def __init__(self, kind: str, shard: str, key: str, reason: str):
        super().__init__(f"shard {shard}, sample '{key}': {reason}")
        self.kind, self.shard, self.key, self.reason = kind, shard, key, reason


def read_sample(sample: Sample, url: str, read: Callable[[int, int], bytes], fields: Fields,
                image: Callable[[bytes], Any]) -> dict:
    """{"image": image(bytes), "text", "label", "key"} of a sample, or BadSample naming what is wrong.

    `read(offset, size)` gives bytes of the shard at `url`; `image` decodes (and for training
    transforms) the image bytes. A failed read of a remote shard (RemoteReadError) propagates: the
    caller decides whether the server or the sample is at fault.
    """
    ext = next((e for e in fields.image if e in sample.files), None)
    if ext is None:
        raise BadSample("missing_image", url, sample.key, f"no image (.{' .'.join(fields.image)}) among "
                                                           f".{' .'.join(sorted(sample.files)) or 'nothing'}")
    data = read(*sample.files[ext])
    try:
        out = {"image": image(data)}
    except RemoteReadError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, EOFError, ...
        raise BadSample("bad_image", url, sample.key, f".{ext} does not decode ({type(e).__name__}: {e})") from None
    if fields.caption:
        if fields.caption in sample.files:
            try:
                out["text"] = read(*sample.files[fields.caption]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadSample("bad_caption", url, sample.key, f".{fields.caption} is not UTF-8 ({e})") from None
        elif not fields.optional:
            raise BadSample("missing_caption", url, sample.key, f"no .{fields.caption} file")
    if fields.label:
        if fields.label in sample.files:
            try:
                out["label"] = int(read(*sample.files[fields.label]).decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                raise BadSample("bad_label", url, sample.key, f".{fields.label} is not an integer") from None
        elif not fields.optional:
            raise BadSample("missing_label", url, sample.key, f"no .{fields.label} file")
    out["key"] = sample.key
    return out
