"""The generic layout for users' own data (the built-in demo dataset uses it too).

  DIR/classes.txt                     one class per line, index = line number: `name` or `name R G B`
  DIR/images/<split>/<name>.png|.jpg  RGB images (nested folders allowed; the name keeps them)
  DIR/labels/<split>/<name>.png       uint8 class indices 0..C-1 (mode L or a palette PNG), 255 = ignore

The splits are the sub-folders of images/. Without a `calibration` folder, the calibration split is
carved off train (see dataset.py).
"""
import os

import numpy as np

from mess_tf import io_utils
from mess_tf.data import dataset
from mess_tf.data import info as info_lib

CLASSES_FILE = "classes.txt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def read_classes(path, name="folder"):
    """Reads a classes file into a DatasetInfo (colours from the file, else the VOC colour map)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classes file not found: {path} (one class name per line, optionally `name R G B`)")
    names, colours = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (1, 4) or (len(fields) == 4 and not all(v.isdigit() and int(v) < 256
                                                                         for v in fields[1:])):
                raise ValueError(f"{path}:{number}: expected `name` or `name R G B` (0..255), got {line.strip()!r}")
            names.append(fields[0])
            colours.append([int(v) for v in fields[1:]])
    if not 0 < len(names) < info_lib.IGNORE_LABEL:
        raise ValueError(f"{path}: {len(names)} classes; expected 1..{info_lib.IGNORE_LABEL - 1}")
    if any(colours) and not all(colours):
        raise ValueError(f"{path}: give a colour for every class or for none")
    palette = np.array(colours, np.uint8) if all(colours) else info_lib.bitmap_palette(len(names))
    return info_lib.DatasetInfo(name, names, palette, (("", info_lib.identity_map(len(names))),))


def write_classes(path, info):
    """Writes `info`'s class names and palette as a classes file (the inverse of read_classes)."""
    with io_utils.atomic_open(path) as f:
        for name, (r, g, b) in zip(info.class_names, info.palette):
            f.write(f"{name} {r} {g} {b}\n")


class FolderDataset(dataset.Dataset):
    """Reader of the generic layout above."""

    def __init__(self, root, name="folder", **kwargs):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{name} dataset folder not found: {root}")
        self.info = read_classes(os.path.join(root, CLASSES_FILE), name)
        super().__init__(root, **kwargs)
        images = os.path.join(root, "images")
        if not os.path.isdir(images):
            raise FileNotFoundError(f"folder not found: {images} (expected images/<split>/ and labels/<split>/)")
        self._splits = tuple(sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d))))
        if not self._splits:
            raise ValueError(f"{images} has no split folders (expected e.g. images/train/, images/val/)")

    def own_splits(self):
        return self._splits

    def _folders(self, split):
        return os.path.join(self.root, "images", split), os.path.join(self.root, "labels", split)

    def location(self, split):
        return " / ".join(self._folders(split))

    def _list(self, split):
        image_dir, label_dir = self._folders(split)
        return self._pair(dataset.files_by_stem(image_dir, IMAGE_EXTENSIONS),
                          dataset.files_by_stem(label_dir, (".png",)), self.location(split))
