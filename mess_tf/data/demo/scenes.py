"""The `scenes` demo data: stuff regions of real textures and photographs, with digits as the things.

Real segmentation data is dominated by "stuff", classes recognisable from local texture and colour,
which shallow features see: Cityscapes (11 of 19 classes, about 90% of the evaluated pixels), ADE20K
(35 stuff classes on 61% of the pixels), COCO-Stuff (about 66%). These scenes imitate that
structure, synthetically:
  - 7 stuff classes, each drawn from real pictures shipped in pip packages (STUFF: sky from three
    photographs, vegetation from a grass texture and two photographs' leaves, brick wall, gravel
    road, lunar terrain, printed signage, stained-tissue carpet), laid out as 2-5 bands with wavy
    boundaries (sky on top, ground at the bottom, as in street and landscape scenes) and sometimes a
    polygon (a sign, a patch of wall), each texture at a random scale and tint;
  - 10 thing classes, the handwritten digits of the `things` scenes (sources.paste_digit), with a
    long-tailed size distribution (log-uniform height: many small, few large), 0 to several per
    image, and some images with none.
Classes: 0..6 stuff, 7..16 digits 0..9. Labels have no ignored pixels.

Difficulty. Each image draws d ~ U(0, 1), which drives:
  - regions: 2 + Binomial(3, 0.2 + 0.6d) bands, boundary waviness up to (0.03 + 0.09d) of the side;
  - things: Poisson(0.4 + 3.6d) digits (at most 8), heights log-uniform in [0.07, 0.6] x (1 - 0.3d)
    of the side, contrast (1 - d) U(0.3, 0.5) + d U(0.12, 0.2) against the local mean;
  - clutter: Poisson(3d) painted strokes (labelled as the stuff they are painted on);
  - lighting: a linear brightness gradient of strength up to 0.1 + 0.3d;
  - noise: Gaussian, sigma = U(0, 2) + 12d (0..255 scale).
Every image's factors and class pixel counts are recorded (difficulty.json).
"""
import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from mess_tf.data import info as info_lib
from mess_tf.data.demo import sources, things

VERSION = 1  # bump when the output changes, so generated folders are not mistaken for current ones


@dataclasses.dataclass(frozen=True)
class Source:
    """A picture region a stuff class is drawn from.

    Attributes:
      filename, package: as sources.photo takes them.
      box: (left, top, right, bottom) fractions of the picture holding only this class; None = all.
      colour: RGB (0..255) a greyscale texture is coloured with (jittered per region); None = its own.
    """

    filename: str
    package: str = "skimage"
    box: tuple = None
    colour: tuple = None


@dataclasses.dataclass(frozen=True)
class StuffClass:
    """A stuff class: its name, where in a scene it goes, and its pictures."""

    name: str
    places: tuple  # of "top", "middle", "bottom", "insert": the bands and polygons it may fill
    sources: tuple


STUFF = (
    StuffClass("sky", ("top",), (Source("china.jpg", "sklearn", (0.55, 0.0, 1.0, 0.22)),
                                 Source("rocket.jpg", box=(0.66, 0.02, 0.92, 0.45)),
                                 Source("hubble_deep_field.jpg"))),
    StuffClass("vegetation", ("middle", "bottom"), (Source("grass.png", colour=(80, 130, 55)),
                                                   Source("flower.jpg", "sklearn", (0.0, 0.0, 0.2, 0.9)),
                                                   Source("china.jpg", "sklearn", (0.86, 0.3, 1.0, 0.8)))),
    StuffClass("wall", ("middle", "insert"), (Source("brick.png", colour=(165, 90, 70)),)),
    StuffClass("road", ("bottom",), (Source("gravel.png", colour=(120, 118, 112)),)),
    StuffClass("terrain", ("middle", "bottom"), (Source("moon.png", colour=(165, 150, 120)),)),
    StuffClass("signage", ("middle", "insert"), (Source("page.png", colour=(225, 225, 215)),
                                                 Source("text.png", colour=(215, 220, 230)))),
    StuffClass("carpet", ("bottom", "insert"), (Source("ihc.png"),)),
)
CLASS_NAMES = tuple(s.name for s in STUFF) + tuple(f"digit_{d}" for d in range(10))
STUFF_CLASSES = tuple(range(len(STUFF)))
THING_CLASSES = tuple(range(len(STUFF), len(CLASS_NAMES)))
INFO = info_lib.DatasetInfo("demo", CLASS_NAMES, info_lib.bitmap_palette(len(CLASS_NAMES)),
                            (("", info_lib.identity_map(len(CLASS_NAMES))),))
MAX_THINGS = 10


def render(rng, size, scans, digit_labels):
    """One scene. Returns (image uint8 [S, S, 3], label uint8 [S, S], difficulty record dict)."""
    d = float(rng.uniform())
    layout, band_classes = _bands(rng, size, d)
    image, label = np.zeros((size, size, 3), np.float32), np.zeros((size, size), np.uint8)
    for band, cls in enumerate(band_classes):
        _fill(rng, image, label, layout == band, cls)
    insert = None
    if rng.uniform() < 0.5:
        insert = int(rng.choice(_classes_for("insert")))
        _fill(rng, image, label, _polygon(rng, size), insert)
    distractors = int(rng.poisson(3 * d))
    if distractors:  # painted strokes: colour on the stuff, which keeps its class
        mask = things.stroke_mask(rng, size, distractors)
        colour, _ = sources.object_colour(rng, image[mask].mean(0), rng.uniform(0.1, 0.3))
        image[mask] = 0.3 * image[mask] + 0.7 * colour
    objects = _paste_digits(rng, image, label, size, d, scans, digit_labels)
    lighting = float(rng.uniform(0, 0.1 + 0.3 * d))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.arange(size, dtype=np.float32) / size - 0.5
    image *= (1 + lighting * (ramp[None, :] * np.cos(angle) + ramp[:, None] * np.sin(angle)))[..., None]
    sigma = float(rng.uniform(0, 2) + 12 * d)
    image += rng.standard_normal(image.shape, np.float32) * np.float32(sigma)
    image = np.clip(image, 0, 255).round().astype(np.uint8)
    record = {"difficulty": round(d, 3), "regions": len(band_classes),
              "stuff": [CLASS_NAMES[c] for c in band_classes] + ([CLASS_NAMES[insert]] if insert is not None else []),
              "objects": len(objects), "distractors": distractors, "lighting": round(lighting, 3),
              "noise_sigma": round(sigma, 2), "object_list": objects, "class_pixels": things.class_pixels(label)}
    return image, label, record


def _classes_for(place):
    return [i for i, s in enumerate(STUFF) if place in s.places]


def _bands(rng, size, d):
    """(band index int [S, S] from the top, the stuff class of each band): 2-5 bands whose
    boundaries are tilted, wavy curves; neighbouring bands never share a class."""
    count = 2 + int(rng.binomial(3, 0.2 + 0.6 * d))
    bases = np.sort(rng.uniform(0.15, 0.9, count - 1)) * size
    x = np.arange(size) / size
    curves = []
    for base in bases:
        wave = sum(rng.uniform(0.3, 1) * np.sin(2 * np.pi * (f * x + rng.uniform())) for f in rng.uniform(0.5, 4, 3))
        amplitude = rng.uniform(0.01, 0.03 + 0.09 * d) * size
        curves.append(base + rng.uniform(-0.25, 0.25) * size * (x - 0.5) + amplitude * wave / 2)
    rows = np.arange(size)[:, None]
    layout = sum((rows >= curve[None, :]).astype(np.int32) for curve in curves)
    classes = []
    for band in range(count):
        place = "top" if band == 0 and rng.uniform() < 0.75 else "bottom" if band == count - 1 else "middle"
        choices = [c for c in _classes_for(place) if not classes or c != classes[-1]]
        classes.append(int(rng.choice(choices)))
    return layout, classes


def _polygon(rng, size):
    """bool [S, S]: a random polygon of 4-7 vertices around a point, 15-45% of the side across."""
    centre = rng.uniform(0.2, 0.8, 2) * size
    radius = rng.uniform(0.075, 0.225) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(4, 8))))
    radii = radius * rng.uniform(0.6, 1.0, len(angles))
    points = [(float(centre[0] + r * np.cos(a)), float(centre[1] + r * np.sin(a))) for a, r in zip(angles, radii)]
    canvas = Image.new("L", (size, size))
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


def _fill(rng, image, label, mask, cls):
    """Paints `mask` of `image` (in place) with a texture of stuff class `cls`, labelled `cls`."""
    stuff = STUFF[cls]
    source = stuff.sources[rng.integers(len(stuff.sources))]
    picture = sources.photo(source.filename, source.package)
    if source.box is not None:
        h, w = picture.shape[:2]
        left, top, right, bottom = source.box
        picture = picture[int(top * h):int(bottom * h), int(left * w):int(right * w)]
    rows = np.flatnonzero(mask.any(1))
    top, bottom = rows[0], rows[-1] + 1  # bands span the width: paint their rows only
    texture = sources.crop(rng, picture, bottom - top, image.shape[1], side_range=(0.3, 1.0))
    if source.colour is not None:  # greyscale: the class colour, jittered, modulated by the texture
        colour = np.asarray(source.colour, np.float32) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
        texture = colour * texture / max(float(texture.mean()), 1.0)
    else:
        texture = texture * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    texture *= np.float32(rng.uniform(0.75, 1.2))
    inside = mask[top:bottom]
    image[top:bottom][inside] = np.minimum(texture[inside], 255)
    label[mask] = cls


def _paste_digits(rng, image, label, size, d, scans, digit_labels):
    """Pastes Poisson(0.4 + 3.6d) digits of long-tailed sizes; returns their records."""
    count = min(MAX_THINGS, int(rng.poisson(0.6 + 5.4 * d)))
    allow_overlap = rng.uniform() < d
    instances, objects = np.zeros((size, size), np.int32), []
    for _ in range(count):
        index = rng.integers(len(scans))
        height = max(10, int(size * np.exp(rng.uniform(np.log(0.09), np.log(0.9))) * (1 - 0.3 * d)))
        alpha = sources.digit_alpha(rng, scans[index], min(height, size - 2), bold=True)
        h, w = min(alpha.shape[0], size), min(alpha.shape[1], size)
        alpha = alpha[:h, :w]
        for _ in range(20):  # easy images keep digits apart when they can
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            if allow_overlap or not instances[top:top + h, left:left + w].any():
                break
        region = (slice(top, top + h), slice(left, left + w))
        target = (1 - d) * rng.uniform(0.3, 0.5) + d * rng.uniform(0.12, 0.2)
        mask, contrast = sources.paste_digit(rng, image, region, alpha, digit_labels[index], target)
        label[region][mask] = THING_CLASSES[digit_labels[index]]
        instances[region][mask] = len(objects) + 1
        objects.append({"digit": int(digit_labels[index]), "height_px": int(h), "contrast": round(contrast, 3),
                        "pixels": int(mask.sum())})
    for number, obj in enumerate(objects, 1):
        obj["visible_fraction"] = round(float((instances == number).sum()) / max(obj["pixels"], 1), 3)
    return objects
