"""Training ablation on the demo: does two-stage MESS training beat the naive alternatives?

It builds on a `make demo` run (running its data and training steps first if they are missing),
so every variant uses the demo's network, data and recipe, and the demo's own runs are reused:
  * baseline: the single-exit network (the demo's);
  * baseline, same budget: the baseline trained on for the MESS network's extra steps, so the
    comparison with MESS's final exit is not a comparison of training budgets;
  * stage 1 only: the demo's stage 1 (light exits, one per step, backbone trained);
  * two-stage: the demo's stage 2 (frozen backbone, every candidate exit, distillation);
  * two-stage, no distillation: stage 2 again without the distillation term;
  * naive joint: the same exits trained end to end with the backbone, from the baseline, for
    stage 1 + stage 2 steps.
It reports validation mIoU of the final exit and of one head at each exit position, the optimiser
steps each variant has seen (from scratch) and its training throughput.

  python bench/training_ablation.py [--run_dir=runs/demo] [--preset=default]

Writes bench/results/training_ablation.{md,json}; the extra runs go to RUN_DIR/ablation/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mess_tf import checkpoints, experiment, io_utils, report, training  # noqa: E402
from mess_tf.data import pipeline  # noqa: E402
from tools import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "The demo run to build on (its missing training steps are run).")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The demo preset of that run.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")


def train_variants(exp):
    """Trains the variants the demo does not have; returns name -> (run folder, steps from scratch)."""
    p = exp.preset
    extra = p.stage1_steps + p.stage2_steps
    exits = dict(positions=exp.exit_positions(), heads=p.exit_heads)
    exp.train("ablation/baseline_same_budget", "baseline", extra, init_from=exp.path("baseline"))
    exp.train("ablation/stage2_no_distillation", "stage2", p.stage2_steps, init_from=exp.path("stage1"),
              distillation=False, **exits)
    exp.train("ablation/joint", "joint", extra, init_from=exp.path("baseline"), **exits)
    return {"baseline": ("baseline", p.baseline_steps),
            "baseline, same budget": ("ablation/baseline_same_budget", p.baseline_steps + extra),
            "stage 1 only": ("stage1", p.baseline_steps + p.stage1_steps),
            "two-stage": ("stage2", p.baseline_steps + extra),
            "two-stage, no distillation": ("ablation/stage2_no_distillation", p.baseline_steps + extra),
            "naive joint": ("ablation/joint", p.baseline_steps + extra)}


def ablation(exp):
    """Trains the missing variants and scores them all on the validation split.

    Returns:
      (rows: list of dicts, markdown: str)
    """
    variants = train_variants(exp)
    dataset, config = exp.dataset(), exp.network_config()
    val = pipeline.eval_dataset(dataset.samples("val"), dataset.info, config.input_size, exp.preset.batch_size,
                                multiple_of=16)
    positions, compared = exp.exit_positions(), exp.preset.exit_heads[-1]
    rows = []
    for name, (folder, steps) in variants.items():
        net, _ = checkpoints.load_network(exp.path(folder))
        miou = training.evaluate(net.model, val, dataset.info.num_classes)
        metrics = io_utils.read_json(exp.path(folder, training.METRICS), "training metrics")
        row = {"variant": name, "steps": steps, "images_per_s": metrics["images_per_s"], "final": miou["final"]}
        for position in positions:  # stage 1 only has its light heads
            row[f"exit@{position}"] = miou.get(f"{position}:{compared}", miou.get(f"{position}:{training.LIGHT_EXIT_HEAD}"))
        rows.append(row)
        exp.progress(f"  {name}: final {row['final']:.4f}")
    columns = list(rows[0])
    table = report.markdown_table(rows, columns, {c: ".4f" for c in columns[3:]} | {"images_per_s": ".1f"})
    p = exp.preset
    markdown = (f"## Training ablation (demo {p.data}: MobileNetV2 a={p.alpha} OS16 DeepLabV3+, batch {p.batch_size})\n\n"
                f"Validation mIoU (fractions). Exits: head {compared} at each position (stage 1 only: its light "
                f"head {training.LIGHT_EXIT_HEAD}). Steps: optimiser steps from scratch; every MESS variant starts "
                f"from the {p.baseline_steps}-step baseline. images/s: median training throughput.\n\n{table}\n")
    return rows, markdown


def main(argv):
    del argv
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=lambda line: print(line, flush=True))
    exp.run(until="stage2")
    rows, markdown = ablation(exp)
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "training_ablation.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, "training_ablation.json"),
                        {"rows": rows, "positions": exp.exit_positions(), "compared_head": exp.preset.exit_heads[-1],
                         "preset": FLAGS.preset})


if __name__ == "__main__":
    cli.run(main)
