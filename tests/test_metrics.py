"""Confusion matrix, mIoU definitions, and the visualisation helpers."""
import io

import numpy as np
import pytest
from PIL import Image

from mess_tf import metrics, visualize


def test_confusion_matrix_by_hand():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])  # class 3 only predicted on an ignored pixel
    matrix = metrics.ConfusionMatrix(5).update(pred, label)
    assert matrix.matrix.sum() == 7  # the ignored pixel is not counted
    iou = matrix.per_class_iou()
    np.testing.assert_allclose(iou[:3], [1 / 3, 3 / 4, 1 / 2])
    assert np.isnan(iou[3]) and np.isnan(iou[4])  # absent from truth and counted predictions
    assert matrix.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert matrix.pixel_accuracy() == pytest.approx(5 / 7)


def test_class_only_predicted_counts_as_zero_iou():
    matrix = metrics.ConfusionMatrix(3).update(np.array([0, 2]), np.array([0, 0]))
    np.testing.assert_allclose(matrix.per_class_iou(), [0.5, np.nan, 0.0])
    assert matrix.miou() == pytest.approx(0.25)


def test_streaming_merge_and_counts_agree():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 6, (4, 16, 16)), rng.integers(0, 6, (4, 16, 16))
    labels[labels == 5] = 255
    whole = metrics.ConfusionMatrix(6).update(preds, labels)
    halves = metrics.ConfusionMatrix(6).update(preds[:2], labels[:2])
    halves.merge(metrics.ConfusionMatrix(6).update(preds[2:], labels[2:]))
    np.testing.assert_array_equal(whole.matrix, halves.matrix)
    assert metrics.miou_from_counts(*whole.counts()) == pytest.approx(whole.miou())
    per_image = np.stack([np.stack(metrics.ConfusionMatrix(6).update(p, l).counts()) for p, l in zip(preds, labels)])
    batch = metrics.miou_from_counts(per_image[:, 0], per_image[:, 1], per_image[:, 2])
    assert batch.shape == (4,)
    assert metrics.miou_from_counts(*per_image.sum(0)) == pytest.approx(whole.miou())
    assert np.isnan(metrics.miou_from_counts([0, 0], [0, 0], [0, 0]))


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match=r"prediction values must be class indices 0..2"):
        metrics.ConfusionMatrix(3).update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        metrics.ConfusionMatrix(3).update(np.zeros(2), np.zeros(3))


def test_colorize_overlay_and_png_round_trip(tmp_path):
    palette = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    label = np.array([[0, 1, 255]])
    np.testing.assert_array_equal(visualize.colorize(label, palette), [[[255, 0, 0], [0, 0, 255], [0, 0, 0]]])
    image = np.full((1, 3, 3), 100, np.uint8)
    np.testing.assert_array_equal(visualize.overlay(image, label, palette, alpha=0.5),
                                  [[[178, 50, 50], [50, 50, 178], [100, 100, 100]]])
    visualize.save_png(tmp_path / "label.png", label.astype(np.uint8), palette)
    loaded = Image.open(tmp_path / "label.png")
    assert loaded.mode == "P" and np.asarray(loaded).tolist() == [[0, 1, 255]]
    rgb = visualize.colorize(label, palette)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(visualize.encode_png(rgb)))), rgb)
    with pytest.raises(ValueError, match="outside the palette's 2 classes"):
        visualize.colorize(np.array([[2]]), palette)
