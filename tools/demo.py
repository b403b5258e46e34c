"""The main job: the whole MESS pipeline on the built-in demo data (what `make demo` runs).

  python -m tools.demo [--preset=default|things|quick] [--out=runs/demo] [--seed=0]

Generates the demo dataset (default: the scenes; things: the digit scenes), takes the trained
baseline (shipped in trained/ for those two presets, trained here for the others), trains the MESS
network (stage 1, stage 2), calibrates in the precision that ships (int8) and in float, profiles
every part with LiteRT on this host, searches one configuration per requirement, exports staged
int8 models, runs them on the test split side by side and writes a report folder.
A rerun skips the steps already finished; an interrupted step resumes from its checkpoints.
The run folder is locked while it runs: a second demo into the same --out is refused.
"""
import time

from absl import flags

import mess_cli
from mess_tf import experiment, run_lock

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS),
                  "default: the scenes; things: the digit scenes (MESS's hard case); quick: ~minutes, for tests.")
flags.DEFINE_string("out", None, "Run folder; the report goes to OUT/report (default: runs/demo for the default "
                    "preset, runs/<preset> for the others).")
flags.DEFINE_integer("seed", 0, "Seed for data, weights and schedules.")


def main(argv):
    del argv
    start = time.time()

    def progress(line):
        print(f"[{time.time() - start:6.0f} s] {line}", flush=True)

    exp = experiment.Experiment(FLAGS.out or experiment.default_run_dir(FLAGS.preset), FLAGS.preset, FLAGS.seed,
                                progress)
    with run_lock.hold(exp.out):
        exp.run()
    with open(exp.path("report", "summary.md")) as f:
        print("\n" + f.read())
    print(f"report: {exp.path('report')}/ ({time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    mess_cli.run(main)
