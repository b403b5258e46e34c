"""The Dataset base class: splits, pairing of image and label files, and the calibration carve-out.

A reader subclass lists the files of its dataset's own splits. This class adds a "calibration"
split when the dataset has none: a fixed fraction of the training split (or the validation split),
chosen by a hash of each sample's name so it is stable across machines and file orders, and
removed from the training splits so the deployment search never tunes on images the network was
trained on. The test split is never a source: the search must not see it.
"""
import hashlib
import logging
import math
import os

from mess_tf.data.info import Sample

CALIBRATION = "calibration"


class Dataset:
    """Base class of the readers. Subclasses set `info` and implement `own_splits` and `_list`.

    Args:
      root: the dataset folder.
      skip_bad: False raises on an image without a label (or a label without an image); True
        leaves such files out and records one message each in `problems`.
      calibration_source: the split the calibration split is carved from ("train" or "val") when
        the dataset has no calibration split of its own.
      calibration_fraction: fraction of the source split carved off (at least one sample).
    """

    training_splits = ("train",)  # splits that must not contain the carved calibration samples

    def __init__(self, root, skip_bad=False, calibration_source="train", calibration_fraction=0.1):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{self.info.name} dataset folder not found: {root}")
        if calibration_source == "test":
            raise ValueError("calibration_source='test': the calibration split must never come from the test split")
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration_fraction={calibration_fraction}; expected a fraction in (0, 1)")
        self.root, self.skip_bad = root, skip_bad
        self.calibration_source, self.calibration_fraction = calibration_source, calibration_fraction
        self.problems = []

    def own_splits(self):
        """The splits the dataset itself defines, as a tuple of names."""
        raise NotImplementedError

    def _list(self, split):
        """The samples of one of `own_splits()`, sorted by name."""
        raise NotImplementedError

    def location(self, split):
        """Where the files of one of `own_splits()` are, for messages ("IMAGE_DIR / LABEL_DIR")."""
        raise NotImplementedError

    @property
    def splits(self):
        own = self.own_splits()
        return own if CALIBRATION in own else own + (CALIBRATION,)

    def samples(self, split):
        """The samples of `split` (one of `splits`), sorted by name. Returns list of Sample.

        Raises:
          ValueError for an unknown split, or one without samples (naming its folders).
        """
        if split not in self.splits:
            raise ValueError(f"{self.info.name}: unknown split {split!r}; valid splits: {', '.join(self.splits)}")
        samples = self._samples(split)
        if not samples:
            source = split if split in self.own_splits() else self.calibration_source
            carved = split != CALIBRATION and bool(self._list(split))  # every sample went to calibration
            raise ValueError(f"{self.info.name}: split {split!r} has no samples"
                             f"{' left once the calibration split is carved off' if carved else ''} "
                             f"({self.location(source)})")
        return samples

    def _samples(self, split):
        touched = (CALIBRATION, self.calibration_source) + self.training_splits
        if CALIBRATION in self.own_splits() or split not in touched:
            return self._list(split)
        if self.calibration_source not in self.own_splits():
            raise ValueError(f"{self.info.name}: cannot carve the calibration split off {self.calibration_source!r}; "
                             f"it is not one of {self.own_splits()}")
        carved = self._carved()
        if split == CALIBRATION:
            return [s for s in self._list(self.calibration_source) if s.name in carved]
        return [s for s in self._list(split) if s.name not in carved]

    def _carved(self):
        """Names of the calibration samples: the ceil(fraction * n) source names of smallest hash."""
        names = [s.name for s in self._list(self.calibration_source)]
        ranked = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        return set(ranked[:max(1, math.ceil(self.calibration_fraction * len(names)))])

    def _pair(self, images, labels, where):
        """Samples from {name: image path} and {name: label path}; an unmatched file is an error
        (or, with skip_bad, a recorded problem). `where` names the folders for the message."""
        for missing, have, kind in ((labels, images, "image"), (images, labels, "label")):
            for name in sorted(set(have) - set(missing)):
                message = f"{kind} {have[name]} has no matching {'label' if kind == 'image' else 'image'} in {where}"
                if not self.skip_bad:
                    raise ValueError(message)
                logging.warning("%s", message)
                self.problems.append(message)
        return [Sample(images[n], labels[n], n) for n in sorted(set(images) & set(labels))]


def files_by_stem(folder, extensions, suffix=""):
    """{name: path} of the files under `folder` (recursively) ending in `suffix` + one of `extensions`;
    the name is the path relative to `folder` minus that ending.

    Raises:
      FileNotFoundError if `folder` does not exist; ValueError naming both files if two share a
      name (x.png and x.jpg): outputs and labels are paired by name, so one would be dropped.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: {folder}")
    found = {}
    for dirpath, _, filenames in sorted(os.walk(folder)):
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext.lower() in extensions and stem.endswith(suffix) and not filename.startswith("."):
                relative = os.path.relpath(os.path.join(dirpath, stem[:len(stem) - len(suffix)]), folder)
                name, path = relative.replace(os.sep, "/"), os.path.join(dirpath, filename)
                if name in found:
                    raise ValueError(f"{found[name]} and {path} have the same name without their extension; "
                                     f"rename one of them (files are paired and written by that name)")
                found[name] = path
    return found
