"""Training ablation on the demo dataset: does two-stage MESS training beat the naive alternatives?

Every variant gets the same budget of optimiser steps (stage 1 + stage 2 split it in half):
  * baseline: the single-exit network;
  * two-stage: stage 1 (light exits, one per step) then stage 2 (frozen backbone, all exits);
  * two-stage without distillation in stage 2;
  * naive joint: the same exits trained end to end with the backbone.
It reports validation mIoU of the final exit and of exits at ~25/50/75% of the backbone's MACs,
and the training throughput of stage 2 with every candidate exit against stage 1.

  python bench/training_ablation.py [--steps=200] [--work_dir=/tmp/mess_ablation]

Writes bench/results/training_ablation.{md,json}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mess_tf import backbones, heads, io_utils, network, report, training  # noqa: E402
from mess_tf.data import demo, pipeline, registry  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75)
COMPARED_HEAD = "fcn_w64_b1"
CANDIDATE_HEADS = ("fcn_w32_b0", COMPARED_HEAD, "aspp_w64")

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 200, "Optimiser steps per variant (stage 1 and stage 2 get half each).")
flags.DEFINE_integer("batch_size", 8, "Batch size.")
flags.DEFINE_integer("throughput_steps", 6, "Steps timed for the throughput comparison.")
flags.DEFINE_list("throughput_heads", list(CANDIDATE_HEADS),
                  "Heads at every position for the stage-2 throughput run ('all' = the default head space; "
                  "~140 exits on MobileNetV2, too slow to build on a 2-core host).")
flags.DEFINE_string("work_dir", "/tmp/mess_training_ablation", "Demo data and run directories.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")



def _network_config(num_classes, size):
    return network.NetworkConfig(backbone=backbones.BackboneConfig("mobilenet_v2", output_stride=16, alpha=0.35),
                                 num_classes=num_classes, input_size=(size, size),
                                 final_head=heads.FinalHeadConfig("deeplabv3", filters=64, separable=True))


def _run(name, net_config, train_data, val_data, init_from=None, **config):
    run_dir = os.path.join(FLAGS.work_dir, "runs", name)
    config = training.TrainConfig(batch_size=FLAGS.batch_size, learning_rate=0.05, log_every=25,
                                  checkpoint_every=10 ** 6, eval_batches=0, **config)
    print(f"== {name}: {config.stage}, {config.steps} steps", flush=True)
    result = training.train(net_config, config, train_data, run_dir, init_from=init_from)
    miou = training.evaluate(result.network.model, val_data, net_config.num_classes)
    print(f"   {result.metrics['images_per_s']:.1f} img/s, mIoU final {miou['final']:.4f}", flush=True)
    return result, miou


def main(argv):
    del argv
    data_dir = demo.generate(os.path.join(FLAGS.work_dir, "demo_quick"), "quick")
    dataset = registry.get_dataset("demo", data_dir)
    size = demo.PRESETS["quick"].image_size
    net_config = _network_config(dataset.info.num_classes, size)
    train_data = pipeline.train_dataset(dataset.samples("train"), dataset.info, (size, size), FLAGS.batch_size,
                                        seed=0, multiple_of=16)
    val_data = pipeline.eval_dataset(dataset.samples("val"), dataset.info, (size, size), FLAGS.batch_size,
                                     multiple_of=16)
    backbone = backbones.Backbone(net_config.backbone, net_config.input_size)
    positions = training.positions_at_fractions(backbone, FRACTIONS)
    total_macs = backbone.positions[-1].cumulative_macs
    fractions = {p.name: p.cumulative_macs / total_macs for p in backbone.positions}
    compared = [f"{p}:{COMPARED_HEAD}" for p in positions]
    candidates = [f"{p}:{h}" for p in positions for h in CANDIDATE_HEADS]
    half = FLAGS.steps // 2

    results = {}
    results["baseline"] = _run("baseline", net_config, train_data, val_data, stage="baseline", steps=FLAGS.steps)
    stage1 = _run("stage1", net_config, train_data, val_data, stage="stage1", steps=half, positions=positions)
    results["stage1 only"] = stage1
    for name, distillation in (("two-stage", True), ("two-stage, no distillation", False)):
        results[name] = _run(name, net_config, train_data, val_data, init_from=stage1[0].run_dir, stage="stage2",
                             steps=FLAGS.steps - half, exits=candidates, distillation=distillation)
    results["naive joint"] = _run("naive joint", net_config, train_data, val_data, stage="joint",
                                  steps=FLAGS.steps, exits=candidates)

    rows = []
    for name, (result, miou) in results.items():
        row = {"variant": name, "steps": half if name == "stage1 only" else FLAGS.steps, "final": miou["final"]}
        for p, eid in zip(positions, compared):
            row[f"exit@{fractions[p]:.0%}"] = miou.get(eid, miou.get(f"{p}:{training.LIGHT_EXIT_HEAD}"))
        rows.append(row)

    throughput = {}
    for name, stage, exits, init_from in (
            ("stage1", "stage1", [f"{p}:{training.LIGHT_EXIT_HEAD}" for p in positions], None),
            ("stage2, every position", "stage2", (), stage1[0].run_dir)):
        head_ids = () if FLAGS.throughput_heads == ["all"] or stage == "stage1" else FLAGS.throughput_heads
        result = training.train(net_config, training.TrainConfig(
            stage=stage, steps=FLAGS.throughput_steps, batch_size=FLAGS.batch_size, exits=exits, heads=head_ids,
            log_every=FLAGS.throughput_steps // 2, checkpoint_every=10 ** 6, eval_batches=0),
            train_data, os.path.join(FLAGS.work_dir, "runs", f"throughput {name}"),
            init_from=init_from)
        throughput[name] = {"exits": len(result.network.exit_ids), "images_per_s": result.metrics["images_per_s"]}
        print(f"== throughput {name}: {throughput[name]}", flush=True)

    columns = ["variant", "steps", "final"] + [k for k in rows[0] if k.startswith("exit@")]
    table = report.markdown_table(rows, columns, {c: ".4f" for c in columns[2:]})
    speed = "\n".join(f"| {k} | {v['exits']} | {v['images_per_s']:.1f} |" for k, v in throughput.items())
    markdown = (f"# Training ablation (demo quick, MobileNetV2 a=0.35, {size}x{size}, batch {FLAGS.batch_size})\n\n"
                f"Validation mIoU; compared exits use head {COMPARED_HEAD} (stage 1 only: its light head); "
                f"\"stage1 only\" spends half the steps.\n\n{table}\n\n"
                f"| training | early exits | images/s |\n|---|---|---|\n{speed}\n")
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "training_ablation.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, "training_ablation.json"),
                        {"rows": rows, "throughput": throughput, "positions": positions,
                         "macs_fraction": {p: fractions[p] for p in positions}, "compared_head": COMPARED_HEAD})


if __name__ == "__main__":
    app.run(main)
