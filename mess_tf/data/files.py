"""Reading image, label and prediction files in numpy, with errors that name the file and the problem.

No TensorFlow here: the evaluation CLI and the runtime use these without importing it, and the
tf.data pipeline wraps them. Images are uint8 [H, W, 3] RGB; labels and predictions uint8 [H, W]
class indices with 255 = ignore.
"""
import concurrent.futures
import logging
import os

import numpy as np
from PIL import Image

from mess_tf.data import info as info_lib

_LABEL_MODES = ("L", "P")  # single-channel values; a palette PNG's pixels are its palette indices


def _open(path, what):
    """Opens and fully decodes `path` with PIL, so truncation shows up here and not later."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as e:
        raise _too_large(what, path, e) from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable and truncated files
        raise ValueError(f"{what} {path} is corrupt or truncated: {e}") from None
    return image


def _too_large(what, path, error):
    """The ValueError for PIL's guard against images that would exhaust memory when decoded."""
    return ValueError(f"{what} {path} is too large to decode safely ({str(error).split(',')[0]}); shrink it first")


def load_image(path):
    """Reads an RGB image file. Returns uint8 [H, W, 3].

    Greyscale files (a few ship in ADE20K and VOC) are converted to RGB; any other layout (RGBA,
    CMYK, 16-bit) is rejected with a ValueError naming the file.
    """
    image = _open(path, "image")
    if image.mode == "L":
        image = image.convert("RGB")
    if image.mode != "RGB":
        raise ValueError(f"image {path} has mode {image.mode} ({len(image.getbands())} channels); "
                         f"expected an RGB image (3 channels, 8 bits)")
    return np.asarray(image, np.uint8)


def _single_channel(path, what):
    image = _open(path, what)
    if image.mode not in _LABEL_MODES:
        raise ValueError(f"{what} {path} has mode {image.mode} ({len(image.getbands())} channels); expected a "
                         f"single-channel 8-bit PNG of class indices (mode L) or a palette PNG (mode P)")
    return np.asarray(image, np.uint8)


def load_label(path, info):
    """Reads a label file and decodes it with `info`'s lookup. Returns uint8 [H, W] class indices, 255 = ignore.

    Raises ValueError naming the file and the offending values if it holds values outside the class set.
    """
    raw = _single_channel(path, "label")
    lookup = info.label_map(path)
    labels = lookup[raw]
    if (labels == info_lib.INVALID).any():
        bad = np.unique(raw[labels == info_lib.INVALID])
        raise ValueError(f"label {path} has values {bad[:10].tolist()} outside the {info.name} class set "
                         f"(valid raw values: {np.flatnonzero(lookup != info_lib.INVALID).tolist()[:40]})")
    return labels.astype(np.uint8)


def image_size(path):
    """(width, height) in pixels of an image file, from its header (the pixels are not decoded).

    Raises:
      ValueError naming a file that is not a readable image.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as e:
        raise _too_large("image", path, e) from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"image {path} is not a readable image: {e}") from None


def load_prediction(path, num_classes, shape=None):
    """Reads a prediction PNG of class indices. Returns uint8 [H, W].

    Args:
      num_classes: values must lie in 0..num_classes-1.
      shape: (H, W) the prediction must have (its label's), or None.
    """
    pred = _single_channel(path, "prediction")
    if shape is not None and pred.shape != tuple(shape):
        raise ValueError(f"prediction {path} is {pred.shape[0]}x{pred.shape[1]} pixels; its label is "
                         f"{shape[0]}x{shape[1]}")
    if pred.max(initial=0) >= num_classes:
        bad = np.unique(pred[pred >= num_classes])
        raise ValueError(f"prediction {path} has values {bad[:10].tolist()}; expected class indices "
                         f"0..{num_classes - 1}")
    return pred


def load_sample(sample, info, image_size=None):
    """Reads one sample. Returns (image uint8 [H, W, 3], label uint8 [H, W]).

    Raises ValueError if image and label sizes differ, or if the image is not `image_size` (H, W).
    """
    image, label = load_image(sample.image_path), load_label(sample.label_path, info)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {sample.image_path} is {image.shape[0]}x{image.shape[1]} pixels but its label "
                         f"{sample.label_path} is {label.shape[0]}x{label.shape[1]}")
    if image_size is not None and image.shape[:2] != tuple(image_size):
        raise ValueError(f"image {sample.image_path} is {image.shape[0]}x{image.shape[1]} pixels; expected "
                         f"{image_size[0]}x{image_size[1]}")
    return image, label


def check_samples(samples, info, skip_bad=False, image_size=None, workers=4):
    """Reads every sample once, so bad files fail here with a clear message and not inside tf.data.

    Args:
      samples: list of Sample.
      info: DatasetInfo.
      skip_bad: False raises on the first bad sample (in list order); True leaves bad samples out,
        logging one warning each.
      image_size: optional (H, W) every image must have.
      workers: decoding threads (PIL releases the GIL while decoding).

    Returns:
      (good samples in their original order, list of problem messages).
    """
    def problem(sample):
        try:
            load_sample(sample, info, image_size)
        except (ValueError, FileNotFoundError) as e:
            return e
        return None

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        errors = list(pool.map(problem, samples))
    good, problems = [], []
    for sample, error in zip(samples, errors):
        if error is None:
            good.append(sample)
        elif not skip_bad:
            raise error
        else:
            logging.warning("skipping sample %s: %s", sample.name, error)
            problems.append(f"{sample.name}: {error}")
    if problems:
        logging.warning("skipped %d of %d samples as bad", len(problems), len(samples))
    return good, problems
