"""The calibration cache: one pass of the network over the calibration split, read by the search.

For each image n and candidate early exit e the cache stores what the search needs to evaluate any
policy thresholds exactly, by arithmetic (DESIGN.md §1.5):

  * conf_frac[n, e, p]: the fraction of pixels whose smoothed confidence (mess_tf.policy) is
    >= th_pix_grid[p], i.e. the image confidence at every pixel threshold of the grid;
  * tp, fp, fn [n, e, c]: per-class true/false positive and false negative pixel counts of the
    exit's argmax prediction, for every early exit and, at index E, the final exit; label 255 is
    ignored.

A configuration's mIoU is then computed from the counts summed over images, each image taking the
counts of the exit it leaves at. The cache records the network config, the exits, the policy and a
fingerprint of the checkpoint; loading it for another network/checkpoint is refused.
"""
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from mess_tf import io_utils, policy
from mess_tf.keras_lib import keras
from mess_tf.deployment import FINAL_EXIT

IGNORE_LABEL = 255


@dataclasses.dataclass
class CalibrationCache:
    """Per-image, per-exit confidence statistics and confusion counts.

    Attributes:
      conf_frac: float64 [N, E, P] fraction of pixels with smoothed confidence >= th_pix_grid[p].
      tp, fp, fn: int64 [N, E + 1, C] per-class pixel counts; index E is the final exit.
      exit_ids: E early-exit ids (`position:head`).
      exit_strides: E output strides (input pixels per feature pixel) of those exits.
      th_pix_grid: float [P] pixel-confidence thresholds.
      policy: policy.PolicyConfig used for the confidences.
      network_config: the trained network's config (a dict).
      fingerprint: checkpoint_fingerprint of the weights that made the cache.
      image_names: N names, in cache order.
      dataset, split: where the images came from.
    """

    conf_frac: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    exit_ids: tuple
    exit_strides: tuple
    th_pix_grid: np.ndarray
    policy: policy.PolicyConfig
    network_config: dict
    fingerprint: str
    image_names: tuple
    dataset: str = ""
    split: str = ""

    def __post_init__(self):
        self.exit_ids, self.exit_strides = tuple(self.exit_ids), tuple(int(s) for s in self.exit_strides)
        self.image_names, self.th_pix_grid = tuple(self.image_names), np.asarray(self.th_pix_grid, np.float64)
        n, e, p = self.conf_frac.shape
        expected = (n, e + 1, self.tp.shape[-1])
        problems = [f"{name} has shape {arr.shape}, expected {expected}"
                    for name, arr in (("tp", self.tp), ("fp", self.fp), ("fn", self.fn)) if arr.shape != expected]
        if len(self.exit_ids) != e or len(self.exit_strides) != e:
            problems.append(f"{len(self.exit_ids)} exit ids / {len(self.exit_strides)} strides for {e} exits")
        if self.th_pix_grid.shape != (p,):
            problems.append(f"th_pix grid of {self.th_pix_grid.size} values for {p} conf_frac columns")
        if len(self.image_names) != n:
            problems.append(f"{len(self.image_names)} image names for {n} images")
        if problems:
            raise ValueError("inconsistent calibration cache: " + "; ".join(problems))

    @property
    def num_images(self):
        return self.conf_frac.shape[0]

    @property
    def num_classes(self):
        return self.tp.shape[-1]

    @property
    def all_exit_ids(self):
        """Early exit ids then FINAL_EXIT, aligned with the second axis of tp/fp/fn."""
        return self.exit_ids + (FINAL_EXIT,)

    def metadata(self):
        """Everything but the arrays, as a JSON-able dict."""
        return {
            "exit_ids": list(self.exit_ids), "exit_strides": list(self.exit_strides),
            "th_pix_grid": self.th_pix_grid.tolist(), "policy": self.policy.to_dict(),
            "network_config": self.network_config, "fingerprint": self.fingerprint,
            "image_names": list(self.image_names), "dataset": self.dataset, "split": self.split,
        }

    def save(self, path):
        """Writes the cache as one .npz (arrays + a JSON `metadata` string), atomically."""
        io_utils.save_npz(path, conf_frac=self.conf_frac, tp=self.tp, fp=self.fp, fn=self.fn,
                          metadata=np.array(json.dumps(self.metadata(), sort_keys=True)))

    @classmethod
    def load(cls, path, expected_fingerprint=None, expected_config=None):
        """Reads a cache; refuses it if it was made by other weights or another network config.

        Raises:
          FileNotFoundError: no file at `path`.
          ValueError: unreadable, or stale (the message says what differs).
        """
        arrays, meta = _read_npz(path, ("conf_frac", "tp", "fp", "fn"))
        stale = _differences(meta, expected_fingerprint, expected_config)
        if stale:
            raise ValueError(f"calibration cache {path} is stale (recompute it): " + "; ".join(stale))
        try:
            return cls(policy=policy.PolicyConfig.from_dict(meta.pop("policy")), **arrays, **meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"calibration cache {path}: {e}") from None


def _read_npz(path, names):
    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration cache not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {k: data[k] for k in data.files}
        meta = json.loads(str(contents["metadata"])) if "metadata" in contents else None
    except (OSError, ValueError) as e:  # not a zip (np.load then refuses it as a pickle), bad JSON
        raise ValueError(f"calibration cache {path} is not a readable .npz: {e}") from None
    missing = [k for k in (*names, "metadata") if k not in contents]
    if missing:
        raise ValueError(f"calibration cache {path} lacks arrays {missing}; is it a cache?")
    return {k: contents[k] for k in names}, meta


def _differences(meta, expected_fingerprint, expected_config):
    """What makes a cache stale: human-readable differences from what the caller expects."""
    out = []
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        out.append(f"checkpoint fingerprint {meta.get('fingerprint')!r} != expected {expected_fingerprint!r}")
    if expected_config is not None:
        cached = meta.get("network_config") or {}
        expected = json.loads(json.dumps(expected_config))  # tuples -> lists, as stored
        keys = sorted(k for k in set(cached) | set(expected) if cached.get(k) != expected.get(k))
        out += [f"network config {k}: cached {cached.get(k)!r} != expected {expected.get(k)!r}" for k in keys]
    return out


def checkpoint_fingerprint(path_or_files):
    """Short sha256 hex (16 chars) of a TF checkpoint's data and index files.

    Args:
      path_or_files: a checkpoint prefix (`.../ckpt-3`, whose `.index` and `.data-*` files are
        hashed) or an explicit list of files.
    """
    if isinstance(path_or_files, (str, os.PathLike)):
        prefix = os.fspath(path_or_files)
        folder, base = os.path.split(prefix)
        try:
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder or ".")
                           if f == base + ".index" or f.startswith(base + ".data-"))
        except FileNotFoundError:
            files = []
        if not files:
            raise FileNotFoundError(f"no checkpoint files (.index/.data-*) for prefix {prefix}")
    else:
        files = sorted(os.fspath(f) for f in path_or_files)
    digest = hashlib.sha256()
    for name in files:
        digest.update(os.path.basename(name).encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def confusion_counts(pred, labels, num_classes):
    """Per-class TP, FP, FN of one prediction, ignoring label 255.

    Args:
      pred: int [H, W] predicted classes.
      labels: int [H, W] ground truth in [0, num_classes) or 255.
    Returns:
      int64 [3, C]: tp, fp, fn pixel counts.
    """
    valid = labels != IGNORE_LABEL
    bad = np.unique(labels[valid & ((labels < 0) | (labels >= num_classes))])
    if bad.size:
        raise ValueError(f"labels {bad.tolist()} are outside [0, {num_classes}) and are not {IGNORE_LABEL}")
    pred, labels = pred[valid], labels[valid]
    tp = np.bincount(labels[pred == labels], minlength=num_classes)
    predicted = np.bincount(pred, minlength=num_classes)
    actual = np.bincount(labels, minlength=num_classes)
    return np.stack([tp, predicted - tp, actual - tp]).astype(np.int64)


def _image_stats(logits_by_exit, coarse_by_exit, label, exit_ids, exit_strides, th_pix_grid, cfg, num_classes):
    """conf_frac [E, P] (from the coarse logits) and counts [3, E + 1, C] (from the full-resolution
    logits) of one image."""
    conf = np.stack([policy.confidence_fractions(coarse_by_exit[e], s, th_pix_grid, cfg)
                     for e, s in zip(exit_ids, exit_strides)]) if exit_ids else np.zeros((0, len(th_pix_grid)))
    counts = np.stack([confusion_counts(np.argmax(logits_by_exit[e], -1), label, num_classes)
                       for e in (*exit_ids, FINAL_EXIT)], axis=1)
    return conf, counts


def build_cache(predict_fn, batches, exit_ids, exit_strides, num_classes, th_pix_grid, policy_config,
                network_config, fingerprint, image_names, dataset="", split="", checkpoint_every=64,
                partial_path=None):
    """Runs every candidate exit on the calibration images and collects a CalibrationCache.

    Args:
      predict_fn: images float [B, H, W, 3] -> (logits, coarse_logits): logits {exit_id: [B, H, W, C]
        at input resolution, ..., "final": ...} (scored against the labels) and coarse_logits
        {exit_id: [B, H/stride, W/stride, C]} at each exit's own resolution (the policy's input,
        see MultiExitNetwork.coarse_logits); both must cover every id in exit_ids. A plain logits
        dict means the exits have no coarser resolution: the policy reads the logits themselves.
      batches: iterable of (images [B, H, W, 3], labels int [B, H, W]) numpy pairs, in the order of
        image_names (deterministic, so a resumed pass skips the images already done).
      exit_ids, exit_strides: the E candidate exits and their output strides.
      num_classes: C.
      th_pix_grid: [P] pixel thresholds.
      policy_config: policy.PolicyConfig.
      network_config: dict recorded in the cache.
      fingerprint: checkpoint_fingerprint of the weights.
      image_names: the N image names.
      checkpoint_every: save partial results every this many images (when partial_path is set).
      partial_path: .npz for partial results; if it holds a compatible partial pass, images already
        done are skipped. Removed once the pass completes.

    Returns:
      CalibrationCache.
    """
    exit_ids, image_names = tuple(exit_ids), tuple(image_names)
    th_pix_grid = np.asarray(th_pix_grid, np.float64)
    n, e, p, c = len(image_names), len(exit_ids), th_pix_grid.size, num_classes
    cache = CalibrationCache(np.zeros((n, e, p)), *np.zeros((3, n, e + 1, c), np.int64), exit_ids, exit_strides,
                             th_pix_grid, policy_config, network_config, fingerprint, image_names, dataset, split)
    done = _resume(cache, partial_path)
    seen, since_checkpoint = 0, 0
    for images, labels in batches:
        count = len(images)
        skip = min(max(done - seen, 0), count)
        if skip < count:
            outputs = predict_fn(images[skip:])
            outputs, coarse = outputs if isinstance(outputs, tuple) else (outputs, outputs)
            missing = [k for k in (*exit_ids, FINAL_EXIT) if k not in outputs] + [
                f"{k} (coarse)" for k in exit_ids if k not in coarse]
            if missing:
                raise ValueError(f"predict_fn returned no logits for exits {missing}")
            for i in range(skip, count):
                index = seen + i
                if index >= n:
                    raise ValueError(f"the batches hold more images than the {n} image names")
                logits = {k: np.asarray(outputs[k][i - skip]) for k in (*exit_ids, FINAL_EXIT)}
                coarse_logits = {k: np.asarray(coarse[k][i - skip]) for k in exit_ids}
                cache.conf_frac[index], counts = _image_stats(
                    logits, coarse_logits, np.asarray(labels[i]), exit_ids, cache.exit_strides, th_pix_grid, policy_config, c)
                cache.tp[index], cache.fp[index], cache.fn[index] = counts
            done, since_checkpoint = seen + count, since_checkpoint + count - skip
            if partial_path and since_checkpoint >= checkpoint_every:
                _save_partial(cache, done, partial_path)
                since_checkpoint = 0
        seen += count
    if seen != n:
        raise ValueError(f"the batches held {seen} images but {n} image names were given")
    if partial_path and os.path.exists(partial_path):
        os.remove(partial_path)
    return cache


def _save_partial(cache, done, path):
    meta = dict(cache.metadata(), done=done)
    io_utils.save_npz(path, conf_frac=cache.conf_frac, tp=cache.tp, fp=cache.fp, fn=cache.fn,
                      metadata=np.array(json.dumps(meta, sort_keys=True)))
    logging.info("calibration: %d/%d images done, saved %s", done, cache.num_images, path)


def _resume(cache, path):
    """Loads a compatible partial pass into `cache`; returns how many images it had done."""
    if not path or not os.path.exists(path):
        return 0
    arrays, meta = _read_npz(path, ("conf_frac", "tp", "fp", "fn"))
    done = meta.pop("done")
    if meta != json.loads(json.dumps(cache.metadata(), sort_keys=True)):
        raise ValueError(f"partial calibration {path} was made with other settings (checkpoint, exits, grid, "
                         f"policy or images); delete it to start over")
    for name, value in arrays.items():
        getattr(cache, name)[:done] = value[:done]
    logging.info("calibration: resuming %s at image %d/%d", path, done, cache.num_images)
    return done


def calibrate_network(net, checkpoint, batches, image_names, th_pix_grid, policy_config, dataset="", split="",
                      partial_path=None, checkpoint_every=64):
    """The calibration pass of a trained MultiExitNetwork over every one of its exits.

    Args:
      net: network.MultiExitNetwork with its trained weights loaded.
      checkpoint: the checkpoint prefix those weights came from (fingerprinted into the cache).
      batches: iterable of (images [B, H, W, 3] RGB 0..255, labels [B, H, W]) numpy pairs, in
        the order of image_names.
      Other arguments: as build_cache.

    Returns:
      CalibrationCache.
    """
    model = keras.Model(net.image, {"logits": net.model.output,
                                    "coarse": {e: net.coarse_logits(e) for e in net.exit_ids}})

    def predict(images):
        outputs = model(images, training=False)
        return ({k: v.numpy() for k, v in outputs["logits"].items()},
                {k: v.numpy() for k, v in outputs["coarse"].items()})

    strides = [net.position_of(e).stride for e in net.exit_ids]
    return build_cache(predict, batches, net.exit_ids, strides, net.model.output["final"].shape[-1], th_pix_grid,
                       policy_config, net.config.to_dict(), checkpoint_fingerprint(checkpoint), image_names,
                       dataset, split, checkpoint_every, partial_path)
