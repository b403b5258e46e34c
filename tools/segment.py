"""Segments a folder of images with a staged .tflite model and prints the exit each one took.

  python -m tools.segment --model=model.tflite --images=DIR --mode=dynamic --output=OUT_DIR

Writes OUT_DIR/<image>.png: a palette PNG, like PASCAL VOC labels: its pixel values are the class
indices and viewers show them in the VOC colours.
"""
import io
import os

import numpy as np
from absl import flags
from PIL import Image

from mess_tf import deployment, io_utils, runtime
from tools import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Staged .tflite (with MODEL.tflite.json beside it).", required=True)
flags.DEFINE_string("images", None, "Folder of input images.", required=True)
flags.DEFINE_enum("mode", None, deployment.MODES, "Run mode (default: the mode the model was exported for).")
flags.DEFINE_float("deadline_ms", None, "anytime: return the latest map finished within this many ms.")
flags.DEFINE_list("th_img", None, "dynamic: image thresholds of the early exits (default: the exported ones).")
flags.DEFINE_integer("num_threads", None, "Interpreter threads.")
flags.DEFINE_string("output", None, "Output folder for the PNG class maps.", required=True)


def voc_palette():
    """The PASCAL VOC colour map (256 RGB entries), as a flat list for PIL."""
    palette = []
    for index in range(256):
        r = g = b = 0
        for bit in range(8):
            r |= ((index >> 0) & 1) << (7 - bit)
            g |= ((index >> 1) & 1) << (7 - bit)
            b |= ((index >> 2) & 1) << (7 - bit)
            index >>= 3
        palette += [r, g, b]
    return palette


def png_bytes(class_map):
    """A uint8 [H, W] class map as palette-PNG bytes."""
    image = Image.fromarray(class_map.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv):
    del argv
    model = runtime.StagedModel.load(FLAGS.model, FLAGS.num_threads)
    th_img = [float(t) for t in FLAGS.th_img] if FLAGS.th_img else None
    os.makedirs(FLAGS.output, exist_ok=True)
    taken = []
    for name, image in runtime.read_images(FLAGS.images, model.input_size):
        result = model.run(image, FLAGS.mode, th_img=th_img, deadline_ms=FLAGS.deadline_ms)
        stem = os.path.splitext(name)[0]
        io_utils.write_bytes(os.path.join(FLAGS.output, stem + ".png"), png_bytes(result.class_map))
        confidences = " ".join(f"{c:.3f}" for c in result.confidences)
        print(f"{name}: exit {result.exit_index} ({result.exit_id}), {result.total_ms:.2f} ms, "
              f"confidences [{confidences}]")
        taken.append(result.exit_index)
    counts = np.bincount(taken, minlength=len(model.exit_ids))
    print("exits taken: " + ", ".join(f"{eid}: {n}" for eid, n in zip(model.exit_ids, counts)))


if __name__ == "__main__":
    cli.run(main)
