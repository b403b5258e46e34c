"""Search the best deployment configuration of a trained MESS network for one device and budget.

  python -m tools.search --cache=CACHE.npz --latency=TABLE.json --objective=max_miou --budget_ms=25 \
      --output_dir=runs/search
  python -m tools.search --cache=CACHE.npz --macs=COSTS.json --objective=min_latency --max_drop_pp=1

Prints the best configurations, writes OUTPUT_DIR/report.json, OUTPUT_DIR/pareto.png (mIoU vs
expected cost, the final exit marked) and OUTPUT_DIR/CONFIG.json (accepted by tools.export).
Large spaces (3 exits over dozens of positions and heads) can take long: progress is printed every
few seconds, and --time_limit_s=S keeps the best found in S seconds, flagged as not proven best.
"""
import math
import os

import numpy as np
from absl import flags

import mess_cli
from mess_tf import calibration, io_utils, progress, report, search
from mess_tf.costs.table import CostTable

FLAGS = flags.FLAGS
flags.DEFINE_string("cache", None, "Calibration cache .npz (tools.calibrate).")
flags.DEFINE_string("latency", None, "Latency table JSON of the target device (ms).")
flags.DEFINE_string("macs", None, 'Cost JSON in MACs: {"unit":"MACs","positions":[...],"segment":{...},'
                                  '"head":{...},"final_head":x} (tools.describe).')
flags.DEFINE_enum("objective", "max_miou", ["max_miou", "min_latency"],
                  "max_miou: best mIoU within --budget_ms/--budget_macs; min_latency: cheapest within --max_drop_pp.")
flags.DEFINE_float("budget_ms", None, "Expected latency budget per image (ms), with --latency.")
flags.DEFINE_float("budget_macs", None, "Expected MACs budget per image, with --macs.")
flags.DEFINE_float("max_drop_pp", None, "Largest mIoU drop from the final exit, in percentage points.")
flags.DEFINE_enum("mode", "dynamic", ["dynamic", "budgeted"], "Deployment mode searched.")
flags.DEFINE_integer("max_exits", 3, "Most early exits in a dynamic configuration (0: the final exit alone).",
                     lower_bound=0)
flags.DEFINE_list("th_img", [f"{t:.2f}" for t in np.linspace(0.5, 0.95, 10)], "Image-confidence thresholds.")
flags.DEFINE_list("exits", None, "Exit ids to consider (default: every exit in the cache).")
flags.DEFINE_string("stat", "median", "Latency statistic of the table: median or p90.")
flags.DEFINE_integer("workers", 2, "Processes sharing the search.")
flags.DEFINE_float("time_limit_s", None, "Stop each of the two searches (objective, Pareto front) after this many "
                   "seconds and keep the best found, flagged as not proven best (default: search everything).")
flags.DEFINE_integer("top", 10, "Pareto configurations printed.")
flags.DEFINE_string("output_dir", None, "Folder for report.json, pareto.png and CONFIG.json.")
flags.mark_flags_as_required(["cache", "output_dir"])


def load_costs(latency_path, macs_path, stat):
    """CostTable from exactly one of a latency table (ms) or a MACs cost JSON."""
    if (latency_path is None) == (macs_path is None):
        raise ValueError("give exactly one of --latency (a latency table) or --macs (a MACs cost JSON)")
    if latency_path:
        from mess_tf.latency.table import LatencyTable  # noqa: PLC0415  (heavy; only when used)
        table = LatencyTable.load(latency_path)
        if table.network_identity is None:
            print(f"note: {latency_path} was profiled before tables recorded their network; only its input size "
                  f"is checked against the cache's (profile again to have the network checked)")
        return table.cost_table(stat)
    d = io_utils.read_json(macs_path, "MACs cost file (--macs)")
    missing = [k for k in ("positions", "segment", "head", "final_head") if k not in d]
    if missing or d.get("unit", "MACs") != "MACs":
        raise ValueError(f"--macs={macs_path}: expected keys unit='MACs', positions, segment, head, final_head; "
                         f"missing {missing}, unit {d.get('unit')!r}")

    def macs(v):  # tools.describe writes {"macs": .., "params": ..} per part
        return v["macs"] if isinstance(v, dict) else v

    positions = [p["name"] if isinstance(p, dict) else p for p in d["positions"]]
    return CostTable(positions, {k: macs(v) for k, v in d["segment"].items()},
                     {k: macs(v) for k, v in d["head"].items()}, macs(d["final_head"]), "MACs")


def _objective_args(unit):
    if FLAGS.objective == "min_latency":
        if FLAGS.max_drop_pp is None or not FLAGS.max_drop_pp >= 0:
            raise ValueError(f"--objective=min_latency needs --max_drop_pp of 0 or more, got {FLAGS.max_drop_pp}")
        return "min_cost", {"max_drop_pp": FLAGS.max_drop_pp}
    budget = FLAGS.budget_ms if unit == "ms" else FLAGS.budget_macs
    flag = f"--budget_{unit.lower()}"
    if budget is None:
        raise ValueError(f"--objective=max_miou with costs in {unit} needs {flag}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"{flag} must be a number above 0, got {budget}")
    return "max_miou", {"budget": budget}


def _row(name, r):
    return {"name": name, "exits": " > ".join(f"{e.exit_id}@{e.th_pix:.2f}/{e.th_img:.2f}" for e in r.exits) or "-",
            "miou": 100 * r.miou, "expected": r.expected_cost, "worst": r.worst_cost,
            "final_fraction": r.final_fraction}


def _progress(name):
    """A search progress callback printing every few seconds, and when done."""
    return progress.throttled(lambda done, total: print(f"  {name}: {done}/{total} first exits expanded", flush=True))


def main(argv):
    del argv
    th_img_grid = mess_cli.float_list("th_img")
    cache = calibration.CalibrationCache.load(FLAGS.cache)
    costs = load_costs(FLAGS.latency, FLAGS.macs, FLAGS.stat)
    objective, kwargs = _objective_args(costs.unit)
    common = dict(costs=costs, th_img_grid=th_img_grid, mode=FLAGS.mode,
                  max_exits=FLAGS.max_exits, allowed_exits=FLAGS.exits, workers=FLAGS.workers,
                  time_limit_s=FLAGS.time_limit_s)
    chosen = search.search(cache, objective=objective, **kwargs, **common, progress=_progress(objective))
    front = search.search(cache, objective="pareto", **common, progress=_progress("pareto"))
    best = chosen.best
    complete, exact_exits = chosen.complete and front.complete, min(chosen.exact_exits, front.exact_exits)

    columns = ["name", "exits", "miou", "expected", "worst", "final_fraction"]
    formats = {"miou": ".2f", "expected": ".4g", "worst": ".4g", "final_fraction": ".2f"}
    rows = [_row("chosen", best), _row("final exit", chosen.final)]
    step = max(1, len(front.front) // FLAGS.top)
    rows += [_row(f"pareto {i}", r) for i, r in enumerate(front.front[::step])]
    print(f"searched {chosen.space_size:.3e} {FLAGS.mode} configurations ({chosen.evaluated} evaluated) "
          f"in {chosen.seconds + front.seconds:.1f} s; costs in {costs.unit}")
    if not complete:
        print(f"time limit of {FLAGS.time_limit_s:g} s reached: these are the best configurations found; they are "
              f"exact among configurations with at most {exact_exits} early exit(s), not proven best beyond")
    print(report.markdown_table(rows, columns, formats))

    out = FLAGS.output_dir
    config = best.deployment_config(cache.network_config, {
        "objective": FLAGS.objective, **kwargs, "cache": os.path.abspath(FLAGS.cache),
        "cache_fingerprint": cache.fingerprint, "calibration_split": cache.split})
    points = [(r.expected_cost, 100 * r.miou) for r in front.front]
    with io_utils.together():  # a CONFIG.json beside the report and plot of another search would mislead
        config.save(os.path.join(out, "CONFIG.json"))
        io_utils.write_json(os.path.join(out, "report.json"), {
            "objective": FLAGS.objective, **kwargs, "mode": FLAGS.mode, "unit": costs.unit,
            "space_size": chosen.space_size, "evaluated": chosen.evaluated, "complete": complete,
            "exact_exits": exact_exits,
            "seconds": chosen.seconds + front.seconds, "chosen": best.to_dict(), "final": chosen.final.to_dict(),
            "pareto_front": [r.to_dict() for r in front.front]})
        report.pareto_plot(os.path.join(out, "pareto.png"), points, points,
                           markers=[("final exit (baseline)", chosen.final.expected_cost, 100 * chosen.final.miou),
                                    ("chosen", best.expected_cost, 100 * best.miou)],
                           unit=costs.unit, title=f"mIoU vs expected cost ({FLAGS.mode}, calibration split)")
    print(f"wrote {out}/CONFIG.json, report.json, pareto.png")


if __name__ == "__main__":
    mess_cli.run(main)
