"""What both demo datasets are drawn from: pictures and handwritten digits shipped inside pip packages.

Nothing is downloaded: scikit-image and scikit-learn carry these files in their wheels.
  - photographs and textures: scikit-image's `data` folder (brick, grass, gravel, moon, page, text,
    astronaut, rocket, hubble_deep_field, ...) and scikit-learn's two sample photos (china, flower);
  - digits: the 1,797 handwritten digits of scikit-learn (`load_digits`, 8x8 scans of 43 writers),
    split into disjoint pools per split, so no test digit was ever seen in training.
"""
import functools
import os

import numpy as np
from PIL import Image

SPLITS = ("train", "calibration", "val", "test")
DIGIT_TEXTURES = ("brick.png", "grass.png", "gravel.png", "moon.png")  # what fills a digit's strokes
CLASS_HUES = np.random.default_rng(10).normal(size=(10, 3))  # [digit, RGB] colour direction of each digit class


@functools.lru_cache(maxsize=None)
def photo(filename, package="skimage"):
    """A bundled picture as float32 [H, W, 3] in 0..255 (greyscale repeated).

    Args:
      filename: a file of scikit-image's `data` folder, or of scikit-learn's `datasets/images`.
      package: "skimage" or "sklearn".
    """
    if package == "skimage":
        import skimage.data  # only its package folder is used: these files ship in the wheel
        folder = os.path.dirname(skimage.data.__file__)
    else:
        import sklearn.datasets
        folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{package} no longer ships {path}; update mess_tf/data/demo")
    return np.asarray(Image.open(path).convert("RGB"), np.float32)


@functools.lru_cache(maxsize=None)
def digits():
    """(scans float32 [1797, 8, 8] in 0..1, digit int64 [1797])."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def digit_pool(seed, split):
    """(scans [n, 8, 8], digits [n]) of one split: disjoint pools in fixed proportions (55/15/15/15%)."""
    scans, labels = digits()
    order = np.random.default_rng([seed, 7919]).permutation(len(labels))
    bounds = np.cumsum([0.55, 0.15, 0.15]) * len(order)
    pool = dict(zip(SPLITS, np.split(order, bounds.astype(int))))[split]
    return scans[pool], labels[pool]


def crop(rng, picture, height, width, side_range=(0.25, 0.9)):
    """A random square crop of `picture` (side a `side_range` fraction of its shorter side)
    resized to [height, width, 3] float32, randomly flipped left-right."""
    ph, pw = picture.shape[:2]
    side = rng.uniform(*side_range) * min(ph, pw)
    top, left = rng.uniform(0, ph - side), rng.uniform(0, pw - side)
    patch = Image.fromarray(picture[int(top):int(top + side), int(left):int(left + side)].astype(np.uint8))
    out = np.asarray(patch.resize((width, height), Image.BILINEAR), np.float32)
    return out[:, ::-1] if rng.random() < 0.5 else out


def digit_alpha(rng, scan, height, bold=False):
    """Soft mask float32 [h, w] in 0..1 of one digit scan (8x8, 0..1), scaled to `height` and rotated;
    `bold` strokes reach further into the scan's faint edges (solid objects rather than ink)."""
    width = max(8, int(height * rng.uniform(0.75, 1.2)))
    big = Image.fromarray(scan).resize((width, height), Image.BICUBIC)
    big = big.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, expand=True)
    return np.clip((np.asarray(big) - (0.05 if bold else 0.3)) / 0.3, 0, 1)


def object_colour(rng, local_mean, contrast, hue=None):
    """A colour float [3] about `contrast` (RMS over R, G, B, as a fraction of 255) away from
    `local_mean` float [3], clipped to 0..255, along `hue` float [3] (jittered) or a random direction.
    Returns (colour, the contrast actually reached)."""
    direction = rng.normal(size=3) if hue is None else np.asarray(hue) + rng.normal(scale=0.25, size=3)
    step = direction / (np.sqrt(np.mean(direction ** 2)) + 1e-6) * contrast * 255
    if np.any(np.abs(local_mean + step - 127.5) > 127.5):
        step = -step  # go the way with more room before clipping
    colour = np.clip(local_mean + step, 0, 255)
    return colour, float(np.sqrt(np.mean((colour - local_mean) ** 2)) / 255)


def paste_digit(rng, image, region, alpha, digit, contrast):
    """Paints one digit into `image` float32 [S, S, 3] (in place) at `region` (a pair of slices):
    its class colour about `contrast` from the local mean, filled with a real texture.

    Returns:
      (mask bool [h, w]: the digit's labelled pixels, the contrast reached).
    """
    h, w = alpha.shape
    colour, reached = object_colour(rng, image[region].reshape(-1, 3).mean(0), contrast, CLASS_HUES[digit])
    texture = crop(rng, photo(DIGIT_TEXTURES[rng.integers(len(DIGIT_TEXTURES))]), h, w)
    fill = colour + 0.35 * (texture - texture.mean())
    image[region] = image[region] * (1 - alpha[..., None]) + fill * alpha[..., None]
    return alpha >= 0.5, reached
