"""Stage 2 on stored views against the direct path: throughput, memory, and the exits' curves.

Stage 2 freezes the backbone and the final head, so their outputs depend only on the augmented
image. The direct path runs them at every step; the stored path runs them once over K views of
every training image and trains the heads on the stored outputs (mess_tf/stored_views.py). On a
demo run's stage-1 network this measures:
  * where a stage-2 step's time goes, each part alone (the models taking turns, median ms per batch):
    the input pipeline (decode, scale, crop), the frozen pass, reading a stored batch, the heads'
    forward and backward with the losses, and the losses alone at full resolution with distillation;
  * both paths trained for --steps from the same stage-1 network, each in its own process (for its
    peak memory), one after the other: training images per second (windows without evaluation),
    the frozen pass into the store, each exit's validation mIoU against wall-clock minutes, and the
    minutes to a flat curve (every exit under 1 pp gained over the last 20% of the steps so far).

  python bench/stage2_speed.py [--run_dir=runs/demo] [--preset=default] [--steps=N]

Prints a table; its last line is a JSON object (also written to bench/results/stage2_speed.json)
with images_per_s_stored and images_per_s_direct.
"""
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import mess_cli  # noqa: E402
from mess_tf import checkpoints, experiment, headline, io_utils, network, provenance, report, stored_views, training  # noqa: E402
from mess_tf.deployment import FINAL_EXIT  # noqa: E402

# (name, stored views, loss stride): the direct path and the stored one with full-resolution losses,
# and the stored one with the preset's loss stride (when it is not 1).
WAYS = {"direct": (False, 1), "stored": (True, 1), "stored_loss_stride": (True, None)}

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "A demo run whose stage 1 is done (its missing steps up to stage 1 run).")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The demo preset of that run.")
flags.DEFINE_integer("steps", None, "Stage-2 steps of each path (default: the preset's).", lower_bound=1)
flags.DEFINE_integer("eval_every", None, "Steps between validation evaluations (default: the preset's).")
flags.DEFINE_integer("rounds", 5, "Rounds of the parts' timing; each part runs --runs times per round.")
flags.DEFINE_integer("runs", 5, "Timed calls per part and round.")
flags.DEFINE_enum("way", None, list(WAYS), "Internal: train one path in this process.")
flags.DEFINE_string("out_json", None, "Internal: where --way writes its record.")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")


def train_one_way(exp, way, steps, eval_every):
    """Trains stage 2 one way into <run>/bench_stage2/<way>; returns its record (curve with
    wall-clock minutes, training images/s of windows without evaluation, the fill, peak memory)."""
    p = exp.preset
    stored, loss_stride = WAYS[way]
    records, start = [], time.perf_counter()
    result = exp.train(os.path.join("bench_stage2", way), "stage2", steps, init_from=exp.path("stage1"),
                       eval_every=eval_every, learning_rate=p.stage2_learning_rate, positions=exp.exit_positions(),
                       heads=p.exit_heads, stored_views=p.stored_views if stored else 0,
                       loss_stride=loss_stride or p.stage2_loss_stride,
                       observe=lambda record: records.append((time.perf_counter() - start, record)))
    steps_records = [(t, r) for t, r in records if isinstance(r, training.Progress)]
    fills = [(t, r) for t, r in records if isinstance(r, training.StoreProgress)]
    rates = [r.images_per_s for _, r in steps_records[1:] if not r.miou]  # the first window traces
    return {"way": way, "loss_stride": loss_stride or p.stage2_loss_stride, "steps": steps,
            "minutes": (time.perf_counter() - start) / 60,
            "images_per_s": float(np.median(rates)) if rates else None,
            "fill_minutes": fills[-1][0] / 60 if fills else 0.0, "views": fills[-1][1].views if fills else 0,
            "store_gb": fills[-1][1].bytes / 1e9 if fills else 0.0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "curve": [{"minutes": t / 60, "step": r.step, "miou": {k: 100 * v for k, v in r.miou.items()}}
                      for t, r in steps_records if r.miou],
            "final_miou": {k: 100 * v for k, v in (result.metrics["miou"] or {}).items()}}


def minutes_to_flat(curve):
    """Wall-clock minutes of the first evaluation at which every exit's curve so far gained under
    1 pp over its last 20% of steps; None if it never did."""
    exits = [k for k in curve[0]["miou"] if k != FINAL_EXIT] if curve else []
    for end in range(1, len(curve) + 1):
        gains = [report.tail_gain([(c["step"], c["miou"][e]) for c in curve[:end]]) for e in exits]
        if gains and all(g is not None and g < headline.FLAT_GAIN_PP for g in gains):
            return curve[end - 1]["minutes"]
    return None


def time_parts(exp, rounds, runs):
    """{part: median ms per batch}: the parts of a stage-2 step, each alone, the parts taking turns.
    The network is stage 2's at the crop size, initialised from the run's stage 1 (fresh heads)."""
    config = dataclasses.replace(exp.network_config(), input_size=exp.crop_size())
    net = network.build(config, training.resolve_exits(training.TrainConfig(
        stage="stage2", positions=tuple(exp.exit_positions()), heads=tuple(exp.preset.exit_heads))))
    checkpoints.init_from(net, exp.path("stage1"))
    frozen, heads = training.stage2_models(net, coarse=True)
    batches = iter(exp.train_batches())
    images, labels = next(batches)
    stored = frozen(images, training=False)
    logits = dict(heads(stored, training=False))

    @tf.function
    def frozen_pass(x):
        return frozen(x, training=False)[FINAL_EXIT]

    def heads_step(loss):
        @tf.function
        def step(inputs, y):
            with tf.GradientTape() as tape:
                total, _ = loss(heads(inputs, training=True), y)
            return tape.gradient(total, heads.trainable_variables)[0]
        return step

    def losses_alone(loss):
        @tf.function
        def step(outputs, y):
            with tf.GradientTape() as tape:
                tape.watch(outputs)
                total, _ = loss(outputs, y)
            return tape.gradient(total, outputs)[net.exit_ids[0]]
        return step

    store = stored_views.ViewStore.load(exp.path("bench_stage2", "stored"))
    rng = np.random.default_rng(0)
    parts = {"input pipeline (decode, scale, crop)": lambda: next(batches)[0],
             "frozen pass (backbone + final head)": lambda: frozen_pass(images),
             "read a stored batch (a later, shuffled pass)": lambda: store.batch(
                 int(rng.integers(store.spec.batches + 1, 10 * store.spec.batches)), 0)[1]}
    for stride in sorted({1, exp.preset.stage2_loss_stride}):
        loss = training.stage2_loss(net.exit_ids, config.input_size,
                                    training.TrainConfig(stage="stage2", loss_stride=stride))
        step, alone = heads_step(loss), losses_alone(loss)
        parts[f"exit heads forward + backward, losses at 1/{stride}"] = lambda step=step: step(stored, labels)
        parts[f"the losses alone at 1/{stride} (with distillation), forward + backward"] = (
            lambda alone=alone: alone(logits, labels))
    times = {k: [] for k in parts}
    for fn in parts.values():
        np.asarray(fn())  # trace and warm up
    for _ in range(rounds):
        for name, fn in parts.items():
            start = time.perf_counter()
            for _ in range(runs):
                out = fn()
            np.asarray(out)  # wait for the last call's result
            times[name].append(1000 * (time.perf_counter() - start) / runs)
    return {k: float(np.median(v)) for k, v in times.items()}


def run_way(way):
    """Trains one path in a child process (its own peak memory); returns the child's record."""
    out = os.path.join(FLAGS.run_dir, "bench_stage2", f"{way}.json")
    command = [sys.executable, os.path.abspath(__file__), f"--run_dir={FLAGS.run_dir}", f"--preset={FLAGS.preset}",
               f"--way={way}", f"--out_json={out}"] + [f"--{k}={getattr(FLAGS, k)}" for k in ("steps", "eval_every")
                                                      if getattr(FLAGS, k) is not None]
    subprocess.run(command, check=True)
    return io_utils.read_json(out, f"stage-2 {way} record")


def main(argv):
    del argv
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=lambda line: print(line, flush=True))
    steps = FLAGS.steps or exp.preset.stage2_steps
    eval_every = FLAGS.eval_every or exp.preset.stage2_eval_every or max(steps // 10, 1)
    if FLAGS.way:
        io_utils.write_json(FLAGS.out_json, train_one_way(exp, FLAGS.way, steps, eval_every))
        return
    exp.run(until="stage1")
    ways = [w for w, (_, stride) in WAYS.items() if stride or exp.preset.stage2_loss_stride != 1]
    records = {way: run_way(way) for way in ways}
    parts = time_parts(exp, FLAGS.rounds, FLAGS.runs)
    batch = exp.preset.batch_size
    rows = [{"way": way, "loss stride": r["loss_stride"], "images_per_s": r["images_per_s"],
             "frozen pass into the store, min": r["fill_minutes"],
             "views": r["views"], "store GB": r["store_gb"], "peak memory GB": r["peak_rss_gb"],
             "minutes in all": r["minutes"], "minutes to flat curves": minutes_to_flat(r["curve"]),
             "exits' final val mIoU": ", ".join(f"{v:.1f}" for k, v in r["final_miou"].items() if k != FINAL_EXIT)}
            for way, r in records.items()]
    part_rows = [{"part": k, "ms per batch": v, "images/s alone": 1000 * batch / v} for k, v in parts.items()]
    fastest = ways[-1]  # what the demo runs: stored views, at the preset's loss stride
    ratio = records[fastest]["images_per_s"] / records["direct"]["images_per_s"]
    measured = provenance.measured_on()
    markdown = (f"## Stage 2: stored views against the direct path ({FLAGS.preset} preset, {steps} steps of batch "
                f"{batch}; measured {measured['date']} on {measured['cpu']}, {measured['cpus']} CPUs)\n\n"
                + report.markdown_table(part_rows, list(part_rows[0]), {"ms per batch": ".1f", "images/s alone": ".0f"})
                + "\n\n" + report.markdown_table(rows, list(rows[0]), {c: ".2f" for c in list(rows[0])[2:9]})
                + f"\n\nTraining throughput, {fastest} / direct: {ratio:.2f}x.\n")
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "stage2_speed.md")) as f:
        f.write(markdown)
    summary = {"images_per_s_stored": records[fastest]["images_per_s"],
               "images_per_s_direct": records["direct"]["images_per_s"], "ratio": ratio, "parts_ms": parts,
               "rows": rows, "records": records, "preset": FLAGS.preset, "steps": steps, "measured": measured}
    io_utils.write_json(os.path.join(FLAGS.results_dir, "stage2_speed.json"), summary)
    print(json.dumps({k: summary[k] for k in ("images_per_s_stored", "images_per_s_direct", "ratio")}))


if __name__ == "__main__":
    mess_cli.run(main)
