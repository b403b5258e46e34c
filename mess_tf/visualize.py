"""Colourised label maps, image/prediction overlays, and PNG writing (atomic, via io_utils)."""
import io

import numpy as np
from PIL import Image

from mess_tf import io_utils

IGNORE_COLOR = (0, 0, 0)


def colorize(label, palette, ignore_label=255):
    """uint8 [H, W, 3] RGB picture of a label map.

    Args:
      label: int [H, W] class indices; ignore_label pixels are drawn black.
      palette: uint8 [C, 3] colour of each class.
    """
    label, palette = np.asarray(label), np.asarray(palette, np.uint8)
    valid = label != ignore_label
    if valid.any() and (label[valid].min() < 0 or label[valid].max() >= len(palette)):
        raise ValueError(f"label values {np.unique(label[valid])[:10].tolist()} outside the palette's "
                         f"{len(palette)} classes")
    out = np.empty(label.shape + (3,), np.uint8)
    out[valid] = palette[label[valid]]
    out[~valid] = IGNORE_COLOR
    return out


def overlay(image, label, palette, alpha=0.5, ignore_label=255):
    """uint8 [H, W, 3]: `image` (RGB 0..255 [H, W, 3]) blended with the colours of `label` [H, W].

    alpha is the weight of the label colours; ignored pixels show the image unchanged.
    """
    image = np.asarray(image, np.float32)
    if image.shape[:2] != np.shape(label):
        raise ValueError(f"image {image.shape[:2]} and label {np.shape(label)} sizes differ")
    colors = colorize(label, palette, ignore_label).astype(np.float32)
    weight = np.where(np.asarray(label) == ignore_label, 0.0, alpha)[..., None]
    return np.clip((1 - weight) * image + weight * colors + 0.5, 0, 255).astype(np.uint8)


def encode_png(array, palette=None, compress_level=6):
    """PNG bytes of uint8 [H, W] (greyscale, or a palette PNG when `palette` [C, 3] is given: the
    pixel values stay class indices and viewers show colours) or uint8 [H, W, 3] (RGB).
    `compress_level` 0-9 trades file size for time (zlib's; the pixels are the same)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {array.dtype} {array.shape}")
    image = Image.fromarray(array)
    if palette is not None:
        if array.ndim != 2:
            raise ValueError("a palette PNG needs a single-channel [H, W] array")
        # putpalette turns the L image into a P image without touching the pixel values. A full
        # 256-entry palette keeps the PNG 8-bit: PIL packs short palettes into fewer bits per
        # pixel, which would corrupt values past the palette (such as 255 = ignore).
        colours = np.zeros((256, 3), np.uint8)
        colours[:len(palette)] = palette
        image.putpalette(colours.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def save_png(path, array, palette=None):
    """Writes `array` as a PNG at `path`, atomically (see encode_png for the layouts)."""
    io_utils.write_bytes(path, encode_png(array, palette))
