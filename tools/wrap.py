"""Makes a run folder of your own Keras segmentation model, so that every other tool takes it.

  python -m tools.wrap --model=USER.keras --positions=stage_a,stage_b,stage_c --output_dir=RUN

The model is a functional Keras model saved with model.save("USER.keras"): images [B, H, W, 3]
RGB 0..255 -> logits [B, h, w, classes]. The positions are names of its layers whose outputs exit
heads may read; every path from the image to the last one must cross each of them (a skip may run
from a position to the layers after the last). Then train the exits from the run:

  python -m tools.train --stage=stage2 --init_from=RUN --dataset=... --data_dir=... --output_dir=RUN2

and calibrate, profile, search, export and segment RUN2 as for a built-in network.
"""
from absl import flags

import mess_cli
from mess_tf import checkpoints

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Your model, saved as .keras (loaded in Keras' safe mode).", required=True)
flags.DEFINE_list("positions", None, "Layer names of its candidate exit positions.", required=True)
flags.DEFINE_string("output_dir", None, "Run folder to write.", required=True)
flags.DEFINE_list("class_names", None, "Class names for the exported metadata (default class_<i>).")


def main(argv):
    del argv
    net = checkpoints.wrap_run(FLAGS.model, FLAGS.positions, FLAGS.output_dir, FLAGS.class_names)
    print(f"wrote {FLAGS.output_dir}: {net.backbone.model.name}, input {net.backbone.input_size[0]}x"
          f"{net.backbone.input_size[1]}, {net.config.num_classes} classes")
    for p in net.backbone.positions:
        print(f"  position {p.name}: stride {p.stride}, {p.channels} channels, {p.cumulative_macs / 1e6:.1f}M MACs")


if __name__ == "__main__":
    mess_cli.run(main)
