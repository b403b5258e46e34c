"""How long dropping the training iterator takes, with tf.data autotuning on and off.

A training stage ends by dropping its iterator over the endless training stream. With tf.data's
autotuning on, that sometimes blocked for many seconds (after the demo's stage 1: 15-17 s in about
half the runs, the main thread waiting in ~RootDataset::Iterator for a tf.data thread), so
mess_tf/data/pipeline.py turns autotuning off. This benchmark reproduces it outside the trainer: it
reads the demo's training stream (quick preset data, batch 8) while a matmul stands in for the
training step, for --seconds, then deletes the iterator and times that; --trials times per setting,
the settings taking turns. It also times the stream alone (no workload), to show what autotuning
would buy in throughput here.

    python bench/iterator_teardown.py [--seconds=30 --trials=3]

Prints a table, writes bench/results/iterator_teardown.json, and prints, last, a JSON line with,
per setting, the worst teardown seconds and the trials whose teardown took over STALL_S.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mess_tf import provenance  # noqa: E402
from mess_tf.data import demo, pipeline, registry  # noqa: E402
from mess_tf.io_utils import write_json  # noqa: E402

SETTINGS = {"autotune on": True, "autotune off (library)": False}
BATCH = 8
STALL_S = 1.0  # a teardown slower than this is a stall (an unblocked one takes milliseconds)


def stream(data_dir, autotune):
    """The library's training stream over the demo data, with autotuning set as asked."""
    dataset = registry.get_dataset("demo", data_dir)
    size = (demo.PRESETS["quick"].image_size,) * 2
    batches = pipeline.train_dataset(dataset.samples("train"), dataset.info, size, BATCH, seed=0,
                                     scale_range=(0.75, 1.25), flip=False)
    options = tf.data.Options()
    options.autotune.enabled = autotune
    return batches.with_options(options)


def trial(data_dir, autotune, seconds, workload):
    """Reads batches (each followed by `workload`) for `seconds`, then deletes the iterator.

    Returns:
      (batches read, seconds spent reading, seconds the deletion took).
    """
    iterator = iter(tf.distribute.get_strategy().experimental_distribute_dataset(stream(data_dir, autotune)))
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        workload(next(iterator))
        count += 1
    reading = time.perf_counter() - start
    start = time.perf_counter()
    del iterator
    return count, reading, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="Reading time per trial.")
    parser.add_argument("--trials", type=int, default=3, help="Trials per setting.")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "iterator_teardown.json"))
    args = parser.parse_args()
    weights = tf.random.stateless_normal((1500, 1500), seed=(0, 0))
    # Stands in for a training step: about as long per batch as the demo's.
    train_step = tf.function(lambda batch: tf.reduce_sum(tf.matmul(weights, weights)) + tf.reduce_sum(batch[0]))
    rows = {name: {"setting": name, "teardown_s": [], "read_s": [], "batches": []} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as data_dir:
        demo.generate(data_dir, preset="quick", seed=0)
        for name, autotune in SETTINGS.items():  # the stream alone: batches per second
            count, reading, _ = trial(data_dir, autotune, 5.0, lambda batch: None)
            rows[name]["stream_batches_per_s"] = count / reading
        for t in range(args.trials):
            for name, autotune in SETTINGS.items():
                count, reading, teardown = trial(data_dir, autotune, args.seconds, train_step)
                rows[name]["teardown_s"].append(teardown)
                rows[name]["read_s"].append(reading)
                rows[name]["batches"].append(count)
                print(f"trial {t + 1} {name}: {count} batches in {reading:.1f} s, teardown {teardown:.2f} s",
                      flush=True)
    for row in rows.values():
        row["stalls"] = int(np.sum(np.array(row["teardown_s"]) > STALL_S))
        row["median_teardown_s"] = float(np.median(row["teardown_s"]))
        row["max_teardown_s"] = float(np.max(row["teardown_s"]))
        row["max_read_overrun_s"] = float(np.max(row["read_s"]) - args.seconds)  # one batch stuck mid-read
    write_json(args.output, {"seconds": args.seconds, "trials": args.trials, "batch": BATCH,
                             "tensorflow": tf.__version__, "rows": list(rows.values()),
                             "measured": provenance.measured_on()})
    print(f"\n| setting | stalls (> {STALL_S:g} s) | teardown median s | teardown max s | read overrun max s | "
          "stream alone batches/s |")
    print("|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['setting']} | {r['stalls']}/{args.trials} | {r['median_teardown_s']:.2f} | "
              f"{r['max_teardown_s']:.2f} | {r['max_read_overrun_s']:.2f} | {r['stream_batches_per_s']:.0f} |")
    print(f"\nwrote {args.output}")
    print(json.dumps({name: {"stalls": r["stalls"], "trials": args.trials, "max_teardown_s": r["max_teardown_s"]}
                      for name, r in rows.items()}))


if __name__ == "__main__":
    main()
