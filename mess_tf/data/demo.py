"""The built-in demo dataset: handwritten digits pasted onto real photographs and textures.

Everything comes from files that ship inside registry packages, so it works offline:
  - objects: the 1,797 handwritten digits of scikit-learn (`load_digits`, 8x8 scans of 43 writers),
    upscaled, rotated and filled with a colour and a real texture; class = the digit (10 classes).
    Each class leans to its own colour direction (CLASS_HUES), as real classes do (vegetation is
    green, sky is blue): shape alone took a from-scratch network far longer than `make demo` has;
  - backgrounds: crops of 16 photographs and textures bundled with scikit-image (astronaut, brick,
    coffee, gravel, hubble_deep_field, ...), read from its package folder (never downloaded).
Classes: 0 background, 1..10 digits 0..9. Labels have no ignored pixels.

Difficulty. Each image draws a difficulty d ~ U(0, 1) that drives six factors, so some images are
easy (one large, high-contrast digit on a calm background) and some hard (small, low-contrast,
overlapping digits among clutter and noise), the spread input-adaptive exits exploit:
  - object count: 1 .. 1 + round(3d) digits;
  - object size: digit height ~ U(0.45, 0.75) x (1 - 0.4d) of the image side (~11% of pixels are digits);
  - contrast: RMS distance of the digit colour from the local background mean (fraction of 255),
    aimed at (1 - d) U(0.3, 0.5) + d U(0.1, 0.18); the value reached after clipping is recorded;
  - clutter: Poisson(4d) distractor strokes and rings in digit-like colours, labelled background;
  - occlusion: with probability d digits may overlap and a background patch may cover part of one;
  - noise: Gaussian pixel noise, sigma = U(0, 2) + 14d (0..255 scale).
The hardest settings stay learnable: a from-scratch network must reach a useful mIoU within the
minutes of `make demo` on a CPU (at contrast 0.06 and sigma 20, or with digits on ~4% of the pixels
and no class colours, MobileNetV2 learned background only in 1,350 steps).
Every image's factors are recorded in difficulty.json; `summarize` turns them into the mix report.

Splits train / calibration / val / test use disjoint sets of digit scans (backgrounds are shared).
The dataset is written once, atomically, in the generic folder layout (see folder.py).
"""
import concurrent.futures
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from mess_tf import io_utils, visualize
from mess_tf.data import folder, info as info_lib

VERSION = 3  # bump when the generator's output changes, so cached folders are not mistaken for current ones
STAMP_FILE = "demo.json"
DIFFICULTY_FILE = "difficulty.json"
CLASS_NAMES = ("background",) + tuple(f"digit_{d}" for d in range(10))
INFO = info_lib.DatasetInfo("demo", CLASS_NAMES, info_lib.bitmap_palette(len(CLASS_NAMES)),
                            (("", info_lib.identity_map(len(CLASS_NAMES))),))
BACKGROUNDS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
               "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
               "retina.jpg", "rocket.jpg", "text.png")
TEXTURES = ("brick.png", "grass.png", "gravel.png", "moon.png")
CLASS_HUES = np.random.default_rng(10).normal(size=(10, 3))  # [digit, RGB] colour direction of each class
SPLITS = ("train", "calibration", "val", "test")


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """Image side (pixels, a multiple of 32) and images per split."""

    image_size: int
    train: int
    calibration: int
    val: int
    test: int

    def count(self, split):
        return getattr(self, split)


PRESETS = {
    "tiny": DemoPreset(64, 48, 16, 16, 16),          # tests: a second or two
    "quick": DemoPreset(96, 200, 64, 64, 64),        # a minutes-long end-to-end demo
    "scratch": DemoPreset(128, 1000, 200, 200, 200),  # the from-scratch MobileNetV2 demo
    "default": DemoPreset(384, 1000, 200, 200, 200),  # `make demo`: a deployment-scale input
}


@functools.lru_cache(maxsize=None)
def _photo(filename):
    """A bundled scikit-image picture as float32 [H, W, 3] in 0..255 (greyscale repeated)."""
    import skimage.data  # only its package folder is used: these files ship in the wheel
    path = os.path.join(os.path.dirname(skimage.data.__file__), filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scikit-image no longer ships {path}; update demo.BACKGROUNDS")
    return np.asarray(Image.open(path).convert("RGB"), np.float32)


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _digit_pools(seed):
    """{split: indices into the digits}, disjoint, in proportion to the preset-independent weights."""
    order = np.random.default_rng([seed, 7919]).permutation(len(_digits()[1]))
    bounds = np.cumsum([0.55, 0.15, 0.15]) * len(order)
    return dict(zip(SPLITS, np.split(order, bounds.astype(int))))


def _crop(rng, photo, height, width):
    """A random crop of `photo` resized to [height, width, 3], randomly flipped."""
    ph, pw = photo.shape[:2]
    side = rng.uniform(0.25, 0.9) * min(ph, pw)
    top, left = rng.uniform(0, ph - side), rng.uniform(0, pw - side)
    crop = Image.fromarray(photo[int(top):int(top + side), int(left):int(left + side)].astype(np.uint8))
    out = np.asarray(crop.resize((width, height), Image.BILINEAR), np.float32)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _background(rng, size):
    name = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _crop(rng, _photo(name), size, size)
    tint = rng.uniform(0.6, 1.2, 3).astype(np.float32)  # colour variety, strongest on greyscale sources
    return np.clip(image * tint, 0, 255), name


def _digit_alpha(rng, scan, height):
    """Soft mask float32 [h, w] in 0..1 of one digit scan (8x8, 0..1), scaled to `height` and rotated."""
    width = max(8, int(height * rng.uniform(0.75, 1.2)))
    big = Image.fromarray(scan).resize((width, height), Image.BICUBIC)
    big = big.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, expand=True)
    return np.clip((np.asarray(big) - 0.3) / 0.3, 0, 1)


def _object_colour(rng, local_mean, contrast, hue=None):
    """A colour float [3] about `contrast` (RMS over R, G, B, as a fraction of 255) away from
    `local_mean` float [3], clipped to 0..255, along `hue` float [3] (jittered) or a random direction.
    Returns (colour, the contrast actually reached)."""
    direction = rng.normal(size=3) if hue is None else np.asarray(hue) + rng.normal(scale=0.25, size=3)
    step = direction / (np.sqrt(np.mean(direction ** 2)) + 1e-6) * contrast * 255
    if np.any(np.abs(local_mean + step - 127.5) > 127.5):
        step = -step  # go the way with more room before clipping
    colour = np.clip(local_mean + step, 0, 255)
    return colour, float(np.sqrt(np.mean((colour - local_mean) ** 2)) / 255)


def _render(rng, size, scans, digit_labels):
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
        alpha = _digit_alpha(rng, scans[index], min(height, size - 2))
        h, w = alpha.shape
        h, w = min(h, size), min(w, size)
        alpha = alpha[:h, :w]
        for _ in range(20):  # easy images keep digits apart when they can
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            if allow_overlap or not instances[top:top + h, left:left + w].any():
                break
        region = (slice(top, top + h), slice(left, left + w))
        target = (1 - d) * rng.uniform(0.3, 0.5) + d * rng.uniform(0.1, 0.18)
        colour, contrast = _object_colour(rng, image[region].reshape(-1, 3).mean(0), target, CLASS_HUES[digit_labels[index]])
        texture = _crop(rng, _photo(TEXTURES[rng.integers(len(TEXTURES))]), h, w)
        fill = colour + 0.35 * (texture - texture.mean())
        image[region] = image[region] * (1 - alpha[..., None]) + fill * alpha[..., None]
        mask = alpha >= 0.5
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
              "occluders": occluders, "noise_sigma": round(sigma, 2), "object_list": objects}
    return image, label, record


def _occlude(rng, image, label, size, d):
    """Covers part of the scene with a background-labelled photo patch (probability d). Returns 0 or 1."""
    if rng.uniform() >= d:
        return 0
    h, w = rng.integers(size // 8, size // 3, 2)
    top, left = rng.integers(0, size - h), rng.integers(0, size - w)
    image[top:top + h, left:left + w] = _crop(rng, _photo(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]), h, w)
    label[top:top + h, left:left + w] = 0
    return 1


def _draw_distractors(rng, image, label, size, count):
    """Strokes and rings in digit-like colours, labelled background: clutter that looks like ink."""
    if not count:
        return
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
    mask = np.asarray(mask_image) > 0
    colour, _ = _object_colour(rng, image[mask].mean(0), rng.uniform(0.1, 0.3))
    image[mask] = 0.2 * image[mask] + 0.8 * colour
    label[mask] = 0


def render_sample(split, index, preset="default", seed=0):
    """One demo image, as `generate` writes it: (image uint8 [S, S, 3], label uint8 [S, S], record).

    Each image draws from its own seed (seed, split, index), so it is the same whatever else is
    generated, in whatever order.
    """
    images, labels = _digits()
    pool = _digit_pools(seed)[split]
    rng = np.random.default_rng([seed, int(hashlib.sha1(split.encode()).hexdigest()[:8], 16), index])
    return _render(rng, PRESETS[preset].image_size, images[pool], labels[pool])


def _write_samples(root, split, preset, seed, indices):
    """Renders and writes images `indices` of a split; returns their difficulty records."""
    records = {}
    for i in indices:
        image, label, record = render_sample(split, i, preset, seed)
        name = f"{split}_{i:05d}"
        _write_png(os.path.join(root, "images", split, name + ".png"), image)
        _write_png(os.path.join(root, "labels", split, name + ".png"), label, INFO.palette)
        records[name] = {"split": split, **record}
    return records


def _write_all(root, preset, seed, workers):
    """Every split, rendered by `workers` processes (spawned: they import numpy and PIL only)."""
    jobs = [(split, list(range(start, min(start + 50, PRESETS[preset].count(split)))))
            for split in SPLITS for start in range(0, PRESETS[preset].count(split), 50)]
    if workers <= 1:
        return [_write_samples(root, split, preset, seed, indices) for split, indices in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_write_samples, *zip(*[(root, split, preset, seed, indices) for split, indices in jobs])))


def _write_png(path, array, palette=None):
    # Plain writes: the whole dataset folder is renamed into place at the end, which is what makes it atomic.
    with open(path, "wb") as f:
        f.write(visualize.encode_png(array, palette))


def generate(out_dir, preset="default", seed=0, workers=None):
    """Writes the demo dataset to `out_dir` once (generic folder layout + difficulty.json). Returns out_dir.

    `workers` processes render the images (default: one per CPU core, one per 100 images at most:
    starting a process costs about as much as rendering a hundred small images).

    If `out_dir` already holds the same preset and seed it is left as it is. The data is written to a
    temporary folder beside `out_dir` and renamed into place, so an interrupted run leaves nothing.
    Raises ValueError if `out_dir` holds other data.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; expected one of {', '.join(PRESETS)}")
    stamp = {"preset": preset, "seed": seed, "version": VERSION, **dataclasses.asdict(PRESETS[preset])}
    if _holds(out_dir, stamp):
        return out_dir
    if workers is None:
        total = sum(PRESETS[preset].count(split) for split in SPLITS)
        workers = max(1, min(os.cpu_count() or 1, total // 100))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".tmp-")
    try:
        for kind in ("images", "labels"):
            for split in SPLITS:
                os.makedirs(os.path.join(tmp, kind, split))
        folder.write_classes(os.path.join(tmp, folder.CLASSES_FILE), INFO)
        records = {}
        for part in _write_all(tmp, preset, seed, workers):
            records.update(part)
        io_utils.write_json(os.path.join(tmp, DIFFICULTY_FILE), records)
        io_utils.write_json(os.path.join(tmp, STAMP_FILE), stamp)
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _holds(out_dir, stamp):  # else another process finished the same data first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _holds(out_dir, stamp):
    """True if out_dir holds the demo data of `stamp`; ValueError if it holds anything else."""
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return False
    stamp_path = os.path.join(out_dir, STAMP_FILE)
    if not os.path.isfile(stamp_path):
        raise ValueError(f"{out_dir} exists and is not a demo dataset folder (no {STAMP_FILE}); "
                         f"choose another output folder")
    found = io_utils.read_json(stamp_path, "demo dataset stamp")
    if found != stamp:
        raise ValueError(f"{out_dir} already holds demo data with preset {found.get('preset')!r}, seed "
                         f"{found.get('seed')} (version {found.get('version')}); wanted preset {stamp['preset']!r}, "
                         f"seed {stamp['seed']} (version {stamp['version']}); remove it or choose another folder")
    return True


def load_records(data_dir):
    """The per-image difficulty records of a generated demo folder: {name: record}."""
    return io_utils.read_json(os.path.join(data_dir, DIFFICULTY_FILE), "demo difficulty records")


def summarize(records, split=None):
    """The difficulty mix of `records` (optionally one split).

    Returns a dict: images; objects_per_image, distractors_per_image histograms ({count: images});
    difficulty {easy (d < 1/3), medium, hard (d >= 2/3): images}; quantiles (p10, p50, p90) of digit
    height (pixels), contrast (0..1), noise sigma (0..255) and visible fraction per digit;
    occluded_images (any digit < 90% visible).
    """
    chosen = [r for r in records.values() if split is None or r["split"] == split]
    if not chosen:
        raise ValueError(f"no difficulty records{' for split ' + split if split else ''}")
    objects = [o for r in chosen for o in r["object_list"]]

    def histogram(values):
        keys, counts = np.unique(values, return_counts=True)
        return {int(k): int(c) for k, c in zip(keys, counts)}

    def quantiles(values):
        return dict(zip(("p10", "p50", "p90"), np.round(np.percentile(values, [10, 50, 90]), 3).tolist()))

    d = np.array([r["difficulty"] for r in chosen])
    return {
        "images": len(chosen),
        "objects_per_image": histogram([r["objects"] for r in chosen]),
        "distractors_per_image": histogram([r["distractors"] for r in chosen]),
        "difficulty": {"easy": int((d < 1 / 3).sum()), "medium": int(((d >= 1 / 3) & (d < 2 / 3)).sum()),
                       "hard": int((d >= 2 / 3).sum())},
        "digit_height_px": quantiles([o["height_px"] for o in objects]),
        "contrast": quantiles([o["contrast"] for o in objects]),
        "noise_sigma": quantiles([r["noise_sigma"] for r in chosen]),
        "visible_fraction": quantiles([o["visible_fraction"] for o in objects]),
        "occluded_images": sum(any(o["visible_fraction"] < 0.9 for o in r["object_list"]) for r in chosen),
    }
