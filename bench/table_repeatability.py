"""How well a host latency table's relative part costs repeat: parts timed one after another vs
taking turns.

The search compares parts with each other (this exit's head against that segment), so what a
table must get right is the parts' relative costs. A shared machine drifts while a table is timed;
timed one after another, each part sees another moment of that drift. This benchmark times the
same parts into several tables with each method, the methods taking turns table by table:

  * "one after another": each part timed in one go (HostTimingConfig.block_runs = num_runs), as
    host.measure_parts did before;
  * "in turns": blocks of --block_runs runs (default 5, as HostTimingConfig), the parts taking
    turns.

For every pair of tables of one method it takes each part's log ratio between the two, removes the
pair's median (the machine being faster or slower overall), and reports the median and the largest
deviation left, as percentages: how far one part's cost moves against the others between two runs.
The parts are those of the latency studies' reference network (mess_tf.latency.reference:
MobileNetV2, 3 exits, int8, random weights), timed by host.measure_parts itself.

    python bench/table_repeatability.py [--alpha=0.5 --input_size=160 --tables=6 --num_runs=50 --block_runs=5]

Prints a table, writes bench/results/table_repeatability.json, and prints, last, a JSON line with
each method's `median_deviation` and `max_deviation` (fractions, medians over the pairs of tables).
"""
import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mess_tf import export, provenance, report  # noqa: E402
from mess_tf.io_utils import write_json  # noqa: E402
from mess_tf.latency import host, reference  # noqa: E402
from mess_tf.latency import table as table_lib  # noqa: E402


def deviations(first, second, keys):
    """(median, max) |log ratio - its median| over `keys` between two tables' medians."""
    ratio = np.log([first.get(k).median_ms / second.get(k).median_ms for k in keys])
    spread = np.abs(ratio - np.median(ratio))
    return float(np.median(spread)), float(spread.max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.5, help="MobileNetV2 width multiplier.")
    parser.add_argument("--input_size", type=int, default=160, help="Square input size (pixels).")
    parser.add_argument("--tables", type=int, default=6, help="Tables timed per method.")
    parser.add_argument("--num_runs", type=int, default=50, help="Timed runs per part.")
    parser.add_argument("--block_runs", type=int, default=host.HostTimingConfig.block_runs,
                        help="In turns: timed runs in a row per part and turn.")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                          "table_repeatability.json"))
    args = parser.parse_args()
    size = (args.input_size,) * 2
    net, _, _ = reference.mess_network("mobilenet_v2", args.alpha, size)
    parts = export.convert_parts(net, reference.DEPLOYED, reference.random_images(reference.CALIBRATION_IMAGES, size))
    key = table_lib.TableKey(host.host_device(), reference.DEPLOYED, 1, size)
    positions = [p.name for p in net.backbone.positions]
    methods = {"one after another": args.num_runs, "in turns": args.block_runs}
    tables = {name: [] for name in methods}
    seconds = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as folder:
        for t, (name, block) in itertools.product(range(args.tables), methods.items()):
            config = host.HostTimingConfig(num_runs=args.num_runs, block_runs=block)
            start = time.perf_counter()
            path = os.path.join(folder, f"{block}_{t}.json")
            tables[name].append(host.measure_parts(parts, path, key, positions, config))
            seconds[name].append(time.perf_counter() - start)
    rows = []
    for name, timed in tables.items():
        pairs = [deviations(a, b, list(parts)) for a, b in itertools.combinations(timed, 2)]
        rows.append({"method": name, "block_runs": methods[name],
                     "median_deviation": float(np.median([p[0] for p in pairs])),
                     "max_deviation": float(np.median([p[1] for p in pairs])),
                     "worst_pair_max_deviation": float(max(p[1] for p in pairs)),
                     "seconds_per_table": float(np.median(seconds[name]))})
    write_json(args.output, {"network": net.config.to_dict(), "parts": len(parts), "precision": reference.DEPLOYED,
                             "tables": args.tables, "num_runs": args.num_runs, "device": host.host_device(),
                             "runtime": host.runtime_version(), "rows": rows,
                             "measured": provenance.measured_on()})
    print(report.markdown_section(
        f"{len(parts)} parts of MobileNetV2 {args.alpha} at {size[0]}x{size[1]}, {reference.DEPLOYED}, "
        f"{args.tables} tables per method, pairs of tables compared",
        ["method", "median deviation %", "max deviation % (median pair)", "max % (worst pair)", "s per table"],
        [(r["method"], f"{100 * r['median_deviation']:.2f}", f"{100 * r['max_deviation']:.2f}",
          f"{100 * r['worst_pair_max_deviation']:.2f}", f"{r['seconds_per_table']:.1f}")
         for r in rows]))
    print(f"\nwrote {args.output}")
    print(json.dumps({r["method"]: {k: r[k] for k in ("median_deviation", "max_deviation")} for r in rows}))


if __name__ == "__main__":
    main()
