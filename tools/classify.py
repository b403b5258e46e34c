"""Classifies a photo with a backbone's ImageNet classifier: checks that pretrained weights are right.

  python -m tools.classify --backbone=efficientnet_lite0 --weights=imagenet --image=PATH --top=5 --format=json

prints {"top": [{"index": i, "probability": p}, ...]} (ImageNet class indices, most probable first).
"""
import json

import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

import mess_cli
from mess_tf import backbones

FLAGS = flags.FLAGS
flags.DEFINE_enum("backbone", "efficientnet_lite0", backbones.BACKBONES, "Backbone network.")
flags.DEFINE_string("weights", backbones.IMAGENET, "'imagenet', or a local .h5 weights file of the classifier.")
flags.DEFINE_string("image", None, "Photo to classify (any format PIL reads).", required=True)
flags.DEFINE_integer("top", 5, "Classes to print.", lower_bound=1)
flags.DEFINE_float("alpha", 1.0, "Width multiplier (MobileNets).")
flags.DEFINE_enum("format", "table", ["json", "table"], "Output format.")


def read_photo(path):
    """uint8 [H, W, 3] RGB, or a ValueError naming the file."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--image: no such file: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image: {path} is not an image PIL can read ({e})") from None


def main(argv):
    del argv
    photo = read_photo(FLAGS.image)
    config = backbones.BackboneConfig(FLAGS.backbone, 32, FLAGS.alpha, weights=FLAGS.weights)
    top = backbones.classify(backbones.classifier(config), photo, FLAGS.top)
    if FLAGS.format == "json":
        print(json.dumps({"top": [{"index": i, "probability": p} for i, p in top]}))
    else:
        print("\n".join(f"{i:>4}  {p:.4f}" for i, p in top))


if __name__ == "__main__":
    mess_cli.run(main)
