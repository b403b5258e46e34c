"""Scores a folder of prediction PNGs against a dataset split: mIoU, per-class IoU, pixel accuracy.

  python -m tools.evaluate --dataset=cityscapes --data_dir=/data/cityscapes --split=val \
      --predictions=runs/preds --format=json

Predictions are uint8 PNGs of class indices (trainIds for Cityscapes, 0..149 for ADE20K), named
<sample name>.png (e.g. frankfurt_000000_000294.png, 2007_000033.png), at the label's full size.
Classes absent from both prediction and truth are left out of the mean (cityscapesScripts' rule).
"""
import json

from absl import flags

import mess_cli
from mess_tf.data import evaluation, registry

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "folder", registry.DATASETS, "Dataset reader.")
flags.DEFINE_string("data_dir", None, "Dataset root.", required=True)
flags.DEFINE_string("split", "val", "Split to score.")
flags.DEFINE_string("predictions", None, "Folder of prediction PNGs.", required=True)
flags.DEFINE_enum("format", "json", ["json", "table"], "Output: one JSON object, or a readable table.")


def main(argv):
    del argv
    dataset = registry.get_dataset(FLAGS.dataset, FLAGS.data_dir)
    result = evaluation.evaluate_predictions(dataset, FLAGS.split, FLAGS.predictions)
    if FLAGS.format == "json":
        print(json.dumps(result, sort_keys=True))
        return
    print(f"{'class':24s} {'IoU':>7s}")
    for name, iou in result["per_class_iou"].items():
        print(f"{name:24s} {'-' if iou is None else f'{100 * iou:6.2f}':>7s}")
    print(f"{'mIoU':24s} {100 * result['miou']:6.2f}\n{'pixel accuracy':24s} {100 * result['pixel_accuracy']:6.2f}"
          f"\n({result['images']} images of split {FLAGS.split})")


if __name__ == "__main__":
    mess_cli.run(main)
