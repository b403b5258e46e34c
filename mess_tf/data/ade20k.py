"""ADE20K SceneParsing (ADEChallengeData2016): images/{training,validation}/*.jpg and
annotations/{training,validation}/*.png. Label 0 ("other") is ignored; 1..150 become classes 0..149.
"""
import os

import numpy as np

from mess_tf.data import dataset
from mess_tf.data import info as info_lib

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def _label_map():
    lookup = np.full(256, info_lib.INVALID, np.int16)
    lookup[0] = info_lib.IGNORE_LABEL
    lookup[1:len(CLASS_NAMES) + 1] = np.arange(len(CLASS_NAMES))
    lookup[info_lib.IGNORE_LABEL] = info_lib.IGNORE_LABEL
    return lookup


# Display colours: the VOC colour map of indices 1..150 (black stays free for ignored pixels).
INFO = info_lib.DatasetInfo("ade20k", CLASS_NAMES, info_lib.bitmap_palette(len(CLASS_NAMES) + 1)[1:],
                            (("", _label_map()),))


class ADE20KDataset(dataset.Dataset):
    """Reader of ADEChallengeData2016 (pass that folder as the root)."""

    info = INFO

    def own_splits(self):
        return tuple(SPLIT_FOLDERS)

    def _folders(self, split):
        return (os.path.join(self.root, "images", SPLIT_FOLDERS[split]),
                os.path.join(self.root, "annotations", SPLIT_FOLDERS[split]))

    def location(self, split):
        return " / ".join(self._folders(split))

    def _list(self, split):
        image_dir, label_dir = self._folders(split)
        return self._pair(dataset.files_by_stem(image_dir, (".jpg", ".jpeg", ".png")),
                          dataset.files_by_stem(label_dir, (".png",)), self.location(split))
