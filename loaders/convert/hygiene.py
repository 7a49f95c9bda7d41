"""Image hygiene: any image file's bytes -> clean RGB pixels, and for a shard one baseline JPEG.

:func:`prepare_image` runs in the conversion's worker processes. It decides the type by content
(never by extension), refuses decompression bombs before decoding and JPEGs whose data is far
too small for the size they declare, applies the EXIF orientation, turns every colour mode into
RGB (alpha is composited on white, CMYK converted), keeps the first frame of animations, shrinks
with the JPEG decoder's DCT scaling (Pillow's ``draft``) and torch's antialiased bicubic kernel
(:func:`loaders.crops.resize_image`), and re-encodes as JPEG -- unless the input already is a
baseline RGB JPEG that needs no change, whose bytes then pass through without what follows its
end-of-image marker.

:func:`read_image` is the same reading for everything else that opens image files (``preview
--images``, ``embed`` on a folder), and :func:`loaders.convert.inputs.list_image_files` the same
choice of files, so a folder is seen as its shards are.
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

from loaders.convert.jpeg_structure import JpegLayout, JpegStructureError, jpeg_layout, too_little_data

RESIZE_SIDES = ("longer", "shorter")
ORIENTATION_TAG = 0x0112
# Modes whose alpha channel is composited on white rather than dropped.
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold

# image_hook(rgb image) -> (image, metadata to merge into the sample's json, changed?)
ImageHook = Callable[[Image.Image], "tuple[Image.Image, dict[str, Any], bool]"]


@dataclass(frozen=True)
class HygieneOptions:
    """How every image is cleaned; see :func:`loaders.convert.convert_to_shards` for meanings."""

    max_size: int = 384
    resize_side: str = "longer"
    quality: int = 90
    min_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1 (got {self.max_size})")
        if self.resize_side not in RESIZE_SIDES:
            raise ValueError(f"resize_side must be one of {RESIZE_SIDES} (got {self.resize_side!r})")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100 (got {self.quality})")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1 (got {self.min_size})")
        if self.min_size > self.max_size:  # the resize to max_size would leave every image too small
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}: every image "
                             "would be skipped as too small")
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


class UnreadableImage(ValueError):
    """An image file :func:`read_image` cannot read; ``reason`` is the short stable reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _open(data: bytes, max_pixels: int, min_size: int = 1) -> tuple[Image.Image, JpegLayout | None]:
    """Open (header only) and vet an image; its JPEG layout when it is a sound JPEG."""
    if not data:
        raise UnreadableImage("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's global bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise UnreadableImage("too many pixels", str(error).splitlines()[0]) from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image", "content is not a known image format") from None
    except Exception as error:  # a malformed header of a known format
        raise UnreadableImage("corrupt image", _one_line(error)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise UnreadableImage("too many pixels", f"{width}x{height} > {max_pixels} pixels")
    if min(width, height) < min_size:
        raise UnreadableImage("too small", f"{width}x{height}, shorter side < {min_size} px")
    layout = None
    if image.format in ("JPEG", "MPO"):
        try:
            layout = jpeg_layout(data)
        except JpegStructureError:
            pass  # the decoder has the last word; such bytes are never passed through
        if layout is not None:
            # A decoder pads missing data out to a flat grey image without failing.
            shortfall = too_little_data(layout.frame, layout.entropy_bytes)
            if shortfall is not None:
                raise UnreadableImage("corrupt image", shortfall)
    return image, layout


def _decode_rgb(image: Image.Image, draft_size: tuple[int, int] | None, orientation: int) -> Image.Image:
    """Decode (a JPEG with DCT scaling to no less than ``draft_size``, in stored orientation),
    orient, convert to RGB."""
    try:
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding: the largest speed win.
            image.draft(None, draft_size)
        image.load()  # decodes now: truncated or corrupt data raises here
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as error:  # truncated, corrupt, or an unsupported mode
        raise UnreadableImage("corrupt image", _one_line(error)) from None


def read_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Any image file's bytes -> RGB pixels, read exactly as the shard conversion reads them.

    The type is decided by content, the EXIF orientation applied, alpha (RGBA, LA, P with
    transparency) composited on white, CMYK and 16-bit modes converted, an animation's first
    frame kept.

    Args:
        data: the whole file.
        max_pixels: decompression-bomb limit, checked before decoding.
        min_side: optional: the caller needs the shorter side no longer than this, so a JPEG
            may be decoded with DCT scaling (faster) as long as its shorter side stays >= it.

    Returns:
        An RGB Pillow image, upright.

    Raises:
        UnreadableImage: (a ``ValueError``) with ``reason`` ``empty file``, ``not an image``,
            ``corrupt image`` or ``too many pixels``.
    """
    image, _ = _open(data, max_pixels)
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception as error:
        raise UnreadableImage("corrupt image", _one_line(error)) from None
    return _decode_rgb(image, None if min_side is None else (min_side, min_side), orientation)


_ONE_TORCH_THREAD = [False]


def use_one_torch_thread() -> None:
    """Make this process's resizes single-threaded: call in each process of a pool with one
    process per core (set when the first resize imports torch, not before)."""
    _ONE_TORCH_THREAD[0] = True


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    from loaders.crops import resize_image  # imports torch: only when an image needs a resize

    if _ONE_TORCH_THREAD[0]:
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    planes = resize_image(np.asarray(image), *size)
    return Image.merge("RGB", [Image.fromarray(plane, "L") for plane in planes])


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
    try:
        image, layout = _open(data, options.max_pixels, options.min_size)
        stored_size = image.size
        target = output_size(*stored_size, options.max_size, options.resize_side)
        if min(target) < options.min_size:  # a strip (12000 x 40) would be stored as 384 x 1
            raise UnreadableImage("too small", f"{stored_size[0]}x{stored_size[1]} would be {target[0]}x{target[1]} "
                                               f"after the resize to {options.max_size}, shorter side < "
                                               f"{options.min_size} px")
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
        # Animations are decoded as their first frame (Pillow opens frame 0); MPO is not "JPEG".
        untouched_jpeg = (image.format == "JPEG" and image.mode == "RGB" and target == stored_size
                          and orientation == 1 and layout is not None
                          and not image.info.get("progressive") and not image.info.get("progression"))
        image = _decode_rgb(image, target if target != stored_size else None, orientation)
        final_size = output_size(*image.size, options.max_size, options.resize_side)
        if final_size != image.size:
            image = _resize(image, final_size)
    except UnreadableImage as error:
        return Rejected(error.reason, error.detail)
    except Exception as error:  # an unsupported mode, a failing resize
        return Rejected("corrupt image", _one_line(error))

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
        # a trailer after the EOI (a motion photo's video, a camera's maker data) is no image
        jpeg = data[:layout.end] if layout.end < len(data) else data
    else:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=options.quality, optimize=False, progressive=False)
        jpeg = buffer.getvalue()
    return Prepared(jpeg=jpeg, width=image.width, height=image.height,
                    bytes_digest=_digest(data), pixel_digest=pixel_digest,
                    passed_through=untouched_jpeg and not changed, changed=bool(changed), meta=meta)
