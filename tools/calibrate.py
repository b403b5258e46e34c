"""Builds the calibration cache the deployment search reads: one pass of every candidate exit.

  python -m tools.calibrate --checkpoint=runs/demo/stage2 --dataset=demo --data_dir=runs/demo/data \
      --split=calibration --precision=int8 --output=runs/demo/calibration.npz

Calibrate in the precision you export: --precision=int8 converts every part of the network to
int8 TFLite (quantised on the first --quantization_images images of the split) and runs them
chained as the staged model runs, so the cache holds the decisions and class maps of the model
that ships; float32 (the default) runs the Keras network, which an int8 model can differ from by
a point of mIoU or more.

Resumable: partial results are saved beside the output every --checkpoint_every images, and a
rerun continues from them. The cache records the network config and a fingerprint of the
checkpoint; the search refuses a cache that does not match. The exit policy (--confidence,
--edge_smoothing, --confidence_stride, --class_map_stride) must be the latency table's too: give tools.profile the same
flags (the search refuses a table timed under another policy).
"""
import time

import numpy as np
from absl import flags

import mess_cli
from mess_tf import calibration, checkpoints, export
from mess_tf.data import pipeline, registry
from tools import policy_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Stage-2 run directory or checkpoint.", required=True)
flags.DEFINE_enum("dataset", "demo", registry.DATASETS, "Dataset reader.")
flags.DEFINE_string("data_dir", None, "Dataset root.", required=True)
flags.DEFINE_string("split", "calibration", "Split to calibrate on (never the test split).")
flags.DEFINE_integer("th_pix_steps", 10, "Pixel thresholds on the grid (evenly spaced in [0.5, 0.95]).")
flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.DEFINE_integer("checkpoint_every", 64, "Save partial results every N images.")
flags.DEFINE_enum("precision", "float32", ["float32", "int8"], "Run the Keras network (float32) or its converted "
                  "int8 TFLite parts, as the exported int8 model computes.")
flags.DEFINE_integer("quantization_images", 16, "int8: images of the split the parts are quantised on.", lower_bound=1)
flags.DEFINE_string("output", None, "Output cache (.npz).", required=True)


def main(argv):
    del argv
    if FLAGS.split == "test":
        raise ValueError("--split=test: thresholds must never be tuned on the test split; use calibration or val")
    net, _ = checkpoints.load_network(FLAGS.checkpoint)
    dataset = registry.get_dataset(FLAGS.dataset, FLAGS.data_dir)
    samples = dataset.samples(FLAGS.split)
    config = policy_flags.policy_config()
    grid = np.linspace(0.5, 0.95, FLAGS.th_pix_steps)
    start = time.time()
    common = dict(dataset=FLAGS.dataset, split=FLAGS.split, partial_path=FLAGS.output + ".partial.npz",
                  checkpoint_every=FLAGS.checkpoint_every)
    checkpoint, names = checkpoints.resolve_checkpoint(FLAGS.checkpoint), [s.name for s in samples]
    batches = pipeline.eval_batches(samples, dataset.info, net.backbone.input_size, FLAGS.batch_size)
    if FLAGS.precision == "int8":
        # The images the parts are quantised on, fitted to the input size as the batches are.
        images, _ = next(pipeline.eval_batches(samples[:FLAGS.quantization_images], dataset.info,
                                               net.backbone.input_size, FLAGS.quantization_images))
        positions = export.segment_positions(net, net.exit_ids)
        print(f"converting the parts to int8 (quantised on {len(images)} images) ...", flush=True)
        parts = export.convert_parts(net, "int8", list(images), policy_config=config, positions=positions,
                                     th_pix_grid=grid)
        cache = calibration.calibrate_parts(net, parts, checkpoint, batches, names, grid, config, positions=positions,
                                            **common)
    else:
        cache = calibration.calibrate_network(net, checkpoint, batches, names, grid, config, **common)
    cache.save(FLAGS.output)
    print(f"wrote {FLAGS.output}: {cache.num_images} images x {len(cache.exit_ids)} exits, "
          f"{len(grid)} pixel thresholds, in {time.time() - start:.0f} s")


if __name__ == "__main__":
    mess_cli.run(main)
