"""Training ablation on the demo: does two-stage MESS training beat the naive alternatives?

It builds on a `make demo` run (running its data and training steps first if they are missing) and
trains the variants it lacks (see mess_tf/ablation.py): baseline, baseline with the same budget,
stage 1 only, two-stage, two-stage without distillation, naive joint. Each is scored on the
validation split (the final exit and one head at each exit position).

  python bench/training_ablation.py [--run_dir=runs/demo] [--preset=default]

Writes bench/results/training_ablation.{md,json}; the extra runs go to RUN_DIR/ablation/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import mess_cli  # noqa: E402
from mess_tf import ablation, experiment, io_utils, provenance  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "The demo run to build on (its missing training steps are run).")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The demo preset of that run.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")


def main(argv):
    del argv
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=lambda line: print(line, flush=True))
    exp.run(until="stage2")
    rows, markdown = ablation.ablation(exp)
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "training_ablation.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, "training_ablation.json"),
                        {"rows": rows, "positions": exp.exit_positions(), "compared_head": exp.preset.exit_heads[-1],
                         "preset": FLAGS.preset,
                         "measured": provenance.measured_on()})


if __name__ == "__main__":
    mess_cli.run(main)
