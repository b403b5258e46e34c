"""The headline benchmark: the `make demo` report, the training ablation, and whether a third exit pays.

Runs (or reuses) the demo pipeline in RUN_DIR, whose evaluation step measures every exported model
side by side (models take turns image by image on the test split, int8 LiteRT, 1 thread), then:
  * the training ablation on the same run (mess_tf/ablation.py);
  * a third exit: the best configuration with up to 3 early exits found within --time_limit_s,
    against the exact optimum with up to 2, for both searched objectives, on the run's int8
    calibration cache and latency table.

  python bench/headline.py [--preset=default|things] [--run_dir=runs/demo] [--time_limit_s=120] [--noablation]

Prints the demo's summary.md followed by the other tables and writes bench/results/headline.{md,json}
(headline_<preset>.{md,json} for another preset: `--preset=things`, in runs/things, the digit
scenes, MESS's hard case).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import mess_cli  # noqa: E402
from mess_tf import ablation, experiment, io_utils, provenance, report, search  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "The demo run to build on (its missing steps are run); default runs/demo for "
                    "the default preset, runs/<preset> for the others.")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The demo preset of that run.")
flags.DEFINE_bool("ablation", True, "Also train and score the training ablation (about an hour on 2 cores for the "
                  "scenes: a naive joint run as long as stages 1 and 2).")
flags.DEFINE_integer("time_limit_s", 120, "Seconds the 3-exit search may take per objective.", lower_bound=1)
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")


def third_exit(exp, time_limit_s):
    """Rows comparing the exact 2-exit optimum with the best 3-exit configuration found in time."""
    cache, costs = exp.cache(), exp.cost_table()
    objectives = {"no_loss (min ms)": exp.requirement("no_loss"),
                  "baseline_cost (max mIoU)": exp.requirement("baseline_cost")}
    rows = []
    for name, (objective, kwargs) in objectives.items():
        for exits, limit in ((2, None), (3, time_limit_s)):
            outcome = search.search(cache, costs, experiment.TH_IMG_GRID, objective, mode="dynamic",
                                    max_exits=exits, time_limit_s=limit, **kwargs)
            best = outcome.best
            rows.append({"objective": name, "max_exits": exits, "exact_up_to": outcome.exact_exits,
                         "seconds": outcome.seconds, "exits": " + ".join(best.exit_ids[:-1]) or "final only",
                         "miou_predicted": 100 * best.miou, "ms_predicted": best.expected_cost})
            exp.progress(f"  {name}, up to {exits} exits: {rows[-1]['exits']}, {rows[-1]['miou_predicted']:.2f}%, "
                         f"{best.expected_cost:.2f} ms ({outcome.seconds:.0f} s)")
    table = report.markdown_table(rows, list(rows[0]), {"seconds": ".0f", "miou_predicted": ".2f",
                                                        "ms_predicted": ".2f"})
    return rows, (f"## Does a third exit pay?\n\nOn the int8 calibration cache and latency table: the exact optimum "
                  f"with up to 2 early exits against the best found with up to 3 in {time_limit_s} s "
                  f"(`exact_up_to`: the depth the search finished).\n\n{table}\n")


def main(argv):
    del argv
    exp = experiment.Experiment(FLAGS.run_dir or experiment.default_run_dir(FLAGS.preset), FLAGS.preset,
                                progress=lambda line: print(line, flush=True))
    headline = exp.run()
    third_rows, third_markdown = third_exit(exp, FLAGS.time_limit_s)
    ablation_rows, ablation_markdown = ablation.ablation(exp) if FLAGS.ablation else ([], "")
    with open(exp.path("report", "summary.md")) as f:  # the demo's own report: tables, goals, ceiling
        markdown = f"{f.read()}\n{third_markdown}\n{ablation_markdown}"
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    name = "headline" if FLAGS.preset == "default" else f"headline_{FLAGS.preset}"
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, f"{name}.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, f"{name}.json"),
                        {"preset": FLAGS.preset, "headline": headline, "third_exit": third_rows,
                         "training_ablation": ablation_rows,
                         "measured": provenance.measured_on()})


if __name__ == "__main__":
    mess_cli.run(main)
