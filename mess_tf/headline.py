"""The demo's headline: the MESS network against the network it came from, predicted and measured,
beside the ceiling that this network's latency profile allows.

Everything here is read from what an Experiment's steps wrote (calibration caches, the latency
table, the configurations, the evaluation on the test split); nothing is re-measured.

  * ceilings: from the latency table, the speed-up if every image left at an exit position
    (the truncated network, that exit's head, its confidence and its class map), and the
    oracle's: each test image at the cheapest exit whose pixel accuracy matches the final exit's;
  * rows: per deployment, measured test mIoU, exit fractions and latency (int8 LiteRT, the models
    taking turns image by image) beside what the search predicted on the calibration split, what the
    int8 test-split cache predicts (the same model, so it must agree) and what a float cache would
    have predicted;
  * goals: the targets of the headline, each with its measured value and whether it is met.
"""
import numpy as np

from mess_tf import cost_model, metrics, report, search
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig, ExitChoice

# The headline's targets (issue #16): no-loss speed-up of the paper's MobileNetV2 result and fewer
# MACs, savings against the oracle's, and predictions that hold.
NO_LOSS_SPEEDUP = 1.64
NO_LOSS_MAC_REDUCTION = 2.5
ORACLE_SAVINGS_SHARE = 0.8
NO_LOSS_PP = 0.1  # pp below the bar that counts as no loss
LATENCY_PREDICTION_RTOL = 0.10
MIOU_PREDICTION_PP = 0.5
# The network MESS converts must have learned its task, and finished learning it.
BASELINE_MIOU = 60.0
FLAT_TAIL = 0.2  # the last fifth of the baseline's steps ...
FLAT_GAIN_PP = 1.0  # ... gain less than this on the validation curve
COLUMNS = ("name", "steps", "miou_test", "miou_predicted", "miou_test_cache", "miou_float_cache", "macs",
           "mac_reduction", "latency_ms", "latency_ms_predicted", "speedup", "exit_fractions",
           "exit_fractions_predicted")


def _budgeted(exit_id):
    if exit_id == FINAL_EXIT:
        return DeploymentConfig("budgeted")
    position, head = exit_id.rsplit(":", 1)
    return DeploymentConfig("budgeted", [ExitChoice(position, head)])


def ceilings(cache, costs):
    """Speed-up if every image left at each exit position, from the latency table, and the mIoU
    the cache gives that.

    Returns:
      [{"position", "exit_id" (its cheapest head), "ms", "speedup", "miou" (in %, of that head),
      "best_head_miou" (in %, of the position's most accurate head)}] in depth order; ms is the
      truncated network + head + confidence + class map, speedup the final exit's ms over it.
    """
    final = costs.worst(_budgeted(FINAL_EXIT))
    counts = (a.sum(0) for a in (cache.tp, cache.fp, cache.fn))  # [E + 1, C] each: every image at each exit
    miou = dict(zip(cache.all_exit_ids, 100 * metrics.miou_from_counts(*counts)))
    best, accurate = {}, {}
    for eid in cache.exit_ids:
        position, ms = eid.rsplit(":", 1)[0], costs.worst(_budgeted(eid))
        if position not in best or ms < best[position][1]:
            best[position] = (eid, ms)
        accurate[position] = max(accurate.get(position, 0.0), miou[eid])
    order = [p for p in costs.positions if p in best]
    return [{"position": p, "exit_id": best[p][0], "ms": best[p][1], "speedup": final / best[p][1],
             "miou": miou[best[p][0]], "best_head_miou": accurate[p]} for p in order]


def noise_floor(bar_cache, mess_cache, draws=1000, seed=0):
    """How far a split of this size moves the final-exit mIoUs the goals compare: a paired bootstrap
    over the images both caches hold (the same split, the same images, in the same order).

    Returns:
      {"images", "bar_sd_pp" (s.d. of the bar's mIoU, pp), "difference_sd_pp" (of bar minus the
      MESS network's final exit), "difference_ci95_pp" ([2.5%, 97.5%] of that difference)}.
    """
    n = bar_cache.num_images
    picks = np.random.default_rng(seed).integers(0, n, (draws, n))  # [D, N] image indices per resample
    bar, mess = (100 * metrics.miou_from_counts(*(a[picks, -1].sum(1) for a in (c.tp, c.fp, c.fn)))  # [D]
                 for c in (bar_cache, mess_cache))
    diff = bar - mess
    return {"images": int(n), "bar_sd_pp": float(np.std(bar)), "difference_sd_pp": float(np.std(diff)),
            "difference_ci95_pp": [float(q) for q in np.percentile(diff, [2.5, 97.5])]}


def oracle(cache, costs):
    """Each image leaves at the cheapest exit (alone, as if budgeted there) whose pixel accuracy is
    at least the final exit's: the bound on what any exit policy can save at no loss.

    Returns:
      {"miou", "ms" (expected, composed), "speedup" (final exit's ms over it), "exit_fractions"}.
    """
    ids = cache.all_exit_ids
    ms = np.array([costs.worst(_budgeted(e)) for e in ids])
    correct = cache.tp.sum(-1)  # [N, E + 1] pixels right; every exit sees the same labelled pixels
    eligible = correct >= correct[:, -1:]
    choice = np.where(eligible, ms[None], np.inf).argmin(1)
    rows = np.arange(cache.num_images)
    fractions = np.bincount(choice, minlength=len(ids)) / cache.num_images
    return {"miou": metrics.miou_from_counts(*(a[rows, choice].sum(0) for a in (cache.tp, cache.fp, cache.fn))),
            "ms": float(ms[choice].mean()),
            "speedup": float(ms[-1] / ms[choice].mean()),
            "exit_fractions": {e: float(f) for e, f in zip(ids, fractions) if f}}


def fraction_text(fractions):
    """{exit id: fraction} as `position 40%, final 60%` (the heads at one position added up)."""
    by_position = {}
    for eid, f in fractions.items():
        position = "final" if eid == FINAL_EXIT else eid.split(":")[0]
        by_position[position] = by_position.get(position, 0.0) + f
    return ", ".join(f"{position} {f:.0%}" for position, f in by_position.items() if f)


def rows(exp, evaluation):
    """One headline row per deployment (see COLUMNS), measured and predicted side by side."""
    costs = exp.cost_table()
    macs = cost_model.costs_of(exp.load("stage2")).cost_table()
    caches = {"calibration": exp.cache(), "test": exp.cache(split="test"), "float": exp.cache(precision="float32")}
    bar = evaluation["baseline_same_budget"]
    bar_macs = macs.worst(DeploymentConfig("budgeted"))
    out = []
    for name, (stage, config) in exp.deployments().items():
        measured = evaluation[name]
        fractions = {e: measured["exit_fractions"].get(e, 0.0) for e in config.exit_ids}
        if stage == "stage2":
            predicted = search.evaluate(caches["calibration"], costs, config)
            test_cache = search.evaluate(caches["test"], costs, config).miou
            float_cache = search.evaluate(caches["float"], costs, config).miou
        else:
            predicted = search.evaluate(exp.cache(stage), costs, config)
            test_cache = float_cache = None
        expected_macs = macs.expected(config, list(fractions.values()))
        out.append({
            "name": name, "steps": exp.steps_of(stage), "miou_test": 100 * measured["miou"],
            "miou_predicted": 100 * predicted.miou,
            "miou_test_cache": None if test_cache is None else 100 * test_cache,
            "miou_float_cache": None if float_cache is None else 100 * float_cache,
            "macs": expected_macs, "mac_reduction": bar_macs / expected_macs,
            "latency_ms": measured["latency_ms"], "latency_ms_predicted": predicted.expected_cost,
            "speedup": bar["latency_ms"] / measured["latency_ms"], "exit_fractions": fraction_text(fractions),
            "exit_fractions_predicted": fraction_text(dict(zip(config.exit_ids, predicted.exit_fractions)))})
    return out


def tail_gain(curve, tail=FLAT_TAIL):
    """Validation mIoU (pp) gained over the last `tail` of a learning curve's steps: the last point
    against the latest one at or before (1 - tail) of the steps. None without such a point.

    Args:
      curve: [(step, mIoU in %)], in step order.
    """
    start = (1 - tail) * curve[-1][0] if curve else 0
    before = [miou for step, miou in curve if step <= start]
    return curve[-1][1] - before[-1] if curve and before else None


def goals(headline_rows, oracle_result, baseline_curve=()):
    """The headline's targets: [{"goal", "target", "measured", "met"}].

    Args:
      headline_rows: rows().
      oracle_result: oracle().
      baseline_curve: [(step, validation mIoU in %)] of the baseline's training (may be empty).
    """
    by_name = {r["name"]: r for r in headline_rows}
    gain = tail_gain(list(baseline_curve))
    bar, no_loss, same_cost = by_name["baseline_same_budget"], by_name["no_loss"], by_name["baseline_cost"]
    drop = bar["miou_test"] - no_loss["miou_test"]
    savings = (1 - 1 / no_loss["speedup"]) / max(1 - 1 / oracle_result["speedup"], 1e-9)
    # The oracle saves at no loss; savings bought with mIoU the oracle keeps are no match for it.
    below_oracle = 100 * oracle_result["miou"] - no_loss["miou_test"]
    latency_error = max(abs(r["latency_ms_predicted"] / r["latency_ms"] - 1) for r in headline_rows)
    miou_error = max(abs(r["miou_predicted"] - r["miou_test"]) for r in headline_rows)
    return [
        {"goal": "baseline: test mIoU (int8)", "target": f">= {BASELINE_MIOU:.0f}%",
         "measured": f"{by_name['baseline']['miou_test']:.2f}%", "met": by_name["baseline"]["miou_test"] >= BASELINE_MIOU},
        {"goal": f"baseline: validation mIoU gained over its last {FLAT_TAIL:.0%} of steps",
         "target": f"< {FLAT_GAIN_PP:.0f} pp", "measured": "no curve" if gain is None else f"{gain:+.2f} pp",
         "met": gain is not None and gain < FLAT_GAIN_PP},
        {"goal": "no_loss: test mIoU at most 0.1 pp below the same-budget baseline", "target": "<= 0.10 pp",
         "measured": f"{drop:.2f} pp below", "met": drop <= 0.1},
        {"goal": "no_loss: measured int8 speed-up", "target": f">= {NO_LOSS_SPEEDUP}x",
         "measured": f"{no_loss['speedup']:.2f}x", "met": no_loss["speedup"] >= NO_LOSS_SPEEDUP},
        {"goal": "no_loss: fewer MACs", "target": f">= {NO_LOSS_MAC_REDUCTION}x",
         "measured": f"{no_loss['mac_reduction']:.2f}x", "met": no_loss["mac_reduction"] >= NO_LOSS_MAC_REDUCTION},
        {"goal": "no_loss: latency saved, as a share of the oracle's", "target": f">= {ORACLE_SAVINGS_SHARE:.0%}",
         "measured": f"{savings:.0%}, at {below_oracle:.2f} pp below the oracle's mIoU",
         "met": savings >= ORACLE_SAVINGS_SHARE and below_oracle <= NO_LOSS_PP},
        {"goal": "predicted (calibration) vs measured (test) latency, every deployment",
         "target": f"within {LATENCY_PREDICTION_RTOL:.0%}", "measured": f"worst {latency_error:.1%}",
         "met": latency_error <= LATENCY_PREDICTION_RTOL},
        {"goal": "predicted (calibration) vs measured (test) mIoU, every deployment",
         "target": f"within {MIOU_PREDICTION_PP} pp", "measured": f"worst {miou_error:.2f} pp",
         "met": miou_error <= MIOU_PREDICTION_PP},
        {"goal": "baseline_cost: test mIoU above the same-budget baseline's", "target": "> 0 pp",
         "measured": f"{same_cost['miou_test'] - bar['miou_test']:+.2f} pp",
         "met": same_cost["miou_test"] > bar["miou_test"]},
    ]


def latency_parts(costs):
    """[(label, ms)] of the latency table: segments in depth order and the final head (the whole
    network), then each position's class map."""
    parts = [(f"segment to {p}", costs.segment[p]) for p in costs.positions]
    parts.append(("final head (with its class map)", costs.final_head))
    parts += [(f"class map at {p}", ms) for p, ms in (costs.class_map or {}).items()]
    return parts


def summary_markdown(rows, goals, ceilings, oracle, precision, noise=None):
    """The headline tables (deployments, goals, ceilings) and the noise floor (noise_floor()) as markdown."""
    formats = {c: ".2f" for c in ("miou_test", "miou_predicted", "miou_test_cache", "miou_float_cache", "mac_reduction",
                                  "latency_ms", "latency_ms_predicted", "speedup")}
    table = report.markdown_table([dict(r, macs=f"{r['macs'] / 1e9:.2f}G") for r in rows], COLUMNS, formats)
    goal_table = report.markdown_table([dict(g, met="yes" if g["met"] else "**no**") for g in goals],
                                       ("goal", "target", "measured", "met"))
    ceiling_rows = [dict(c, ms=f"{c['ms']:.2f}", speedup=f"{c['speedup']:.2f}x", miou=f"{c['miou']:.2f}",
                         best_head_miou=f"{c['best_head_miou']:.2f}") for c in ceilings]
    ceiling_rows.append({"position": "oracle (each image at its cheapest exit as good as the final)",
                         "exit_id": fraction_text(oracle["exit_fractions"]), "ms": f"{oracle['ms']:.2f}",
                         "speedup": f"{oracle['speedup']:.2f}x", "miou": f"{100 * oracle['miou']:.2f}",
                         "best_head_miou": "-"})
    ceilings_table = report.markdown_table(ceiling_rows, ("position", "exit_id", "ms", "speedup", "miou",
                                                          "best_head_miou"))
    return (f"Test split, {precision} LiteRT on this host, 1 thread, the models taking turns image by image. mIoU in %: "
            f"measured on the test split (`miou_test`), predicted by the search on the calibration split "
            f"(`miou_predicted`, {precision} cache), by the {precision} cache of the test split (`miou_test_cache`: the same "
            f"model, so it must equal `miou_test`), and by a float cache of the calibration split (`miou_float_cache`). "
            f"MACs expected per image at the measured exit fractions; speed-up and MAC reduction against the "
            f"same-budget baseline.\n\n{table}\n\n## Goals\n\n{goal_table}\n\n## The ceiling\n\nIf every image "
            f"left at one exit position (its cheapest head; latency composed from the table: truncated network, head, "
            f"confidence, class map; mIoU in % on the test split), and the oracle on the test split:\n\n{ceilings_table}"
            + ("" if noise is None else
               f"\n\n## The noise floor\n\nResampling the {noise['images']} calibration images (paired bootstrap), "
               f"the same-budget baseline's mIoU moves by {noise['bar_sd_pp']:.2f} pp (1 s.d.) and its difference from "
               f"the MESS network's final exit by {noise['difference_sd_pp']:.2f} pp (95% interval "
               f"{noise['difference_ci95_pp'][0]:+.2f} to {noise['difference_ci95_pp'][1]:+.2f} pp): a goal finer than "
               f"that is below what a split of this size can resolve."))

