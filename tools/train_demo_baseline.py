"""Trains the demo's DeepLab once and ships it in trained/: the network MESS converts in `make demo`.

  python -m tools.train_demo_baseline [--preset=default] [--out=runs/demo_baseline]

MESS starts from a segmentation network that has learned its task. On a 2-core CPU the default
preset's EfficientNet-Lite0 DeepLabV3+ needs hours for that (minutes on a GPU), longer than
`make demo` may take, so this trains it, and the same network trained on for as many steps as
stage 1 and stage 2 add (the fair comparison for MESS), and writes both, with their training
record and validation curve, to trained/<name>/. Interrupted, it resumes from its checkpoints.
The run folder is locked while it runs: a second training into the same --out is refused.
"""
import time

from absl import flags

import mess_cli
from mess_tf import experiment, run_lock

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "Demo preset whose baseline to train.")
flags.DEFINE_string("out", "runs/demo_baseline", "Run folder for the training runs.")
flags.DEFINE_integer("seed", 0, "Seed for data, weights and schedules.")


def main(argv):
    del argv
    start = time.time()
    exp = experiment.Experiment(FLAGS.out, FLAGS.preset, FLAGS.seed,
                                lambda line: print(f"[{time.time() - start:6.0f} s] {line}", flush=True))
    with run_lock.hold(FLAGS.out):
        records = exp.train_shipped()
    for name, record in records.items():
        print(f"{name}: {record['train']['steps']} steps, val mIoU {100 * record['val_miou']:.2f}, "
              f"test mIoU {100 * record['test_miou']:.2f}")


if __name__ == "__main__":
    mess_cli.run(main)
