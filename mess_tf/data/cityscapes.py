"""Cityscapes (fine annotations): leftImg8bit/<split>/<city>/*_leftImg8bit.png and
gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (preferred when present) or *_gtFine_labelIds.png.

labelIds are mapped to the 19 evaluation classes (trainIds) of the official cityscapesScripts;
every other id (void, ignoreInEval classes such as 'guard rail', and 255) becomes 255.
"""
import os

import numpy as np

from mess_tf.data import dataset
from mess_tf.data import info as info_lib

# (trainId name, labelId, RGB) of the 19 evaluation classes, in trainId order (cityscapesScripts labels.py).
CLASSES = (
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)), ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)), ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)), ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)), ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
)
NUM_LABEL_IDS = 34  # labelIds 0..33; 255 also appears (license plates are id -1, stored as 255)
SPLITS = ("train", "val", "test")
LABEL_TRAIN_IDS = "_gtFine_labelTrainIds.png"
LABEL_IDS = "_gtFine_labelIds.png"
IMAGE_SUFFIX = "_leftImg8bit"


def _label_ids_map():
    lookup = np.full(256, info_lib.INVALID, np.int16)
    lookup[:NUM_LABEL_IDS] = info_lib.IGNORE_LABEL
    lookup[info_lib.IGNORE_LABEL] = info_lib.IGNORE_LABEL
    for train_id, (_, label_id, _) in enumerate(CLASSES):
        lookup[label_id] = train_id
    return lookup


INFO = info_lib.DatasetInfo(
    "cityscapes", [name for name, _, _ in CLASSES], [rgb for _, _, rgb in CLASSES],
    ((LABEL_TRAIN_IDS, info_lib.identity_map(len(CLASSES))), (LABEL_IDS, _label_ids_map())))


def train_id_to_label_id():
    """uint8 [19]: the labelId of each trainId (to write predictions the official scripts read)."""
    return np.array([label_id for _, label_id, _ in CLASSES], np.uint8)


class CityscapesDataset(dataset.Dataset):
    """Reader of the Cityscapes fine-annotation layout."""

    info = INFO

    def own_splits(self):
        return SPLITS

    def _folders(self, split):
        return os.path.join(self.root, "leftImg8bit", split), os.path.join(self.root, "gtFine", split)

    def location(self, split):
        return " / ".join(self._folders(split))

    def _list(self, split):
        image_dir, label_dir = self._folders(split)
        images = dataset.files_by_stem(image_dir, (".png",), IMAGE_SUFFIX)
        labels = dataset.files_by_stem(label_dir, (".png",), LABEL_IDS[:-4])
        labels.update(dataset.files_by_stem(label_dir, (".png",), LABEL_TRAIN_IDS[:-4]))
        return self._pair({_basename(n): p for n, p in images.items()},
                          {_basename(n): p for n, p in labels.items()}, self.location(split))


def _basename(name):
    """'aachen/aachen_000000_000019' -> 'aachen_000000_000019' (the city is part of the file name)."""
    return name.rsplit("/", 1)[-1]
