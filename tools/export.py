"""Exports a deployment configuration of a trained network as a staged .tflite (+ metadata JSON).

  python -m tools.export --checkpoint=RUN_DIR --config=CONFIG.json --precision=int8 \
      --calibration_data=CALIB_IMAGES_DIR --output=model.tflite
  python -m tools.export --random_weights --config=CONFIG.json --precision=float32 --output=model.tflite

Writes MODEL.tflite (one signature per stage) and MODEL.tflite.json beside it.
"""
import os

from absl import flags

import mess_cli
from mess_tf import checkpoints, deployment, export, network, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training run directory or checkpoint prefix.")
flags.DEFINE_bool("random_weights", False, "Build the network from the config's `network` dict with random "
                  "weights instead of loading a checkpoint (tests, latency experiments).")
flags.DEFINE_string("config", None, "Deployment configuration (CONFIG.json written by tools.search).", required=True)
flags.DEFINE_enum("precision", "int8", export.PRECISIONS, "TFLite precision.")
flags.DEFINE_enum("integer_io", "int8", export.INTEGER_IO, "int8: the type of the tensors at the signature "
                  "boundaries; uint8 for runtimes without int8 tensors (LiteRT.js, the web page).")
flags.DEFINE_string("calibration_data", None, "int8: folder of calibration images (the calibration split).")
flags.DEFINE_integer("max_calibration_images", 200, "int8: use at most this many calibration images.")
flags.DEFINE_list("class_names", None, "Class names for the metadata (default: from the run config, else class_<i>).")
flags.DEFINE_string("output", None, "Output .tflite path.", required=True)


def load_network(config):
    """The trained network (--checkpoint) or a random-weight one from the config (--random_weights)."""
    if FLAGS.random_weights == bool(FLAGS.checkpoint):
        raise ValueError("give exactly one of --checkpoint and --random_weights")
    if FLAGS.checkpoint:
        return checkpoints.load_network(FLAGS.checkpoint)
    if not config.network:
        raise ValueError(f"--random_weights: {FLAGS.config} has no `network` entry to build the network from")
    exits = [e.exit_id for e in config.exits]
    return network.build(network.config_from_dict(config.network), exits), {}


def main(argv):
    del argv
    config = deployment.DeploymentConfig.load(FLAGS.config)
    net, run_config = load_network(config)
    calibration = None
    if FLAGS.precision == "int8":
        if not FLAGS.calibration_data:
            raise ValueError("--precision=int8 needs --calibration_data (a folder of calibration-split images)")
        images = runtime.read_images(FLAGS.calibration_data, net.backbone.input_size)
        calibration = [image for _, image in images[:FLAGS.max_calibration_images]]
    class_names = FLAGS.class_names or run_config.get("class_names")
    # The policy the configuration was searched under travels in its metadata (export.policy_of).
    metadata = export.export_staged_model(FLAGS.output, net, config, FLAGS.precision, calibration,
                                          class_names=class_names, integer_io=FLAGS.integer_io)
    print(f"wrote {FLAGS.output} ({os.path.getsize(FLAGS.output)} bytes, {FLAGS.precision}) "
          f"and {export.metadata_path(FLAGS.output)}")
    for stage in metadata["stages"]:
        print(f"  {stage['signature']}: exit {stage['exit_id']}, th_pix={stage['th_pix']}, th_img={stage['th_img']}")


if __name__ == "__main__":
    mess_cli.run(main)
