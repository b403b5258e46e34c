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

from mess_tf import metrics, report, search
from mess_tf.costs import model as cost_model
from mess_tf.data import demo
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig, ExitChoice

# The headline's targets (issue #16): no-loss speed-up of the paper's MobileNetV2 result and fewer
# MACs, savings against the oracle's, and predictions that hold.
NO_LOSS_SPEEDUP = 1.64
NO_LOSS_MAC_REDUCTION = 2.5
ORACLE_SAVINGS_SHARE = 0.8
NO_LOSS_PP = 0.1  # pp below the MESS network's own final exit that counts as no loss (paired, same images)
FINAL_VS_BAR_PP = -0.3  # the MESS final exit minus the bar: at least this, and its 95% interval reaching 0
BAR_GAIN_PP = 0.5  # the bar's test mIoU over the baseline's: under this means the baseline had finished learning
LATENCY_PREDICTION_RTOL = 0.10
MIOU_PREDICTION_PP = 0.5
# The network MESS converts must have learned its task, and finished learning it.
BASELINE_MIOU = 60.0
FLAT_GAIN_PP = 1.0  # a flat validation curve gains less than this over its last report.FLAT_TAIL of steps
COLUMNS = ("name", "steps", "miou_test", "vs_bar_pp", "vs_mess_final_pp", "miou_predicted", "miou_test_cache",
           "miou_float_cache", "macs", "mac_reduction", "latency_ms", "latency_ms_predicted", "speedup",
           "exit_fractions", "exit_fractions_predicted")
BAR, MESS_FINAL = "baseline_same_budget", "mess_final"  # the rows others are compared with


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


def bootstrap_picks(images, draws=1000, seed=0):
    """int [draws, images]: the images of each bootstrap resample (with replacement). Every interval
    of a headline uses the same resamples, so differences between rows are paired image by image."""
    return np.random.default_rng(seed).integers(0, images, (draws, images))


def resampled_miou(counts, picks, chunk=100):
    """mIoU (%) of each resample.

    Args:
      counts: int [3, N, C]: TP, FP, FN per image and class.
      picks: int [D, N] from bootstrap_picks.

    Returns:
      float [D].
    """
    return np.concatenate([100 * metrics.miou_from_counts(*(counts[:, picks[i:i + chunk]].sum(2)))
                           for i in range(0, len(picks), chunk)])


def interval(values):
    """[2.5%, 97.5%] percentiles of bootstrap values, as floats."""
    return [float(q) for q in np.percentile(values, [2.5, 97.5])]


def calibration_sizing(calibration_counts, test_counts, draws=1000, seed=0, bound_pp=MIOU_PREDICTION_PP):
    """How well a calibration split of this size can predict the test split's mIoU, and the size
    that would keep 95% of prediction errors within `bound_pp`.

    A prediction (calibration split) and a measurement (test split) of the same model differ by the
    two splits' sampling errors, independent of each other: s.d. sqrt(sd_cal^2 + sd_test^2). Each
    s.d. is measured by bootstrap on its split; a split's s.d. falls as 1 / sqrt(images).

    Args:
      calibration_counts, test_counts: int [3, N, C] per-image TP, FP, FN of one model on each split.

    Returns:
      {"calibration_images", "test_images", "calibration_sd_pp", "test_sd_pp", "error_95_pp" (1.96 x
      the difference's s.d.), "calibration_images_needed" (None if no calibration size reaches the
      bound with this test split)}.
    """
    sds = [float(np.std(resampled_miou(c, bootstrap_picks(c.shape[1], draws, seed))))
           for c in (calibration_counts, test_counts)]
    n_cal, n_test = calibration_counts.shape[1], test_counts.shape[1]
    per_image = sds[0] ** 2 * n_cal  # variance of one image's share, from the calibration split
    room = (bound_pp / 1.96) ** 2 - sds[1] ** 2
    return {"calibration_images": int(n_cal), "test_images": int(n_test), "calibration_sd_pp": sds[0],
            "test_sd_pp": sds[1], "error_95_pp": 1.96 * float(np.hypot(*sds)),
            "calibration_images_needed": int(np.ceil(per_image / room)) if room > 0 else None}


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


def rows(exp, evaluation, counts):
    """One headline row per deployment (see COLUMNS), measured and predicted side by side, with 95%
    bootstrap intervals over the test images: of its mIoU, and paired, of its difference from the
    bar (the same-budget baseline) and from the MESS network's own final exit.

    Args:
      exp: the Experiment. evaluation: its evaluation.json.
      counts: {deployment name: int [3, N, C] TP, FP, FN per test image} (EVALUATION_COUNTS).
    """
    costs = exp.cost_table()
    macs = cost_model.costs_of(exp.load("stage2")).cost_table()
    caches = {"calibration": exp.cache(), "test": exp.cache(split="test"), "float": exp.cache(precision="float32")}
    bar = evaluation[BAR]
    bar_macs = macs.worst(DeploymentConfig("budgeted"))
    picks = bootstrap_picks(counts[BAR].shape[1])
    resampled = {name: resampled_miou(c, picks) for name, c in counts.items()}
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
        miou = 100 * measured["miou"]
        row = {"name": name, "steps": exp.steps_of(stage), "miou_test": miou, "miou_ci95": interval(resampled[name])}
        for key, reference in (("vs_bar", BAR), ("vs_mess_final", MESS_FINAL)):
            same = name == reference or (key == "vs_mess_final" and stage != "stage2")
            row[f"{key}_pp"] = None if same else miou - 100 * evaluation[reference]["miou"]
            row[f"{key}_ci95"] = None if same else interval(resampled[name] - resampled[reference])
        out.append({
            **row, "miou_predicted": 100 * predicted.miou,
            "miou_test_cache": None if test_cache is None else 100 * test_cache,
            "miou_float_cache": None if float_cache is None else 100 * float_cache,
            "macs": expected_macs, "mac_reduction": bar_macs / expected_macs,
            "latency_ms": measured["latency_ms"], "latency_ms_predicted": predicted.expected_cost,
            "speedup": bar["latency_ms"] / measured["latency_ms"], "stage": stage,
            "exit_fractions": fraction_text(fractions),
            "exit_fractions_predicted": fraction_text(dict(zip(config.exit_ids, predicted.exit_fractions)))})
    return out


def _ci(values):
    return f"[{values[0]:+.2f}, {values[1]:+.2f}]"


def goals(headline_rows, oracle_result, baseline_curve=(), stage2_curves=None):
    """The headline's targets: [{"goal", "target", "measured", "met"}].

    Args:
      headline_rows: rows().
      oracle_result: oracle().
      baseline_curve: [(step, validation mIoU in %)] of the baseline's training (may be empty).
      stage2_curves: {exit id: [(step, validation mIoU in %)]} of stage 2 (None: not recorded).
    """
    by_name = {r["name"]: r for r in headline_rows}
    gain = report.tail_gain(list(baseline_curve))
    base, bar, final = by_name["baseline"], by_name[BAR], by_name[MESS_FINAL]
    no_loss, same_cost = by_name["no_loss"], by_name["baseline_cost"]
    bar_gain = bar["miou_test"] - base["miou_test"]
    exit_gains = {e: report.tail_gain(c) for e, c in (stage2_curves or {}).items()}
    worst_exit = max(exit_gains, key=lambda e: exit_gains[e] if exit_gains[e] is not None else np.inf,
                     default=None)
    savings = (1 - 1 / no_loss["speedup"]) / max(1 - 1 / oracle_result["speedup"], 1e-9)
    # The oracle saves at no loss; savings bought with mIoU the oracle keeps are no match for it.
    below_oracle = 100 * oracle_result["miou"] - no_loss["miou_test"]
    mess_rows = [r for r in headline_rows if r["stage"] == "stage2"]
    latency_error = max(abs(r["latency_ms_predicted"] / r["latency_ms"] - 1) for r in mess_rows)
    miou_error = max(abs(r["miou_predicted"] - r["miou_test"]) for r in mess_rows)
    return [
        {"goal": "baseline: test mIoU (int8)", "target": f">= {BASELINE_MIOU:.0f}%",
         "measured": f"{base['miou_test']:.2f}%", "met": base["miou_test"] >= BASELINE_MIOU},
        {"goal": f"baseline: validation mIoU gained over its last {report.FLAT_TAIL:.0%} of steps",
         "target": f"< {FLAT_GAIN_PP:.0f} pp", "measured": "no curve" if gain is None else f"{gain:+.2f} pp",
         "met": gain is not None and gain < FLAT_GAIN_PP},
        {"goal": "the bar (same-budget baseline): test mIoU gained over the baseline", "target": f"< {BAR_GAIN_PP} pp",
         "measured": f"{bar_gain:+.2f} pp, 95% {_ci([-v for v in base['vs_bar_ci95']][::-1])}",
         "met": bar_gain < BAR_GAIN_PP},
        {"goal": f"stage 2: every exit's validation mIoU gained over its last {report.FLAT_TAIL:.0%} of steps",
         "target": f"< {FLAT_GAIN_PP:.0f} pp",
         "measured": "no curves" if worst_exit is None or exit_gains[worst_exit] is None
         else f"worst {exit_gains[worst_exit]:+.2f} pp ({worst_exit})",
         "met": worst_exit is not None and exit_gains[worst_exit] is not None
         and exit_gains[worst_exit] < FLAT_GAIN_PP},
        {"goal": "no_loss: test mIoU minus the MESS final exit's (paired)", "target": f">= -{NO_LOSS_PP} pp",
         "measured": f"{no_loss['vs_mess_final_pp']:+.2f} pp, 95% {_ci(no_loss['vs_mess_final_ci95'])}",
         "met": no_loss["vs_mess_final_pp"] >= -NO_LOSS_PP},
        {"goal": "the MESS final exit: test mIoU minus the bar's (paired)",
         "target": f">= {FINAL_VS_BAR_PP} pp, 95% interval reaching 0",
         "measured": f"{final['vs_bar_pp']:+.2f} pp, 95% {_ci(final['vs_bar_ci95'])}",
         "met": final["vs_bar_pp"] >= FINAL_VS_BAR_PP and final["vs_bar_ci95"][1] >= 0},
        {"goal": "no_loss: measured int8 speed-up", "target": f">= {NO_LOSS_SPEEDUP}x",
         "measured": f"{no_loss['speedup']:.2f}x", "met": no_loss["speedup"] >= NO_LOSS_SPEEDUP},
        {"goal": "no_loss: fewer MACs", "target": f">= {NO_LOSS_MAC_REDUCTION}x",
         "measured": f"{no_loss['mac_reduction']:.2f}x", "met": no_loss["mac_reduction"] >= NO_LOSS_MAC_REDUCTION},
        {"goal": "no_loss: latency saved, as a share of the oracle's", "target": f">= {ORACLE_SAVINGS_SHARE:.0%}",
         "measured": f"{savings:.0%}, at {below_oracle:.2f} pp below the oracle's mIoU",
         "met": savings >= ORACLE_SAVINGS_SHARE and below_oracle <= NO_LOSS_PP},
        {"goal": "predicted (calibration) vs measured (test) latency, every MESS row",
         "target": f"within {LATENCY_PREDICTION_RTOL:.0%}", "measured": f"worst {latency_error:.1%}",
         "met": latency_error <= LATENCY_PREDICTION_RTOL},
        {"goal": "predicted (calibration) vs measured (test) mIoU, every MESS row",
         "target": f"within {MIOU_PREDICTION_PP} pp", "measured": f"worst {miou_error:.2f} pp",
         "met": miou_error <= MIOU_PREDICTION_PP},
        {"goal": "baseline_cost: test mIoU above the bar's (paired)", "target": "> 0 pp",
         "measured": f"{same_cost['vs_bar_pp']:+.2f} pp, 95% {_ci(same_cost['vs_bar_ci95'])}",
         "met": same_cost["vs_bar_pp"] > 0},
    ]


def latency_parts(costs):
    """[(label, ms)] of the latency table: segments in depth order and the final head (the whole
    network), then each position's class map."""
    parts = [(f"segment to {p}", costs.segment[p]) for p in costs.positions]
    parts.append(("final head (with its class map)", costs.final_head))
    parts += [(f"class map at {p}", ms) for p, ms in (costs.class_map or {}).items()]
    return parts


def _with_interval(value, ci):
    return "-" if value is None else f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def summary_markdown(rows, goals, ceilings, oracle, precision, sizing=None):
    """The headline tables (deployments with their intervals, goals, ceilings) and the calibration
    split's sizing (calibration_sizing()) as markdown."""
    formats = {c: ".2f" for c in ("miou_predicted", "miou_test_cache", "miou_float_cache", "mac_reduction",
                                  "latency_ms", "latency_ms_predicted", "speedup")}
    shown = [dict(r, macs=f"{r['macs'] / 1e9:.2f}G",
                  miou_test=f"{r['miou_test']:.2f} [{r['miou_ci95'][0]:.2f}, {r['miou_ci95'][1]:.2f}]",
                  vs_bar_pp=_with_interval(r["vs_bar_pp"], r["vs_bar_ci95"]),
                  vs_mess_final_pp=_with_interval(r["vs_mess_final_pp"], r["vs_mess_final_ci95"])) for r in rows]
    table = report.markdown_table(shown, COLUMNS, formats)
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
    text = (f"Test split, {precision} LiteRT on this host, 1 thread, the models taking turns image by image. "
            f"mIoU in %: "
            f"measured on the test split with its 95% bootstrap interval (`miou_test`); the paired difference from the "
            f"bar, the baseline trained for as many steps as the MESS network (`vs_bar_pp`), and from the MESS "
            f"network's own final exit (`vs_mess_final_pp`), each with its 95% interval over the same resampled "
            f"images; predicted by the search on the calibration split (`miou_predicted`, {precision} cache), by the "
            f"{precision} cache of the test split (`miou_test_cache`: the same model, so it must equal `miou_test`), "
            f"and by a float cache of the calibration split (`miou_float_cache`). MACs expected per image at the "
            f"measured exit fractions; speed-up and MAC reduction against the bar.\n\n{table}\n\n## Goals\n\n"
            f"{goal_table}\n\n## The ceiling\n\nIf every image left at one exit position (its cheapest head; "
            f"latency composed from the table: truncated network, head, confidence, class map; mIoU in % on the test "
            f"split), and the oracle on the test split:\n\n{ceilings_table}")
    if sizing:
        needed = sizing["calibration_images_needed"]
        text += (f"\n\n## The calibration split's size\n\nA prediction (calibration split) and a measurement (test "
                 f"split) differ by both splits' sampling errors. Measured by bootstrap on the MESS network's final "
                 f"exit: s.d. {sizing['calibration_sd_pp']:.2f} pp on the {sizing['calibration_images']} calibration "
                 f"images and {sizing['test_sd_pp']:.2f} pp on the {sizing['test_images']} test images, so 95% of "
                 f"prediction errors lie within {sizing['error_95_pp']:.2f} pp. "
                 + (f"Within {MIOU_PREDICTION_PP} pp would take {needed} calibration images."
                    if needed else f"No calibration split reaches {MIOU_PREDICTION_PP} pp with this test split."))
    return text


def data_markdown(data):
    """The demo data's pixel shares (Experiment.data_statistics()) beside published scene datasets'."""
    published = "; ".join(f"{name} {classes} stuff, {stuff:.0f}% of the pixels"
                          + (f" (things {things:.1f}%)" if things else "")
                          for name, classes, stuff, things in demo.PUBLISHED_STUFF_SHARES)
    smallest, share = data["smallest_class"]
    things = data["per_image_things_percent"]
    return (f"## The data\n\nThe demo's {data['kind']} data (synthetic), {data['images']} images in all splits: stuff "
            f"{data['stuff_percent']:.1f}% of the labelled pixels, things {data['things_percent']:.1f}% (per image "
            f"p10 / p50 / p90: {things['p10']:.1f} / {things['p50']:.1f} / {things['p90']:.1f}%); the smallest class, "
            f"{smallest}, {share:.2f}%; {data['images_without_things']} images without things; difficulty "
            f"easy / medium / hard {data['difficulty']['easy']} / {data['difficulty']['medium']} / "
            f"{data['difficulty']['hard']} images. Published: {published}.")
