"""What a dataset is: its classes, colours, ignore value, and how raw label values become class indices.

Every reader returns labels as uint8 class indices 0..num_classes-1, with IGNORE_LABEL (255) for
pixels that no loss or metric may count. Official datasets store other values on disk (Cityscapes
labelIds, ADE20K's 1-based classes), so a DatasetInfo carries one 256-entry lookup table per label
file kind, chosen by the label file's name suffix.
"""
import dataclasses

import numpy as np

IGNORE_LABEL = 255
INVALID = -1  # a lookup entry for a raw value that must never appear in a label file


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image and its label file. `name` is unique within a split and names prediction files."""

    image_path: str
    label_path: str
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Classes, display colours and label decoding of one dataset.

    Attributes:
      name: dataset name ("cityscapes", "voc", ...).
      class_names: tuple of the num_classes class names, index = class id.
      palette: uint8 [num_classes, 3] RGB display colour of each class.
      label_maps: tuple of (file name suffix, int16 [256] lookup); a label file is decoded with the
        first entry whose suffix its path ends with ("" matches every file). Lookup value = class
        index, IGNORE_LABEL, or INVALID for raw values outside the class set.
      ignore_label: the class index of ignored pixels (always 255).
    """

    name: str
    class_names: tuple
    palette: np.ndarray
    label_maps: tuple
    ignore_label: int = IGNORE_LABEL

    def __post_init__(self):
        palette = np.asarray(self.palette, np.uint8)
        if palette.shape != (len(self.class_names), 3):
            raise ValueError(f"{self.name}: palette shape {palette.shape}, expected ({len(self.class_names)}, 3)")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "palette", palette)

    @property
    def num_classes(self):
        return len(self.class_names)

    def label_map(self, path):
        """The int16 [256] lookup that decodes the label file at `path`."""
        for suffix, lookup in self.label_maps:
            if str(path).endswith(suffix):
                return lookup
        raise ValueError(f"{path}: not a {self.name} label file (expected a name ending in one of "
                         f"{[s for s, _ in self.label_maps]})")


def identity_map(num_classes):
    """Lookup for files that already hold class indices: 0..num_classes-1 and 255 (ignore)."""
    lookup = np.full(256, INVALID, np.int16)
    lookup[:num_classes] = np.arange(num_classes)
    lookup[IGNORE_LABEL] = IGNORE_LABEL
    return lookup


def bitmap_palette(num_colors):
    """uint8 [num_colors, 3]: the PASCAL VOC colour map (bits of the index spread over R, G, B).

    VOC's own label PNGs use it; it also gives any dataset distinct, stable display colours.
    """
    palette = np.zeros((num_colors, 3), np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = r, g, b
    return palette
