"""Does a cheaper class map keep mIoU? The argmax at a coarser resolution, upsampled by the app.

An exit's class map is its logits resized bilinearly to the input size, then their argmax: at
384x384 and 11 classes that is 1.6M logits per image, a large part of a shallow exit's cost. With
`class_map_stride` s the model resizes to input / s and takes the argmax there; the app upsamples
the class indices by nearest neighbour (on a phone, on its GPU). This measures, on a demo run's
test split:
  * the mIoU of the baseline's final exit and of every MESS exit at each stride (float network:
    the change comes from the resolution, not the precision), against stride 1;
  * the int8 LiteRT latency of a class map at every exit position and of the final head (which
    ends at its class map) at each stride, timed taking turns, plus the app's upsampling in numpy.

  python bench/class_map.py [--run_dir=runs/demo] [--preset=default] [--strides=1,2,4,8]

Writes bench/results/class_map.{md,json}.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import mess_cli  # noqa: E402
from mess_tf import calibration, checkpoints, experiment, export, io_utils, policy, provenance, report, search  # noqa: E402
from mess_tf.costs import model as cost_model  # noqa: E402
from mess_tf.deployment import DeploymentConfig, ExitChoice  # noqa: E402
from mess_tf.latency import host, table  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "A finished demo run.")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The demo preset of that run.")
flags.DEFINE_list("strides", ["1", "2", "4", "8"], "class_map_stride values to compare.")
flags.DEFINE_integer("num_runs", 100, "Timed runs per part.", lower_bound=1)
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")


def exit_mious(exp, stage, stride, names, images, labels):
    """{exit id | "final": test mIoU %} of a float network whose class maps use `stride`."""
    net = exp.load(stage)
    batches = ((images[i:i + 8], labels[i:i + 8]) for i in range(0, len(images), 8))
    cache = calibration.calibrate_network(net, checkpoints.resolve_checkpoint(exp.path(stage)), batches, names,
                                          experiment.TH_PIX_GRID, policy.PolicyConfig(class_map_stride=stride))
    macs = cost_model.costs_of(net).cost_table()  # any cost table: only the mIoU is read
    mious = {"final": search.evaluate(cache, macs, DeploymentConfig("budgeted")).miou}
    for eid in net.exit_ids:
        position, head = eid.rsplit(":", 1)
        mious[eid] = search.evaluate(cache, macs, DeploymentConfig("budgeted", [ExitChoice(position, head)])).miou
    return {k: 100 * v for k, v in mious.items()}


def class_map_latency(exp, strides, images):
    """{part: {stride: median ms}} of the int8 class maps at each exit position and the final head."""
    net = exp.load("stage2")
    exits = list(export.class_map_exits(net, net.exit_ids).values())
    positions = export.segment_positions(net, exits)
    calls = {}
    for stride in strides:
        parts = export.convert_parts(net, "int8", list(images[:exp.preset.quantization_images]), exit_ids=exits,
                                     policy_config=policy.PolicyConfig(class_map_stride=stride), positions=positions)
        for key, model in parts.items():
            if table.parse_part_key(key)[0] in (table.CLASS_MAP, table.FINAL_HEAD):
                calls[(key, stride)] = host.signature_calls(model)
        size = export.class_map_size(net.backbone.input_size, policy.PolicyConfig(class_map_stride=stride))
        low_res = np.zeros((1, *size), np.uint8)
        calls[("app upsampling (numpy)", stride)] = (
            lambda low_res=low_res, s=stride: export.upsample_class_map(low_res, s))
        exp.progress(f"  converted the class maps at stride {stride}")
    samples = host.alternate(calls, host.HostTimingConfig(num_threads=1, warmup_runs=5, num_runs=FLAGS.num_runs))
    out = {}
    for (key, stride), runs in samples.items():
        out.setdefault(key, {})[stride] = float(np.median(runs))
    return out


def main(argv):
    del argv
    started = time.time()
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=lambda line: print(line, flush=True))
    exp.run()
    strides = [int(s) for s in FLAGS.strides]
    names, images, labels = exp.split_arrays("test")
    miou = {stage: {s: exit_mious(exp, stage, s, names, images, labels) for s in strides}
            for stage in ("baseline_same_budget", "stage2")}
    latency = class_map_latency(exp, strides, images)
    rows = []
    for stage, by_stride in miou.items():
        for eid in by_stride[strides[0]]:
            row = {"network": "baseline" if stage != "stage2" else "MESS", "exit": eid}
            row.update({f"mIoU s={s}": by_stride[s][eid] for s in strides})
            row.update({f"drop s={s} (pp)": by_stride[strides[0]][eid] - by_stride[s][eid] for s in strides[1:]})
            rows.append(row)
    latency_rows = [{"part": key, **{f"ms s={s}": ms for s, ms in by_stride.items()}}
                    for key, by_stride in latency.items()]
    markdown = (f"## Class maps at a coarser resolution (test split, {len(images)} images)\n\nmIoU in % of the float "
                f"networks with each class_map_stride s, and the drop against s={strides[0]}:\n\n"
                + report.markdown_table(rows, list(rows[0]),
                                        {c: ".2f" for c in rows[0] if c not in ("network", "exit")})
                + "\n\nint8 LiteRT latency (median ms, 1 thread, taking turns) of each class-map part and of the final "
                  "head, which ends at its class map; and the app's nearest-neighbour upsampling in numpy:\n\n"
                + report.markdown_table(latency_rows, list(latency_rows[0]),
                                        {c: ".3f" for c in latency_rows[0] if c != "part"})
                + f"\n\n({time.time() - started:.0f} s)\n")
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "class_map.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, "class_map.json"),
                        {"miou": rows, "latency_ms": latency_rows, "measured": provenance.measured_on()})


if __name__ == "__main__":
    mess_cli.run(main)
