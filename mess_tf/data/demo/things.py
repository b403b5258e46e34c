"""The `things` demo scenes: handwritten digits on photographs, MESS's hard case.

Classes: 0 background, 1..10 digits 0..9. Labels have no ignored pixels. Every class but the
background is a whole shape that only deep features see, so shallow exits cannot tell the
classes apart (see the README's results): kept as the preset `things` to show when MESS does not pay.

  - objects: scikit-learn's handwritten digits, upscaled, rotated and filled with a colour and a
    real texture; each class leans to its own colour direction (sources.CLASS_HUES);
  - backgrounds: crops of 16 photographs and textures bundled with scikit-image.

Difficulty. Each image draws a difficulty d ~ U(0, 1) that drives six factors, so some images are
easy (one large, high-contrast digit on a calm background) and some hard (small, low-contrast,
overlapping digits among clutter and noise):
  - object count: 1 .. 1 + round(3d) digits;
  - object size: digit height ~ U(0.45, 0.75) x (1 - 0.4d) of the image side (~11% of pixels are digits);
  - contrast: RMS distance of the digit colour from the local background mean (fraction of 255),
    aimed at (1 - d) U(0.3, 0.5) + d U(0.1, 0.18); the value reached after clipping is recorded;
  - clutter: Poisson(4d) distractor strokes and rings in digit-like colours, labelled background;
  - occlusion: with probability d digits may overlap and a background patch may cover part of one;
  - noise: Gaussian pixel noise, sigma = U(0, 2) + 14d (0..255 scale).
"""
import numpy as np
from PIL import Image, ImageDraw

from mess_tf.data import info as info_lib
from mess_tf.data.demo import sources

VERSION = 3  # bump when the output changes, so generated folders are not mistaken for current ones
CLASS_NAMES = ("background",) + tuple(f"digit_{d}" for d in range(10))
INFO = info_lib.DatasetInfo("demo", CLASS_NAMES, info_lib.bitmap_palette(len(CLASS_NAMES)),
                            (("", info_lib.identity_map(len(CLASS_NAMES))),))
THING_CLASSES = tuple(range(1, 11))
BACKGROUNDS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
               "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
               "retina.jpg", "rocket.jpg", "text.png")


def render(rng, size, scans, digit_labels):
    """One image. Returns (image uint8 [S, S, 3], label uint8 [S, S], difficulty record dict)."""
    d = float(rng.uniform())
    image, background = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    count = int(rng.integers(1, 2 + round(3 * d)))
    allow_overlap = rng.uniform() < d
    instances, objects = np.zeros((size, size), np.int32), []  # which digit (1-based) owns each pixel
    for _ in range(count):
        index = rng.integers(len(scans))
        height = max(10, int(size * rng.uniform(0.45, 0.75) * (1 - 0.4 * d)))
        alpha = sources.digit_alpha(rng, scans[index], min(height, size - 2))
        h, w = alpha.shape
        h, w = min(h, size), min(w, size)
        alpha = alpha[:h, :w]
        for _ in range(20):  # easy images keep digits apart when they can
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            if allow_overlap or not instances[top:top + h, left:left + w].any():
                break
        region = (slice(top, top + h), slice(left, left + w))
        target = (1 - d) * rng.uniform(0.3, 0.5) + d * rng.uniform(0.1, 0.18)
        mask, contrast = sources.paste_digit(rng, image, region, alpha, digit_labels[index], target)
        label[region][mask] = digit_labels[index] + 1
        instances[region][mask] = len(objects) + 1
        objects.append({"digit": int(digit_labels[index]), "height_px": int(h), "contrast": round(contrast, 3),
                        "pixels": int(mask.sum())})
    occluders = _occlude(rng, image, label, size, d) if allow_overlap else 0
    distractors = int(rng.poisson(4 * d))
    _draw_distractors(rng, image, label, size, distractors)
    instances[label == 0] = 0  # occluders and strokes hide what they cover
    for number, obj in enumerate(objects, 1):
        obj["visible_fraction"] = round(float((instances == number).sum()) / max(obj["pixels"], 1), 3)
    sigma = float(rng.uniform(0, 2) + 14 * d)
    image = np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).round().astype(np.uint8)
    record = {"difficulty": round(d, 3), "objects": count, "background": background, "distractors": distractors,
              "occluders": occluders, "noise_sigma": round(sigma, 2), "object_list": objects,
              "class_pixels": class_pixels(label)}
    return image, label, record


def class_pixels(label):
    """{class index: pixels} of the classes present in `label` (JSON keys are strings)."""
    values, counts = np.unique(label, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def _background(rng, size):
    name = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = sources.crop(rng, sources.photo(name), size, size)
    tint = rng.uniform(0.6, 1.2, 3).astype(np.float32)  # colour variety, strongest on greyscale sources
    return np.clip(image * tint, 0, 255), name


def _occlude(rng, image, label, size, d):
    """Covers part of the scene with a background-labelled photo patch (probability d). Returns 0 or 1."""
    if rng.uniform() >= d:
        return 0
    h, w = rng.integers(size // 8, size // 3, 2)
    top, left = rng.integers(0, size - h), rng.integers(0, size - w)
    image[top:top + h, left:left + w] = sources.crop(rng, sources.photo(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]),
                                                     h, w)
    label[top:top + h, left:left + w] = 0
    return 1


def _draw_distractors(rng, image, label, size, count):
    """Strokes and rings in digit-like colours, labelled background: clutter that looks like ink."""
    if not count:
        return
    mask = stroke_mask(rng, size, count)
    colour, _ = sources.object_colour(rng, image[mask].mean(0), rng.uniform(0.1, 0.3))
    image[mask] = 0.2 * image[mask] + 0.8 * colour
    label[mask] = 0


def stroke_mask(rng, size, count):
    """bool [S, S]: `count` random lines and rings (pen widths up to size / 24)."""
    mask_image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(mask_image)
    for _ in range(count):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = np.clip([x0, y0] + rng.integers(-size // 4, size // 4, 2), 0, size - 1)
        width = int(rng.integers(1, max(2, size // 24)))
        if rng.uniform() < 0.5:
            draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=255, width=width)
        else:
            draw.ellipse([(int(min(x0, x1)), int(min(y0, y1))), (int(max(x0, x1)) + 2, int(max(y0, y1)) + 2)],
                         outline=255, width=width)
    return np.asarray(mask_image) > 0
