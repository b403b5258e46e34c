"""The calibration cache: one pass of the network over the calibration split, read by the search.

For each image n and candidate early exit e the cache stores what the search needs to evaluate any
policy thresholds exactly, by arithmetic (DESIGN.md §1.5):

  * conf_frac[n, e, p]: the fraction of pixels whose smoothed confidence (mess_tf.policy) is
    >= th_pix_grid[p], i.e. the image confidence at every pixel threshold of the grid;
  * tp, fp, fn [n, e, c]: per-class true/false positive and false negative pixel counts of the
    exit's argmax prediction, for every early exit and, at index E, the final exit; label 255 is
    ignored.

A configuration's mIoU is then computed from the counts summed over images, each image taking the
counts of the exit it leaves at. The cache records the network config, the exits, the policy, a
fingerprint of the checkpoint and what identifies the network's architecture
(cost_model.network_identity); loading it for another network/checkpoint is refused, and so is
searching it with the latency table of another network.
"""
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import tensorflow as tf

from mess_tf import export, io_utils, policy
from mess_tf.costs import model as cost_model
from mess_tf.deployment import FINAL_EXIT
from mess_tf.keras_lib import keras

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
      network_identity: cost_model.network_identity of the network (None in caches written
        before it was recorded).
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
    network_identity: dict = None

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

    def identity(self):
        """What identifies the cache's network, as far as it records it: its network_identity,
        or for a cache written before that was recorded, its class count and input size."""
        known = {"num_classes": self.num_classes}
        if "input_size" in self.network_config:
            known["input_size"] = list(self.network_config["input_size"])
        return {**known, **(self.network_identity or {})}

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
            "network_identity": self.network_identity,
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
    contents = io_utils.read_npz(path, "calibration cache")
    try:
        meta = json.loads(str(contents["metadata"])) if "metadata" in contents else None
    except ValueError as e:
        raise ValueError(f"calibration cache {path} has unreadable metadata: {e}") from None
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


def from_logits(outputs, exit_ids, exit_strides, th_pix_grid, cfg):
    """Turns a network's logits into what the cache reads: (class maps, confidence fractions).

    Args:
      outputs: (logits, coarse_logits): logits {exit id | "final": [B, H', W', C]} at the class
        map's resolution (the input's / cfg.class_map_stride; their argmax, upsampled to the input
        size as an app does, is scored) and coarse_logits {exit id: [B, h, w, C]} at each
        exit's own resolution (the policy's input, see MultiExitNetwork.coarse_logits). A plain
        logits dict means the exits have no coarser resolution: the policy reads the logits.
      exit_ids, exit_strides: the early exits and their output strides.
      th_pix_grid: [P] pixel thresholds.
      cfg: policy.PolicyConfig.

    Returns:
      ({exit id | "final": int [B, H, W] class map}, {exit id: float [B, P] confidence fractions}).
    """
    logits, coarse = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    missing = [k for k in (*exit_ids, FINAL_EXIT) if k not in logits] + [
        f"{k} (coarse)" for k in exit_ids if k not in coarse]
    if missing:
        raise ValueError(f"predict_fn returned no logits for exits {missing}")
    class_maps = {k: export.upsample_class_map(np.argmax(np.asarray(logits[k]), -1), cfg.class_map_stride)
                  for k in (*exit_ids, FINAL_EXIT)}
    fractions = {e: np.stack([policy.confidence_fractions(one, s, th_pix_grid, cfg) for one in np.asarray(coarse[e])])
                 for e, s in zip(exit_ids, exit_strides)}
    return class_maps, fractions


def build_cache(predict_fn, batches, exit_ids, exit_strides, num_classes, th_pix_grid, policy_config,
                network_config, fingerprint, image_names, dataset="", split="", checkpoint_every=64,
                partial_path=None, network_identity=None):
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
      network_identity: cost_model.network_identity of the network, recorded in the cache.

    Returns:
      CalibrationCache.
    """
    exit_ids, image_names = tuple(exit_ids), tuple(image_names)
    th_pix_grid = np.asarray(th_pix_grid, np.float64)
    n, e, p, c = len(image_names), len(exit_ids), th_pix_grid.size, num_classes
    cache = CalibrationCache(np.zeros((n, e, p)), *np.zeros((3, n, e + 1, c), np.int64), exit_ids, exit_strides,
                             th_pix_grid, policy_config, network_config, fingerprint, image_names, dataset, split,
                             network_identity)
    done = _resume(cache, partial_path)
    seen, since_checkpoint = 0, 0
    for images, labels in batches:
        count = len(images)
        skip = min(max(done - seen, 0), count)
        if skip < count:
            class_maps, fractions = predict_fn(images[skip:])
            missing = [k for k in (*exit_ids, FINAL_EXIT) if k not in class_maps] + [
                f"{k} (confidence)" for k in exit_ids if k not in fractions]
            if missing:
                raise ValueError(f"predict_fn returned nothing for exits {missing}")
            for i in range(skip, count):
                index = seen + i
                if index >= n:
                    raise ValueError(f"the batches hold more images than the {n} image names")
                if e:
                    cache.conf_frac[index] = np.stack([fractions[k][i - skip] for k in exit_ids])
                label = np.asarray(labels[i])
                counts = np.stack([confusion_counts(np.asarray(class_maps[k][i - skip]), label, c)
                                   for k in (*exit_ids, FINAL_EXIT)], axis=1)
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


def _num_classes(net):
    """Classes a network predicts (a wrapped user network has no config)."""
    return net.coarse_logits(FINAL_EXIT).shape[-1]


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
    ids = (*net.exit_ids, FINAL_EXIT)
    model = keras.Model(net.image, {e: net.coarse_logits(e) for e in ids})
    strides = [net.position_of(e).stride for e in net.exit_ids]
    size = export.class_map_size(net.backbone.input_size, policy_config)

    def predict(images):
        coarse = model(images, training=False)
        # The class maps as the exported model computes them (export._class_map): bilinear to size.
        logits = {k: tf.image.resize(coarse[k], size, method="bilinear").numpy() for k in ids}
        return from_logits((logits, {k: v.numpy() for k, v in coarse.items()}), net.exit_ids, strides, th_pix_grid,
                           policy_config)

    return build_cache(predict, batches, net.exit_ids, strides, _num_classes(net), th_pix_grid,
                       policy_config, net.config.to_dict(), checkpoint_fingerprint(checkpoint), image_names,
                       dataset, split, checkpoint_every, partial_path, cost_model.network_identity(net))


def calibrate_parts(net, parts, checkpoint, batches, image_names, th_pix_grid, policy_config, positions=None,
                    dataset="", split="", partial_path=None, checkpoint_every=64, num_threads=None):
    """The calibration pass run by converted TFLite parts: the cache of the precision that ships.

    The parts (export.convert_parts with th_pix_grid, e.g. int8) are chained as a staged model runs
    them: each segment is fed the previous one's output tensor as it is (requantised only if a
    scale differs), each head the features at its position, each class map the head's coarse
    logits, and the final head the backbone output (and the decoder's features). Heads give their
    in-graph image confidence at every pixel threshold, class maps and the final head their
    argmax, so the cache holds the decisions and class maps of the deployed precision.

    Args:
      net: the network the parts were converted from (its structure; its weights are not used).
      parts: {part key: .tflite bytes} from export.convert_parts(net, ..., positions=positions,
        th_pix_grid=th_pix_grid).
      positions: the Positions the parts' segments end at (as given to convert_parts).
      num_threads: interpreter threads.
      Others: as calibrate_network.

    Returns:
      CalibrationCache.
    """
    from ai_edge_litert.interpreter import Interpreter

    from mess_tf import runtime
    from mess_tf.latency import table

    runners = {key: Interpreter(model_content=model_bytes, num_threads=num_threads)
               .get_signature_runner(export.DEFAULT_SIGNATURE) for key, model_bytes in parts.items()}
    sources = export.part_sources(net, net.exit_ids, positions)
    strides = [net.position_of(e).stride for e in net.exit_ids]
    float_input = {"dtype": np.float32, "quantization": (0.0, 0)}

    def call(key, feeds):
        """Part `key` on {input name: (array, its tensor detail)}; lone inputs are named "input"
        (export.convert_model). Returns {output name: (array, its tensor detail)}."""
        runner = runners[key]
        details = runner.get_input_details()
        inputs = {}
        for name, detail in details.items():
            value, source = feeds[name]
            same = source["dtype"] == detail["dtype"] and source["quantization"] == detail["quantization"]
            inputs[name] = value if same else runtime.quantise(runtime.dequantise(value, source), detail)
        outputs, out_details = runner(**inputs), runner.get_output_details()
        return {name: (value, out_details[name]) for name, value in outputs.items()}

    def predict_one(image):
        produced = {"image": (image[None].astype(np.float32), float_input)}
        for key, feeds in sources.items():
            if table.parse_part_key(key)[0] == table.SEGMENT:
                (source,) = feeds.values()
                produced[key] = call(key, {"input": produced[source]})["output"]
        class_maps, fractions = {}, {}
        for eid in net.exit_ids:
            (source,) = sources[table.part_key(table.HEAD, eid)].values()
            head = call(table.part_key(table.HEAD, eid), {"input": produced[source]})
            fractions[eid] = runtime.dequantise(*head[export.CONFIDENCE]).reshape(-1)
            class_map = call(table.part_key(table.CLASS_MAP, net.position_of(eid).name),
                             {export.COARSE_LOGITS: head[export.COARSE_LOGITS]})
            class_maps[eid] = class_map[export.CLASS_MAP][0][0]
        final = call(table.FINAL_HEAD, {name: produced[source] for name, source in sources[table.FINAL_HEAD].items()})
        class_maps[FINAL_EXIT] = final[export.CLASS_MAP][0][0]
        return ({k: export.upsample_class_map(v, policy_config.class_map_stride) for k, v in class_maps.items()},
                fractions)

    def predict(images):
        results = [predict_one(image) for image in images]
        return ({k: np.stack([r[0][k] for r in results]) for k in results[0][0]},
                {k: np.stack([r[1][k] for r in results]) for k in results[0][1]})

    return build_cache(predict, batches, net.exit_ids, strides, _num_classes(net), th_pix_grid, policy_config,
                       net.config.to_dict(), checkpoint_fingerprint(checkpoint), image_names, dataset, split,
                       checkpoint_every, partial_path, cost_model.network_identity(net))
