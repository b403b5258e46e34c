"""Search speed on the full ResNet-50 space, from a synthetic calibration cache.

The space: 16 candidate positions, up to 3 early exits, the default exit-head space
(heads.default_head_space(): 9 heads), a 10 x 10 (th_pix, th_img) grid, dynamic mode. The cache
holds a few hundred images with 21 classes whose statistics behave like a real network's: deeper
exits and heavier heads are more accurate and more confident, hard images are less confident and
less accurate everywhere. Costs are in ms and grow with depth.

    python bench/search_speed.py [--images=300] [--positions=16] [--max_exits=3] [--workers=2]
                                 [--time_limit_s=S] [--objectives=max_miou,min_cost,pareto]

With --time_limit_s each search stops after S seconds; its row then says complete=False and its
answer is the best found, not proven best.

Prints a table, writes bench/results/search_speed.json, and prints, last, a JSON line with
`configurations`, `seconds` and `configurations_per_second`.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mess_tf import calibration, io_utils, policy, provenance, search  # noqa: E402
from mess_tf.costs.table import CostTable  # noqa: E402
from mess_tf.deployment import exit_id  # noqa: E402

# heads.default_head_space() ids, listed here so the benchmark does not import TensorFlow/Keras;
# tests keep them honest only by eye: check against heads.default_head_space() when it changes.
HEADS = ("fcn_w0_b0", "fcn_w32_b0", "fcn_w64_b0", "fcn_w64_b1", "fcn_w64_b2_rd", "fcn_w128_b1",
         "fcn_w128_b2_rd", "aspp_w64", "aspp_w128_rd")
CLASSES = 21
PIXELS = 512 * 512


def synthetic_cache(images, positions, seed=0):
    """A CalibrationCache with realistic structure (see the module docstring)."""
    rng = np.random.default_rng(seed)
    names = [f"block{i}" for i in range(positions)]
    exits = [exit_id(p, h) for p in names for h in HEADS]
    depth = np.repeat(np.linspace(0.1, 1.0, positions), len(HEADS))          # [E]
    strength = np.tile(np.linspace(0.0, 0.15, len(HEADS)), positions)        # [E]
    quality = np.append(np.clip(0.35 + 0.5 * depth + strength, 0, 0.97), 0.97)  # [E+1], final last
    hardness = rng.beta(2, 3, images)                                         # [N]
    accuracy = np.clip(quality[None] - 0.4 * hardness[:, None] + rng.normal(0, 0.04, (images, len(quality))), 0.05, 1)
    th_pix = np.linspace(0.5, 0.95, 10)
    confident = np.clip(accuracy[:, :-1, None] + 0.1 - 0.6 * (th_pix - 0.5)[None, None]
                        + rng.normal(0, 0.03, (images, len(exits), 1)), 0, 1)
    conf_frac = np.minimum.accumulate(confident, axis=2)  # non-increasing in th_pix, as real fractions are
    share = rng.dirichlet(np.full(CLASSES, 0.3), images)                      # class mix per image
    gt = np.round(share * PIXELS).astype(np.int64)                            # [N, C]
    tp = np.round(gt[:, None] * np.clip(accuracy[..., None] + rng.normal(0, 0.03, (*accuracy.shape, CLASSES)), 0, 1))
    tp = tp.astype(np.int64)
    missed = gt[:, None] - tp
    # Missed pixels are predicted as other classes: spread them as false positives.
    fp = np.round(missed.sum(-1, keepdims=True)
                  * rng.dirichlet(np.ones(CLASSES), (images, len(quality)))).astype(np.int64)
    return calibration.CalibrationCache(conf_frac, tp, fp, missed, exits, [16] * len(exits), th_pix,
                                        policy.PolicyConfig(), {"backbone": "resnet50 (synthetic)"}, "synthetic",
                                        [f"im{i}" for i in range(images)], "synthetic", "calibration")


def cost_table(positions):
    names = [f"block{i}" for i in range(positions)]
    head_ms = dict(zip(HEADS, (0.05, 0.2, 0.3, 0.6, 0.9, 1.0, 1.6, 0.8, 1.5)))
    return CostTable(names, {p: 4.0 + 0.25 * i for i, p in enumerate(names)},
                     {exit_id(p, h): head_ms[h] for p in names for h in HEADS}, final_head=12.0, unit="ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--max_exits", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--time_limit_s", type=float, default=None)
    parser.add_argument("--objectives", default="max_miou,min_cost,pareto")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "results", "search_speed.json"))
    args = parser.parse_args()
    cache, costs = synthetic_cache(args.images, args.positions), cost_table(args.positions)
    th_img = np.linspace(0.5, 0.95, 10)
    final_ms = costs.backbone_to(costs.positions[-1]) + costs.final_head
    runs = [("max_miou", {"budget": 0.6 * final_ms}), ("min_cost", {"max_drop_pp": 1.0}), ("pareto", {})]
    runs = [(objective, kwargs) for objective, kwargs in runs if objective in args.objectives.split(",")]
    rows = []
    for objective, kwargs in runs:
        outcome = search.search(cache, costs, th_img, objective, max_exits=args.max_exits, workers=args.workers,
                                time_limit_s=args.time_limit_s, **kwargs)
        answer = outcome.best or max(outcome.front, key=lambda r: r.miou)
        rows.append({"objective": objective, **kwargs, "configurations": outcome.space_size,
                     "evaluated": outcome.evaluated, "seconds": outcome.seconds, "complete": outcome.complete,
                     "exact_exits": outcome.exact_exits,
                     "configurations_per_second": outcome.space_size / outcome.seconds,
                     "miou": answer.miou, "expected_ms": answer.expected_cost, "front_size": len(outcome.front)})
    print(f"{'objective':10} {'configurations':>15} {'evaluated':>11} {'seconds':>8} {'configs/s':>10} "
          f"{'mIoU':>6} {'exp. ms':>8} {'complete':>8}")
    for r in rows:
        print(f"{r['objective']:10} {r['configurations']:15.3e} {r['evaluated']:11d} {r['seconds']:8.2f} "
              f"{r['configurations_per_second']:10.3e} {100 * r['miou']:6.2f} {r['expected_ms']:8.2f} "
              f"{str(r['complete']):>8}")
    total = {"configurations": rows[0]["configurations"], "seconds": sum(r["seconds"] for r in rows),
             "complete": all(r["complete"] for r in rows)}
    total["configurations_per_second"] = total["configurations"] * len(rows) / total["seconds"]
    io_utils.write_json(args.output, {"space": {"positions": args.positions, "heads": len(HEADS),
                                                "max_exits": args.max_exits, "th_grid": [10, 10],
                                                "images": args.images, "classes": CLASSES},
                                      "workers": args.workers, "time_limit_s": args.time_limit_s, "runs": rows,
                                      "total": total, "measured": provenance.measured_on()})
    print(json.dumps(total))


if __name__ == "__main__":
    main()
