"""Scoring a folder of prediction PNGs against a dataset split (what tools/evaluate.py runs)."""
import math
import os

from mess_tf import metrics
from mess_tf.data import files


def prediction_path(predictions_dir, sample):
    """Where the prediction of `sample` is expected: <predictions_dir>/<sample name>.png."""
    return os.path.join(predictions_dir, sample.name + ".png")


def evaluate_predictions(dataset, split, predictions_dir):
    """Scores predictions (uint8 PNGs of class indices, at each label's full size) on one split.

    Returns a dict: miou (mean over classes present in prediction or truth), per_class_iou
    {class name: IoU, or None where the class is absent from both}, pixel_accuracy, images.
    Raises FileNotFoundError for a missing prediction and ValueError for a wrong size or value (a label
    that does not fit its image is named as the culprit, before its prediction is read).
    """
    if not os.path.isdir(predictions_dir):
        raise FileNotFoundError(f"predictions folder not found: {predictions_dir}")
    samples = dataset.samples(split)
    matrix = metrics.ConfusionMatrix(dataset.info.num_classes, dataset.info.ignore_label)
    for sample in samples:
        label = files.load_label(sample.label_path, dataset.info)
        width, height = files.image_size(sample.image_path)
        if label.shape != (height, width):  # the label is wrong, whatever the prediction is
            raise ValueError(f"label {sample.label_path} is {label.shape[0]}x{label.shape[1]} pixels; its image "
                             f"{sample.image_path} is {height}x{width}")
        matrix.update(files.load_prediction(prediction_path(predictions_dir, sample), dataset.info.num_classes,
                                            label.shape), label)
    return {"miou": matrix.miou(), "pixel_accuracy": matrix.pixel_accuracy(), "images": len(samples),
            "per_class_iou": {name: None if math.isnan(iou) else float(iou)
                              for name, iou in zip(dataset.info.class_names, matrix.per_class_iou())}}
