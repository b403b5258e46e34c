"""The evaluation CLI against the official Cityscapes scripts, on generated Cityscapes-format files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mess_tf import visualize
from mess_tf.data import cityscapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = (("frankfurt", "000000_000294"), ("frankfurt", "000001_000538"), ("lindau", "000010_000019"))


def _cityscapes_case(root, seed=0, height=32, width=64):
    """A val split of random labelId maps and noisy trainId predictions; some classes never occur.
    Returns (prediction folder, labelId prediction files, ground-truth files) for the reference."""
    rng = np.random.default_rng(seed)
    to_label_id = cityscapes.train_id_to_label_id()
    present = rng.choice(34, 20, replace=False)  # some trainIds are absent from truth and predictions
    train_ids = cityscapes.INFO.label_map("_gtFine_labelIds.png")
    pred_dir, pred_files, gt_files = os.path.join(root, "pred"), [], []
    for city, frame in FRAMES:
        stem = f"{city}_{frame}"
        raw = present[rng.integers(0, len(present), (height // 8, width // 8))].repeat(8, 0).repeat(8, 1)
        raw = raw.astype(np.uint8)
        gt_file = os.path.join(root, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png")
        visualize.save_png(gt_file, raw)
        visualize.save_png(os.path.join(root, "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png"),
                           rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        truth = train_ids[raw]
        pred = np.where(truth == 255, rng.integers(0, 19, truth.shape), truth).astype(np.uint8)
        wrong = rng.random(truth.shape) < 0.3
        pred[wrong] = rng.choice(np.unique(truth[truth < 255]), wrong.sum())
        visualize.save_png(os.path.join(pred_dir, stem + ".png"), pred)
        label_id_file = os.path.join(root, "pred_label_ids", stem + ".png")
        visualize.save_png(label_id_file, to_label_id[pred])
        pred_files.append(label_id_file)
        gt_files.append(gt_file)
    return pred_dir, pred_files, gt_files


def _evaluate_cli(*flags):
    return subprocess.run([sys.executable, "-m", "tools.evaluate", *flags], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_cli_matches_cityscapes_scripts_exactly(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as reference
    pred_dir, pred_files, gt_files = _cityscapes_case(str(tmp_path))
    run = _evaluate_cli("--dataset=cityscapes", f"--data_dir={tmp_path}", "--split=val", f"--predictions={pred_dir}")
    assert run.returncode == 0, run.stderr
    ours = json.loads(run.stdout)

    args = reference.args
    args.evalInstLevelScore = False  # needs instanceIds files; pixel-level IoU only
    args.evalPixelAccuracy = False  # its np.in1d path is gone in numpy >= 2.4; accuracy is checked below
    args.JSONOutput = False
    args.quiet = True
    official = reference.evaluateImgLists(pred_files, gt_files, args)

    assert ours["images"] == 3
    # Per-class IoUs agree bit for bit; the mean may differ in the last bit (numpy's summation order).
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], rel=1e-12, abs=0)
    absent = [name for name, iou in ours["per_class_iou"].items() if iou is None]
    assert absent  # the case exercises the "absent from both" rule
    assert all(np.isnan(iou) for name, iou in official["classScores"].items() if name not in ours["per_class_iou"])
    for name in ours["per_class_iou"]:
        iou = official["classScores"][name]
        assert (ours["per_class_iou"][name] is None) == np.isnan(iou), name
        if not np.isnan(iou):
            assert ours["per_class_iou"][name] == iou, name
    confusion = np.array(official["confMatrix"])  # rows: true labelId, columns: predicted labelId
    assert ours["pixel_accuracy"] == pytest.approx(
        np.trace(confusion) / confusion[[label_id for _, label_id, _ in cityscapes.CLASSES]].sum(), rel=1e-12)


def test_cli_errors_name_the_missing_prediction(tmp_path):
    pred_dir, _, _ = _cityscapes_case(str(tmp_path))
    os.remove(os.path.join(pred_dir, "lindau_000010_000019.png"))
    run = _evaluate_cli("--dataset=cityscapes", f"--data_dir={tmp_path}", "--split=val", f"--predictions={pred_dir}",
                        "--format=table")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == f"error: prediction not found: {os.path.join(pred_dir, 'lindau_000010_000019.png')}"


def test_a_label_that_does_not_fit_its_image_is_blamed_not_the_prediction(tmp_path):
    from mess_tf.data import evaluation, registry
    pred_dir, _, gt_files = _cityscapes_case(str(tmp_path))
    visualize.save_png(gt_files[1], np.zeros((16, 64), np.uint8))  # cut in half: the prediction is right
    dataset = registry.get_dataset("cityscapes", str(tmp_path))
    with pytest.raises(ValueError,
                       match=rf"^label {gt_files[1]} is 16x64 pixels; its image .*_leftImg8bit.png is 32x64$"):
        evaluation.evaluate_predictions(dataset, "val", pred_dir)
