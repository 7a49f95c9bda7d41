"""Image hygiene for shard conversion: any image file's bytes -> one clean RGB baseline JPEG.

One function, :func:`prepare_image`, runs in the conversion's worker processes. It decides the
type by content (never by extension), refuses decompression bombs before decoding, applies the
EXIF orientation, turns every colour mode into RGB (alpha is composited on white), keeps the
first frame of animations, shrinks with the JPEG decoder's DCT scaling (Pillow's ``draft``) and
a resampling filter, and re-encodes as JPEG -- unless the input already is a baseline RGB JPEG
that needs no change, whose bytes then pass through untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_SIDES = ("longer", "shorter")
ORIENTATION_TAG = 0x0112
# Modes whose alpha channel is composited on white rather than dropped.
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")

# image_hook(rgb image) -> (image, metadata to merge into the sample's json, changed?)
ImageHook = Callable[[Image.Image], "tuple[Image.Image, dict[str, Any], bool]"]


@dataclass(frozen=True)
class HygieneOptions:
    """How every image is cleaned; see :func:`loaders.convert.convert_to_shards` for meanings."""

    max_size: int = 384
    resize_side: str = "longer"
    quality: int = 90
    min_size: int = 32
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1 (got {self.max_size})")
        if self.resize_side not in RESIZE_SIDES:
            raise ValueError(f"resize_side must be one of {RESIZE_SIDES} (got {self.resize_side!r})")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100 (got {self.quality})")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1 (got {self.min_size})")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 (got {self.max_pixels})")


@dataclass
class Prepared:
    """A cleaned image ready for a shard."""

    jpeg: bytes
    width: int
    height: int
    bytes_digest: str  # of the input file, for same-bytes duplicates
    pixel_digest: str  # of the cleaned pixels before the hook, for same-pixels duplicates
    passed_through: bool
    changed: bool = False  # the image_hook changed the pixels
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rejected:
    """An input that is not written: a short stable ``reason`` and a human ``detail``."""

    reason: str
    detail: str = ""


def output_size(width: int, height: int, max_size: int, resize_side: str) -> tuple[int, int]:
    """The size after capping the longer (or shorter) side at ``max_size``; never enlarges."""
    side = max(width, height) if resize_side == "longer" else min(width, height)
    if side <= max_size:
        return width, height
    scale = max_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _digest(data: bytes | memoryview) -> str:
    # 96 bits: collisions stay out of reach for billions of images, the journal stays small.
    return hashlib.sha1(data).hexdigest()[:24]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: scale 0..65535 to 0..255 (Pillow's convert would clip at 255).
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def _open(data: bytes, options: HygieneOptions) -> Image.Image | Rejected:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's global bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        return Rejected("too many pixels", str(error).splitlines()[0])
    except UnidentifiedImageError:
        return Rejected("not an image", "content is not a known image format")
    except Exception as error:  # a malformed header of a known format
        return Rejected("corrupt image", f"{type(error).__name__}: {error}".splitlines()[0])
    width, height = image.size
    if width * height > options.max_pixels:
        return Rejected("too many pixels", f"{width}x{height} > {options.max_pixels} pixels")
    if min(width, height) < options.min_size:
        return Rejected("too small", f"{width}x{height}, shorter side < {options.min_size} px")
    return image


def prepare_image(data: bytes, options: HygieneOptions,
                  image_hook: ImageHook | None = None) -> Prepared | Rejected:
    """Clean one image file's bytes for a shard.

    Args:
        data: the whole input file.
        options: the hygiene options.
        image_hook: optional ``hook(rgb) -> (image, meta_update, changed)`` applied to the
            cleaned image at its output size; a changed image is always re-encoded.

    Returns:
        :class:`Prepared` with the JPEG bytes and digests, or :class:`Rejected` with the reason
        (``empty file``, ``not an image``, ``corrupt image``, ``too many pixels``, ``too small``,
        ``image_hook failed``).
    """
    if not data:
        return Rejected("empty file", "0 bytes")
    opened = _open(data, options)
    if isinstance(opened, Rejected):
        return opened
    image = opened
    try:
        stored_size = image.size
        target = output_size(*stored_size, options.max_size, options.resize_side)
        needs_resize = target != stored_size
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
        # Animations are decoded as their first frame (Pillow opens frame 0); MPO is not "JPEG".
        untouched_jpeg = (image.format == "JPEG" and image.mode == "RGB" and not needs_resize
                          and orientation == 1
                          and not image.info.get("progressive") and not image.info.get("progression"))
        if needs_resize and image.format in ("JPEG", "MPO"):
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding: the largest speed win.
            image.draft(None, target)
        image.load()  # decodes now: truncated or corrupt data raises here
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        final_size = output_size(*image.size, options.max_size, options.resize_side)
        if final_size != image.size:
            image = image.resize(final_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except Exception as error:  # truncated, corrupt, or an unsupported mode
        return Rejected("corrupt image", f"{type(error).__name__}: {error}".splitlines()[0])

    pixel_digest = _digest(f"{image.size}".encode() + image.tobytes())
    meta: dict[str, Any] = {}
    changed = False
    if image_hook is not None:
        try:
            hooked, meta, changed = image_hook(image)
            meta = dict(meta or {})
            json.dumps(meta)  # fail here, per image, rather than in the shard writer
            if changed:
                image = _to_rgb(hooked)
        except Exception as error:
            return Rejected("image_hook failed", f"{type(error).__name__}: {error}".splitlines()[0])

    if untouched_jpeg and not changed:
        jpeg = data
    else:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=options.quality, optimize=False, progressive=False)
        jpeg = buffer.getvalue()
    return Prepared(jpeg=jpeg, width=image.width, height=image.height,
                    bytes_digest=_digest(data), pixel_digest=pixel_digest,
                    passed_through=untouched_jpeg and not changed, changed=bool(changed), meta=meta)
