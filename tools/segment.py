"""Segments images with a staged .tflite model and prints the exit each one took.

  python -m tools.segment --model=model.tflite --dataset=cityscapes --data_dir=/data/cityscapes --split=val \
      --output=OUT_DIR
  python -m tools.segment --model=model.tflite --images=DIR --output=OUT_DIR

With --dataset/--data_dir/--split it reads the same samples as tools.evaluate and writes
OUT_DIR/<sample name>.png, so `tools.evaluate --predictions=OUT_DIR` scores them. With --images it
reads every image under DIR, recursively, and writes OUT_DIR/<relative path>.png.

Each image is letterboxed into the model's input size: scaled with its aspect ratio kept and padded
bottom/right with mid-grey. Its class map is cropped back and resized (nearest neighbour) to the
image's own size. The PNGs are palette PNGs, like PASCAL VOC labels: pixel values are class indices
and viewers show them in the VOC colours.
"""
import os
import sys

import numpy as np
from absl import flags

import mess_cli
from mess_tf import deployment, runtime, visualize
from mess_tf.data import files, info, registry

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Staged .tflite (with MODEL.tflite.json beside it).", required=True)
flags.DEFINE_string("images", None, "Folder of input images, read recursively (instead of --data_dir).")
flags.DEFINE_enum("dataset", "folder", registry.DATASETS, "Dataset reader, with --data_dir.")
flags.DEFINE_string("data_dir", None, "Dataset root: segment the images of --split (instead of --images).")
flags.DEFINE_string("split", "val", "Split to segment, with --data_dir.")
flags.DEFINE_bool("skip_bad", False, "Skip (and name) unreadable image files instead of stopping at the first.")
flags.DEFINE_enum("mode", None, deployment.MODES, "Run mode (default: the mode the model was exported for).")
flags.DEFINE_float("deadline_ms", None, "anytime: return the latest map finished within this many ms.")
flags.DEFINE_list("th_img", None, "dynamic: image thresholds of the early exits (default: the exported ones).")
flags.DEFINE_integer("num_threads", None, "Interpreter threads.")
flags.DEFINE_string("output", None, "Output folder for the PNG class maps.", required=True)


# The PASCAL VOC colour map: viewers show any dataset's class indices in distinct colours.
PALETTE = info.bitmap_palette(256)


def images_to_segment(num_classes):
    """[(output name, image path)] from --images or --data_dir/--dataset/--split."""
    if FLAGS.images is not None:
        return runtime.image_files(FLAGS.images)
    dataset = registry.get_dataset(FLAGS.dataset, FLAGS.data_dir)
    if dataset.info.num_classes != num_classes:
        raise ValueError(f"--model {FLAGS.model} predicts {num_classes} classes; dataset {FLAGS.dataset} at "
                         f"{FLAGS.data_dir} has {dataset.info.num_classes}")
    return [(s.name, s.image_path) for s in dataset.samples(FLAGS.split)]


def check_output_outside_input():
    """Raises if --output is the input folder or lies inside it: its PNGs would replace input
    images (x.png for x.jpg too) or be read as inputs by the next run."""
    flag, source = ("--images", FLAGS.images) if FLAGS.images is not None else ("--data_dir", FLAGS.data_dir)
    output, inside = os.path.realpath(FLAGS.output), os.path.realpath(source)
    if os.path.commonpath([output, inside]) == inside:
        where = "is" if output == inside else "lies inside"
        raise ValueError(f"--output={FLAGS.output} {where} the input folder {flag}={source}: the class maps would "
                         f"overwrite or mix with the images; give an output folder outside it")


def main(argv):
    del argv
    if (FLAGS.images is None) == (FLAGS.data_dir is None):
        raise ValueError("give either --images=DIR or --data_dir (with --dataset and --split)")
    check_output_outside_input()
    th_img = mess_cli.float_list("th_img") if FLAGS.th_img else None
    model = runtime.StagedModel.load(FLAGS.model, FLAGS.num_threads)
    taken, skipped = [], []
    for name, path in images_to_segment(len(model.metadata["classes"])):
        try:
            image = files.load_image(path)
        except ValueError as e:
            if not FLAGS.skip_bad:
                raise ValueError(f"{e} (pass --skip_bad to skip it)") from None
            print(f"skipped: {e}", file=sys.stderr)
            skipped.append(path)
            continue
        result = model.segment(image, mode=FLAGS.mode, th_img=th_img, deadline_ms=FLAGS.deadline_ms)
        visualize.save_png(os.path.join(FLAGS.output, name + ".png"), result.class_map, PALETTE)
        confidences = " ".join(f"{c:.3f}" for c in result.confidences)
        print(f"{name}: exit {result.exit_index} ({result.exit_id}), {result.total_ms:.2f} ms, "
              f"confidences [{confidences}]")
        taken.append(result.exit_index)
    counts = np.bincount(taken, minlength=len(model.exit_ids))
    print(f"{len(taken)} images segmented at {model.input_size[0]}x{model.input_size[1]} (letterboxed), class maps "
          f"at each image's size in {FLAGS.output}" + (f"; {len(skipped)} unreadable skipped" if skipped else ""))
    print("exits taken: " + ", ".join(f"{eid}: {n}" for eid, n in zip(model.exit_ids, counts)))


if __name__ == "__main__":
    mess_cli.run(main)
