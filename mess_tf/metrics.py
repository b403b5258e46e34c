"""Segmentation metrics from a streaming confusion matrix: mIoU, per-class IoU, pixel accuracy.

Definitions (identical to the official cityscapesScripts evaluation):
  - pixels whose true label is the ignore label (255) are not counted at all;
  - IoU_c = TP_c / (TP_c + FP_c + FN_c) over the counted pixels;
  - a class absent from both prediction and truth (TP + FP + FN = 0) has no IoU (NaN) and is left
    out of the mean, so mIoU is the mean over the classes that occur;
  - pixel accuracy = correctly labelled pixels / counted pixels.
"""
import numpy as np


def miou_from_counts(tp, fp, fn):
    """Mean IoU from per-class pixel counts.

    Args:
      tp, fp, fn: arrays [..., C] of true-positive, false-positive and false-negative pixel counts.

    Returns:
      float array [...] (a Python float for 1-D input): the mean over classes with TP+FP+FN > 0;
      NaN where no class occurs.
    """
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    union = tp + fp + fn
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(union), where=present)
    count = present.sum(-1)
    miou = np.divide(iou.sum(-1), count, out=np.full(count.shape, np.nan), where=count > 0)
    return float(miou) if miou.ndim == 0 else miou


class ConfusionMatrix:
    """Streaming confusion matrix: rows = true class, columns = predicted class (int64 pixel counts)."""

    def __init__(self, num_classes, ignore_label=255):
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred, label):
        """Adds one prediction. pred, label: int arrays of the same shape (any rank); pred in
        0..C-1, label in 0..C-1 or ignore_label."""
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
        counted = label != self.ignore_label
        pred, label = pred[counted].astype(np.int64), label[counted].astype(np.int64)
        for what, values in (("label", label), ("prediction", pred)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(f"{what} values must be class indices 0..{self.num_classes - 1} "
                                 f"(or {self.ignore_label} in labels); got {np.unique(values)[:10].tolist()}")
        self.matrix += np.bincount(label * self.num_classes + pred,
                                   minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)
        return self

    def merge(self, other):
        """Adds another matrix's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def counts(self):
        """Per-class (tp, fp, fn), each int64 [C]."""
        tp = np.diag(self.matrix)
        return tp, self.matrix.sum(0) - tp, self.matrix.sum(1) - tp

    def per_class_iou(self):
        """float64 [C]: IoU per class, NaN for classes absent from both prediction and truth."""
        tp, fp, fn = self.counts()
        union = (tp + fp + fn).astype(np.float64)
        return np.divide(tp, union, out=np.full(self.num_classes, np.nan), where=union > 0)

    def miou(self):
        """Mean IoU over the classes that occur (float; NaN before any counted pixel)."""
        return miou_from_counts(*self.counts())

    def pixel_accuracy(self):
        """Correct pixels / counted pixels (float; NaN before any counted pixel)."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")
