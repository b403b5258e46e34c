"""tf.data input pipelines: augmented, endless training batches and deterministic evaluation batches.

Images come out float32 RGB in 0..255 (the network normalises them itself); labels uint8 class
indices with 255 = ignore. Files are decoded in numpy (files.py: PIL decodes VOC palette PNGs to
their indices, and bad files raise errors that name them) inside parallel tf.data maps. By default
every sample is read once before the pipeline is built (`check=True`), so a corrupt file, a label
outside the class set or a size mismatch stops the run with a clear message up front instead of
deep inside tf.data, or, with skip_bad=True, is left out with a counted warning.
"""
import numpy as np
import tensorflow as tf
from PIL import Image

from mess_tf.data.files import check_samples, load_image, load_label, load_sample  # noqa: F401 (re-exported)

IMAGE_PAD_VALUE = 127.5  # mid-grey: padded pixels carry the ignore label, and grey keeps the statistics calm
EVAL_MODES = ("resize", "pad")


def check_size(size, multiple_of, what="size"):
    """Returns (H, W) ints; raises ValueError unless both are positive multiples of `multiple_of`
    (the network's output stride, so every feature map tiles the input exactly)."""
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0 or h % multiple_of or w % multiple_of:
        raise ValueError(f"{what} {h}x{w} must be positive multiples of {multiple_of} (the network's output stride)")
    return h, w


def _checked(samples, info, check, skip_bad):
    if check:
        samples, _ = check_samples(samples, info, skip_bad=skip_bad)
    if not samples:
        raise ValueError("no samples to read (the split is empty, or every sample was skipped as bad)")
    return list(samples)


def _loader(samples, info, fit=None):
    """index tensor -> (image uint8 [H, W, 3], label uint8 [H, W]) via numpy, optionally fitted to a size."""
    def load(index):
        image, label = load_sample(samples[int(index)], info)
        return fit(image, label) if fit else (image, label)

    def load_tensor(index):
        image, label = tf.numpy_function(load, [index], [tf.uint8, tf.uint8], stateful=False)
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        return image, label
    return load_tensor


def train_dataset(samples, info, crop_size, batch_size, seed=0, scale_range=(0.5, 2.0), flip=True, jitter=True,
                  multiple_of=1, check=True, skip_bad=False, first_batch=0):
    """Endless, augmented training batches.

    Each element i of the stream is sample order_e[i mod n] of epoch e = i // n, where order_e is a
    permutation drawn from (seed, e); its augmentation draws from (seed, i). So the stream is the
    same under the same seed whatever the parallelism, and `first_batch=k` starts it exactly where
    `.skip(k)` would, without reading the k * batch_size images before (minutes, late in a run).

    Args:
      samples: list of Sample; info: DatasetInfo.
      crop_size: (H, W) of the output crops, multiples of `multiple_of`.
      batch_size: images per batch (incomplete batches never happen: the stream is endless).
      seed: int.
      scale_range: (min, max) random rescale factor applied before cropping.
      flip: random left-right flips. jitter: random brightness, contrast, saturation and hue.
      multiple_of: the network's output stride.
      check, skip_bad: read every sample first (see module doc).
      first_batch: index of the first batch in the stream (a resumed run's step).

    Returns:
      tf.data.Dataset of (images float32 [B, H, W, 3] RGB 0..255, labels uint8 [B, H, W]).
    """
    crop = check_size(crop_size, multiple_of, "crop_size")
    samples = _checked(samples, info, check, skip_bad)
    load, n = _loader(samples, info), len(samples)

    def element(i):
        order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), i // n])))
        image, label = load(order[i % n])
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(seed, tf.int64), i]), num=5)
        return _augment(image, label, seeds, crop, scale_range, flip, jitter)

    return _parallel_batches(tf.data.Dataset.counter(start=first_batch * batch_size), element, batch_size,
                             drop_remainder=True)


def _parallel_batches(indices, element, batch_size, drop_remainder=False):
    """indices.map(element) on parallel threads, in order, batched and prefetched.

    tf.data's autotuning is off: its model thread re-optimises the pipeline at growing intervals,
    and an iterator deleted while it runs blocked for up to 17 s (measured after the demo's stage 1,
    in about half the runs: `del` of the training iterator waited in ~RootDataset::Iterator for that
    thread). Without it, AUTOTUNE stays at tf.data's starting value, min(16, CPU cores) calls at
    once: on this 2-core host as many as with autotuning (measured).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return (indices.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=drop_remainder)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))


def _augment(image, label, seeds, crop, scale_range, flip, jitter):
    """Random scale, pad (label 255) to at least `crop`, random crop, flip, photometric jitter."""
    image = tf.cast(image, tf.float32)
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1])
    scaled = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    image = tf.image.resize(image, scaled, method="bilinear")
    label = tf.image.resize(label[..., None], scaled, method="nearest")[..., 0]
    padded = tf.maximum(scaled, crop)
    pads = [[0, padded[0] - scaled[0]], [0, padded[1] - scaled[1]]]
    image = tf.pad(image, pads + [[0, 0]], constant_values=IMAGE_PAD_VALUE)
    label = tf.pad(label, pads, constant_values=255)
    top = tf.random.stateless_uniform([], seeds[1], 0, padded[0] - crop[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, padded[1] - crop[1] + 1, dtype=tf.int32)
    image = image[top:top + crop[0], left:left + crop[1]]
    label = label[top:top + crop[0], left:left + crop[1]]
    if flip:
        mirrored = tf.random.stateless_uniform([], seeds[3]) < 0.5
        image = tf.cond(mirrored, lambda: image[:, ::-1], lambda: image)
        label = tf.cond(mirrored, lambda: label[:, ::-1], lambda: label)
    if jitter:
        image = _photometric_jitter(image, seeds[4])
    image.set_shape(crop + (3,))
    label.set_shape(crop)
    return image, label


def _photometric_jitter(image, seed):
    """Brightness +-0.1, contrast and saturation x0.8..1.2, hue +-0.03, on 0..255 float RGB."""
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    x = image / 255.0
    x = tf.image.stateless_random_brightness(x, 0.1, seeds[0])
    x = tf.image.stateless_random_contrast(x, 0.8, 1.2, seeds[1])
    x = tf.image.stateless_random_saturation(tf.clip_by_value(x, 0.0, 1.0), 0.8, 1.2, seeds[2])
    x = tf.image.stateless_random_hue(x, 0.03, seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def fit_to_size(image, label, size, mode="resize"):
    """Deterministically fits one sample to `size` (H, W), in numpy.

    mode "resize": bilinear image, nearest-neighbour label. mode "pad": pad bottom/right (image
    IMAGE_PAD_VALUE rounded, label 255); an image larger than `size` is an error.
    Returns (image uint8 [H, W, 3], label uint8 [H, W]).
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    if mode == "resize":
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        return image, np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    if image.shape[0] > h or image.shape[1] > w:
        raise ValueError(f"an image of {image.shape[0]}x{image.shape[1]} pixels does not fit the evaluation size "
                         f"{h}x{w} with mode='pad'; use mode='resize' or a larger size")
    pads = ((0, h - image.shape[0]), (0, w - image.shape[1]))
    return (np.pad(image, pads + ((0, 0),), constant_values=round(IMAGE_PAD_VALUE)),
            np.pad(label, pads, constant_values=255))


def _eval_fit(size, mode, multiple_of):
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; expected one of {EVAL_MODES}")
    size = check_size(size, multiple_of, "evaluation size")
    return size, lambda image, label: fit_to_size(image, label, size, mode)


def eval_dataset(samples, info, size, batch_size, multiple_of=1, mode="resize", with_names=False, check=True,
                 skip_bad=False):
    """Finite, deterministic evaluation batches in sample order (the last batch may be smaller).

    Args:
      size: (H, W) every image is fitted to (see fit_to_size), multiples of `multiple_of`.
      with_names: also yield each image's sample name, so predictions can be written per image.
      Others: as train_dataset.

    Returns:
      tf.data.Dataset of (images float32 [B, H, W, 3] RGB 0..255, labels uint8 [B, H, W]) or, with
      with_names, (images, labels, names string [B]).
    """
    size, fit = _eval_fit(size, mode, multiple_of)
    samples = _checked(samples, info, check, skip_bad)
    load = _loader(samples, info, fit)
    names = tf.constant([s.name for s in samples])

    def element(index):
        image, label = load(index)
        image = tf.cast(tf.ensure_shape(image, size + (3,)), tf.float32)
        label = tf.ensure_shape(label, size)
        return (image, label, names[index]) if with_names else (image, label)

    return _parallel_batches(tf.data.Dataset.range(len(samples)), element, batch_size)


def eval_batches(samples, info, size, batch_size, multiple_of=1, mode="resize"):
    """The batches of eval_dataset as numpy, without tf.data (for numpy consumers such as calibration).

    Yields (images float32 [B, H, W, 3] RGB 0..255, labels uint8 [B, H, W]) in sample order.
    Bad files raise as they are met (call check_samples first to find them all up front).
    """
    _, fit = _eval_fit(size, mode, multiple_of)
    for start in range(0, len(samples), batch_size):
        pairs = [fit(*load_sample(s, info)) for s in samples[start:start + batch_size]]
        yield (np.stack([p[0] for p in pairs]).astype(np.float32), np.stack([p[1] for p in pairs]))
