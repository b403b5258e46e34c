"""Stage 2's stored views: the frozen network's outputs, computed once per augmented view.

Stage 2 freezes the backbone and the final head, weights and batch-norm statistics alike, so their
outputs depend only on the augmented image. Recomputing them every epoch was most of stage 2's time
(the heads are cheap; bench/stage2_speed.py measures the parts). So stage 2 first runs the frozen
pass over K epochs of the training stream (K views of every image, each drawn by the same
augmentation the direct path draws) and stores, per view:
  - the feature maps at the exit positions,
  - the final exit's logits before their bilinear upsampling (the distillation teacher),
  - the labels of the crop,
in float16 (labels uint8), in memory-mapped .npy files under `<run>/stored_views/`. The exit heads
then train on those for as many steps as they need.

Which views a step reads is a pure function of the step (`batch_rows`): the first pass reads them
in stream order, so a step of the stored path sees exactly the batch the direct path would; later
passes shuffle the views with a seed per pass. A resumed run therefore trains on the same batches.

A store is filled in order and its header (`store.json`, written atomically) counts the batches
that are complete, so an interrupted fill resumes where it stopped. The header also records what
the views depend on (the frozen weights' fingerprint, crop size, positions, a fingerprint of the
stream's first batch): a store made for anything else is refused, naming what differs. A truncated
or foreign file is refused and rebuilt. Files are read with allow_pickle=False.
"""
import dataclasses
import hashlib
import os
import shutil

import numpy as np

from mess_tf import io_utils

FOLDER = "stored_views"
HEADER = "store.json"
FORMAT = "mess_tf.stored_views/1"
DEFAULT_MAX_BYTES = 4 * 10 ** 9
LABELS = "labels"


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a store holds and what its views depend on.

    Attributes:
      views: K, augmented views per training image.
      images: N, training images per epoch of the stream.
      batch_size: B, images per batch of the stream (the store holds K * N // B whole batches).
      shapes: {tensor name: per-view shape}: each position's features, FINAL (coarse logits), LABELS.
      dtype: storage dtype of the float tensors ("float16" or "float32").
      identity: {field: value} the views depend on (frozen weights, crop size, positions, stream).
    """

    views: int
    images: int
    batch_size: int
    shapes: dict
    dtype: str
    identity: dict

    @property
    def batches(self):
        return self.views * self.images // self.batch_size

    @property
    def rows(self):
        return self.batches * self.batch_size

    def to_dict(self):
        return {**dataclasses.asdict(self), "shapes": {k: list(v) for k, v in self.shapes.items()}}


def bytes_per_view(shapes, dtype):
    """Bytes one view takes: the float tensors in `dtype`, the labels in uint8."""
    size = np.dtype(dtype).itemsize
    return sum(int(np.prod(shape)) * (1 if name == LABELS else size) for name, shape in shapes.items())


def views_that_fit(requested, images, shapes, dtype, max_bytes, folder):
    """K: the views per image to store, at most `requested`, within `max_bytes` and the free disk.

    Raises:
      ValueError naming the bound, the bytes one view of every image needs, and the flag that
      changes it, when not even one view per image fits.
    """
    per_epoch = images * bytes_per_view(shapes, dtype)
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    fits = min(max_bytes, free) // per_epoch
    if fits < 1:
        bound = (f"the bound of {max_bytes / 1e9:.2f} GB (--max_store_gb)" if max_bytes <= free
                 else f"the {free / 1e9:.2f} GB free on the disk of {folder}")
        raise ValueError(f"stored views: one view of each of the {images} training images needs {per_epoch / 1e9:.2f} "
                         f"GB, more than {bound}; raise --max_store_gb, free disk space, or train with "
                         f"--stored_views=0 (the direct path)")
    return int(min(requested, fits))


def fingerprint(arrays):
    """A short hex digest of a sequence of arrays (shapes and bytes)."""
    digest = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


class ViewStore:
    """The memory-mapped store of one stage-2 run. Open it with `ViewStore.open`."""

    def __init__(self, folder, spec, filled, arrays):
        self.folder, self.spec, self.filled, self._arrays = folder, spec, filled, arrays

    @classmethod
    def open(cls, run_dir, spec, warn=None):
        """The store of `run_dir` for `spec`: the existing one if it was made for the same spec
        (possibly partly filled), else a new, empty one. A store whose files are truncated or
        foreign is rebuilt, said in one line to `warn` (a callable taking a string).

        Raises:
          ValueError naming what differs when the store was made for another frozen network, crop
          size, positions or stream (delete `<run>/stored_views` or use another output folder).
        """
        folder = os.path.join(run_dir, FOLDER)
        header_path = os.path.join(folder, HEADER)
        if os.path.isdir(folder) and os.listdir(folder):
            try:
                header = io_utils.read_json(header_path, "stored views header")
            except (OSError, ValueError):
                header = {}
            stored = header.get("spec", {}).get("identity", {})
            diffs = [f"{k}: store {stored.get(k)!r}, run {v!r}" for k, v in spec.identity.items() if stored.get(k) != v]
            if header.get("format") == FORMAT and diffs:
                raise ValueError(f"{folder} holds views of another stage-2 setup ({'; '.join(diffs)}); delete it or "
                                 f"use another output folder")
            if header.get("format") == FORMAT and header.get("spec") == spec.to_dict():
                arrays = cls._map(folder, spec, "r+")
                if arrays is not None:
                    return cls(folder, spec, int(header["filled"]), arrays)
            if warn:
                warn(f"stored views in {folder} are truncated, foreign or of other sizes; rebuilding them")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        arrays = {name: np.lib.format.open_memmap(os.path.join(folder, name + ".npy"), "w+",
                                                  np.uint8 if name == LABELS else spec.dtype, (spec.rows, *shape))
                  for name, shape in spec.shapes.items()}
        store = cls(folder, spec, 0, arrays)
        store._write_header()
        return store

    @classmethod
    def load(cls, run_dir):
        """The complete store of `run_dir`, read-only, as its header describes it.

        Raises:
          ValueError if `run_dir` holds no complete, readable store.
        """
        folder = os.path.join(run_dir, FOLDER)
        header = io_utils.read_json(os.path.join(folder, HEADER), "stored views header")
        spec = StoreSpec(**{**header["spec"], "shapes": {k: tuple(v) for k, v in header["spec"]["shapes"].items()}})
        arrays = cls._map(folder, spec, "r")
        if arrays is None or header["filled"] != spec.batches:
            raise ValueError(f"{folder} holds no complete store of stage-2 views (filled {header['filled']} of "
                             f"{spec.batches} batches, or a file is truncated)")
        return cls(folder, spec, header["filled"], arrays)

    @staticmethod
    def _map(folder, spec, mode):
        """{name: memmap} of a store's files, or None if one is missing, foreign or truncated."""
        arrays = {}
        for name, shape in spec.shapes.items():
            path = os.path.join(folder, name + ".npy")
            try:
                array = np.load(path, mmap_mode=mode, allow_pickle=False)
            except (OSError, ValueError):
                return None
            dtype = np.uint8 if name == LABELS else np.dtype(spec.dtype)
            if array.shape != (spec.rows, *shape) or array.dtype != dtype:
                return None
            arrays[name] = array
        return arrays

    @property
    def complete(self):
        return self.filled == self.spec.batches

    def _write_header(self):
        io_utils.write_json(os.path.join(self.folder, HEADER),
                            {"format": FORMAT, "spec": self.spec.to_dict(), "filled": self.filled})

    def fill(self, batches, frozen, every=20, progress=None):
        """Stores the frozen outputs of the stream's batches, from the first one not stored yet.

        Args:
          batches: iterator over the stream's (images, labels) batches, starting at batch `filled`.
          frozen: callable images -> {position: features array, FINAL: coarse final logits array}.
          every: batches between flushes of the files and the header (what a kill -9 may redo).
          progress: optional callable(batches stored, batches in all).
        """
        while self.filled < self.spec.batches:
            images, labels = next(batches)
            outputs = frozen(images)
            rows = slice(self.filled * self.spec.batch_size, (self.filled + 1) * self.spec.batch_size)
            for name, value in outputs.items():
                self._arrays[name][rows] = np.asarray(value)
            self._arrays[LABELS][rows] = np.asarray(labels)
            self.filled += 1
            if self.filled % every == 0 or self.complete:
                for array in self._arrays.values():
                    array.flush()
                self._write_header()
                if progress:
                    progress(self.filled, self.spec.batches)

    def batch(self, step, seed):
        """({position: features float32 [B, h, w, c], FINAL: coarse final logits float32}, labels
        uint8 [B, H, W]) of training step `step` (1-based); see batch_rows."""
        rows = batch_rows(step, self.spec.batches, self.spec.batch_size, seed)
        if not isinstance(rows, slice):
            rows = np.sort(rows)  # the loss is a mean over the batch; sorted rows read the files in order
        inputs = {name: a[rows].astype(np.float32) for name, a in self._arrays.items() if name != LABELS}
        return inputs, np.asarray(self._arrays[LABELS][rows])


def batch_rows(step, batches, batch_size, seed):
    """The stored rows training step `step` (1-based) reads: in pass 0 (steps 1..batches) the
    stream's batch step - 1 as it is; in pass p >= 1 a slice of a permutation of all rows drawn
    from (seed, p). A slice, or an int array of `batch_size` rows."""
    index, position = divmod(step - 1, batches)
    if index == 0:
        return slice(position * batch_size, (position + 1) * batch_size)
    order = np.random.default_rng([seed, 104729, index]).permutation(batches * batch_size)
    return order[position * batch_size:(position + 1) * batch_size]
