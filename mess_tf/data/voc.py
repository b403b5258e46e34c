"""PASCAL VOC 2012 segmentation: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNGs whose
pixel values are class indices; 255 marks object borders and is ignored), and the split lists in
ImageSets/Segmentation/<split>.txt.

Optional SBD augmentation (the usual "train_aug" setup): ImageSets/Segmentation/train_aug.txt with
labels in SegmentationClassAug/ (single-channel PNGs of class indices).
"""
import os

from mess_tf.data import dataset
from mess_tf.data import info as info_lib

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
INFO = info_lib.DatasetInfo("voc", CLASS_NAMES, info_lib.bitmap_palette(len(CLASS_NAMES)),
                            (("", info_lib.identity_map(len(CLASS_NAMES))),))
AUGMENTED_SPLIT = "train_aug"


class VOCDataset(dataset.Dataset):
    """Reader of VOC2012 (pass VOC2012/, or a folder holding VOC2012/ or VOCdevkit/VOC2012/)."""

    info = INFO
    training_splits = ("train", "trainval", AUGMENTED_SPLIT)

    def __init__(self, root, **kwargs):
        for candidate in (os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012")):
            if os.path.isdir(candidate):
                root = candidate
        super().__init__(root, **kwargs)
        self.list_dir = os.path.join(root, "ImageSets", "Segmentation")
        if not os.path.isdir(self.list_dir):
            raise FileNotFoundError(f"folder not found: {self.list_dir} (the VOC2012 split lists)")

    def own_splits(self):
        return tuple(sorted(f[:-4] for f in os.listdir(self.list_dir) if f.endswith(".txt")))

    def _label_dir(self, split):
        return os.path.join(self.root, "SegmentationClassAug" if split == AUGMENTED_SPLIT else "SegmentationClass")

    def location(self, split):
        return (f"{os.path.join(self.list_dir, split + '.txt')} "
                f"(JPEGImages / {os.path.basename(self._label_dir(split))})")

    def _list(self, split):
        list_path = os.path.join(self.list_dir, split + ".txt")
        with open(list_path) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        label_dir = self._label_dir(split)
        images = {i: os.path.join(self.root, "JPEGImages", i + ".jpg") for i in ids}
        labels = {i: os.path.join(label_dir, i + ".png") for i in ids}
        for image_id in ids:  # a listed id needs both files; _pair reports the one that is missing
            if not os.path.isfile(images[image_id]):
                del images[image_id]
            if not os.path.isfile(labels[image_id]):
                del labels[image_id]
            if image_id not in images and image_id not in labels:
                message = f"{list_path} lists {image_id!r} but neither its image nor its label exists"
                if not self.skip_bad:
                    raise FileNotFoundError(message)
                self.problems.append(message)
        return self._pair(images, labels, self.location(split))
