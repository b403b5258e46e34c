"""The training ablation: does two-stage MESS training beat the naive alternatives, on the demo?

Every variant uses an Experiment's network, data and recipe, and reuses the runs the experiment
already has:
  * baseline: the single-exit network (the demo's);
  * baseline, same budget: the baseline trained on for the MESS network's extra steps (the demo's
    `baseline_same_budget`), so the comparison with MESS's final exit is not one of training budgets;
  * stage 1 only: the demo's stage 1 (light exits, one per step, backbone trained);
  * two-stage: the demo's stage 2 (frozen backbone, every candidate exit, distillation);
  * two-stage, no distillation: stage 2 again without the distillation term;
  * naive joint: the same exits trained end to end with the backbone, from the baseline, for
    stage 1 + stage 2 steps.
Each is scored on the validation split: the final exit and one head at each exit position.
"""
from mess_tf import checkpoints, io_utils, report, training
from mess_tf.data import pipeline


def train_variants(exp):
    """Trains the variants the demo does not have; returns name -> (run folder, steps from scratch)."""
    p = exp.preset
    extra = exp.same_budget_steps()
    exits = dict(positions=exp.exit_positions(), heads=p.exit_heads)
    exp.train("ablation/stage2_no_distillation", "stage2", p.stage2_steps, init_from=exp.path("stage1"),
              learning_rate=p.stage2_learning_rate, distillation=False, stored_views=p.stored_views,
              loss_stride=p.stage2_loss_stride, **exits)
    exp.train("ablation/joint", "joint", extra, init_from=exp.path("baseline"), **exits)
    return {"baseline": ("baseline", p.baseline_steps),
            "baseline, same budget": ("baseline_same_budget", p.baseline_steps + extra),
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
                                multiple_of=config.backbone.output_stride)
    positions, compared = exp.exit_positions(), exp.preset.exit_heads[-1]
    rows = []
    for name, (folder, steps) in variants.items():
        net, _ = checkpoints.load_network(exp.path(folder))
        miou = training.evaluate(net.model, val, dataset.info.num_classes)
        metrics = io_utils.read_json(exp.path(folder, training.METRICS), "training metrics")
        row = {"variant": name, "steps": steps, "images_per_s": metrics["images_per_s"], "final": miou["final"]}
        for position in positions:  # stage 1 only has its light heads
            row[f"exit@{position}"] = miou.get(f"{position}:{compared}",
                                               miou.get(f"{position}:{training.LIGHT_EXIT_HEAD}"))
        rows.append(row)
        exp.progress(f"  {name}: final {row['final']:.4f}")
    columns = list(rows[0])
    table = report.markdown_table(rows, columns, {c: ".4f" for c in columns[3:]} | {"images_per_s": ".1f"})
    p = exp.preset
    markdown = (f"## Training ablation (demo {p.data}: {p.backbone.name}"
                f"{' ImageNet-pretrained' if p.backbone.weights else ' from scratch'} OS{p.backbone.output_stride} "
                f"{p.final_head.kind}, batch {p.batch_size})\n\n"
                f"Validation mIoU (fractions). Exits: head {compared} at each position (stage 1 only: its light "
                f"head {training.LIGHT_EXIT_HEAD}). Steps: optimiser steps in all; every MESS variant starts "
                f"from the {p.baseline_steps}-step baseline. images/s: median training throughput.\n\n{table}\n")
    return rows, markdown
