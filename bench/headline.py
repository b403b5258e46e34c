"""The headline benchmark: the `make demo` table and the training ablation, from one run.

Runs (or reuses) the demo pipeline in RUN_DIR, whose evaluation step measures every exported model
side by side (models take turns image by image on the test split, host LiteRT, 1 thread), then
the training ablation on the same run (bench/training_ablation.py).

  python bench/headline.py [--run_dir=runs/demo] [--preset=default]

Prints the demo's summary.md followed by the ablation table and writes bench/results/headline.{md,json}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import training_ablation  # noqa: E402
from mess_tf import experiment, io_utils  # noqa: E402
from tools import cli  # noqa: E402

FLAGS = flags.FLAGS  # --run_dir, --preset and --results_dir are training_ablation's flags


def main(argv):
    del argv
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=lambda line: print(line, flush=True))
    rows = exp.run()
    ablation_rows, ablation_markdown = training_ablation.ablation(exp)
    with open(exp.path("report", "summary.md")) as f:  # the demo's own report: table, notes, training
        markdown = f"{f.read()}\n{ablation_markdown}"
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "headline.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, "headline.json"),
                        {"preset": FLAGS.preset, "headline": rows, "training_ablation": ablation_rows})


if __name__ == "__main__":
    cli.run(main)
