"""Where the dynamic-control overhead goes: the staged model's signatures one by one, and the
in-graph confidence op by op.

bench/latency_model.py measures the overhead of dynamic-exit control as a whole (the runtime
leaving at exit k vs a static model of the same layers). This benchmark splits it, on the same
network (3 exits `fcn_w32_b1` at 25/50/75% of the backbone's MACs, int8, random weights):

  1. signatures: each stage signature and each class-map signature of the dynamic staged model,
     called directly (fed the feature maps of one chained run), each static model, and
     `StagedModel.run` forced to leave at each exit, all timed in one alternation. Per exit k:
     the static model; the signatures an image leaving at k runs (stages 1..k and class map k),
     each timed in its own block, summed ("signatures": the graphs' own cost); the same
     signatures called one after another on fixed inputs ("in turn": what interleaving them
     costs); and the runtime (the same, handing each stage's outputs to the next, checking
     thresholds). Every side includes quantising the float image.
  2. confidence: the in-graph image confidence on logits of the first exit's coarse shape
     (stride 4 on MobileNetV2: 40x40x21 at 160x160), alone, with the policy option
     confidence_stride=8 (decided on 2x2-pooled logits), by op group, and two exact
     alternatives that were tried for the library and are slower in TFLite:
       * "majority": the median's threshold test as a majority vote (median >= t exactly when
         more than half of the window is >= t): reflect pad, one average pool, a compare;
       * "sum_exp": top-1 as sum(exp(logits - max)) <= 1 / th_pix, without a softmax (in int8
         the sum's quantisation step makes high th_pix meaningless: timing only).

    python bench/control_breakdown.py [--backbone=mobilenet_v2|resnet50 --input_size=160 --rounds=20]

Prints two tables, writes bench/results/control_breakdown_<backbone>.json, and prints, last, a
JSON line with the per-exit `runtime_overhead`, `in_turn_overhead` and `signatures_overhead`
(fractions over the static model) and the confidence's int8 `confidence_ms`.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mess_tf import export, policy, provenance, report, runtime  # noqa: E402
from mess_tf.io_utils import write_json  # noqa: E402
from mess_tf.keras_lib import keras, layers  # noqa: E402
from mess_tf.latency import host, reference  # noqa: E402

TH_PIX = 0.7


# -- 1. signatures -----------------------------------------------------------------------------


def signature_rows(net, exit_ids, config, calibration, folder, threads, rounds):
    """Per exit (and the final exit): static, summed direct signatures and runtime medians (ms)."""
    path = os.path.join(folder, "dynamic.tflite")
    export.export_staged_model(path, net, config, reference.DEPLOYED, calibration)
    statics = reference.static_models(net, exit_ids, reference.DEPLOYED, calibration)
    model = runtime.StagedModel.load(path, num_threads=threads)
    image = reference.random_images(1, net.config.input_size, seed=1)[0]
    # Every side pays for quantising the float image, as the runtime and the static calls do.
    calls, available = {"quantise image": lambda: model._image(image)}, {"image": model._image(image)}
    for k, stage in enumerate(model.stages):
        inputs = {name: available[name] for name in stage.inputs}
        outputs = model._runners[k](**inputs)
        available.update({name: outputs[name] for name in stage.features})
        calls[f"stage {k + 1}"] = lambda runner=model._runners[k], inputs=inputs: runner(**inputs)
        if stage.class_map_signature:
            logits = {export.COARSE_LOGITS: outputs[export.COARSE_LOGITS]}
            calls[f"class map {k + 1}"] = lambda runner=model._class_map_runners[k], logits=logits: runner(**logits)
    # What an image leaving at exit k runs; "in turn" calls them one after another on fixed inputs.
    leaving = [["quantise image"] + [f"stage {i + 1}" for i in range(k + 1)]
               + [f"class map {k + 1}"] * (f"class map {k + 1}" in calls) for k in range(len(model.stages))]
    for k, names in enumerate(leaving):
        calls[f"in turn {k + 1}"] = lambda steps=[calls[n] for n in names]: [step() for step in steps]
    for k, static_bytes in enumerate(statics):
        calls[f"static {k + 1}"] = reference.static_call(static_bytes, image, threads)
        th_img = reference.forced_exit(k, len(exit_ids))
        calls[f"runtime {k + 1}"] = lambda th_img=th_img: model.run(image, "dynamic", th_img)
    ms = {name: timing.median_ms for name, timing in reference.alternate(calls, rounds).items()}
    rows = []
    for k, (eid, names) in enumerate(zip(model.exit_ids, leaving)):
        row = {"exit": eid, "static_ms": ms[f"static {k + 1}"], "stage_ms": ms[f"stage {k + 1}"],
               "class_map_ms": ms.get(f"class map {k + 1}"), "signatures_ms": sum(ms[n] for n in names),
               "in_turn_ms": ms[f"in turn {k + 1}"], "runtime_ms": ms[f"runtime {k + 1}"]}
        for side in ("signatures", "in_turn", "runtime"):
            row[f"{side}_overhead"] = row[f"{side}_ms"] / row["static_ms"] - 1
        rows.append(row)
    return rows


# -- 2. the confidence, op by op ---------------------------------------------------------------


def majority_confidence(logits, stride, cfg=policy.PolicyConfig()):
    """Edge-aware image confidence with the median's threshold test as a majority vote (exact)."""
    passed = tf.cast(policy.pixel_confidence_tf(logits, cfg) >= TH_PIX, tf.float32)
    radius = cfg.radius(stride)
    near_edge = policy.edge_mask_tf(tf.argmax(logits, -1, output_type=tf.int32), radius) > 0.5
    padded = tf.pad(passed, [[0, 0], [radius, radius], [radius, radius]], mode="REFLECT")
    share = tf.nn.avg_pool2d(padded[..., None], 2 * radius + 1, 1, "VALID")[..., 0]
    return tf.reduce_mean(tf.where(near_edge, tf.cast(share > 0.5, tf.float32), passed), axis=[1, 2])


def confidence_variants(stride):
    """name -> [1, H, W, C] logits -> a tensor: the library's confidence, its op groups, alternatives."""
    def mean(x):
        return tf.reduce_mean(tf.cast(x, tf.float32))
    return {
        "edge_aware (library)": lambda x: policy.image_confidence_tf(x, TH_PIX, stride),
        "top1 (library)": lambda x: policy.image_confidence_tf(
            x, TH_PIX, stride, policy.PolicyConfig(edge_smoothing=False)),
        "edge_aware, confidence_stride=8 (library option)": lambda x: policy.image_confidence_tf(
            x, TH_PIX, stride, policy.PolicyConfig(confidence_stride=8)),
        "softmax": lambda x: mean(tf.nn.softmax(x, -1)),
        "argmax": lambda x: mean(tf.argmax(x, -1)),
        "edge mask": lambda x: mean(policy.edge_mask_tf(tf.argmax(x, -1, output_type=tf.int32), 1)),
        "read logits only": mean,
        "majority (alternative)": lambda x: majority_confidence(x, stride),
        "sum_exp top1 (alternative)": lambda x: mean(
            tf.reduce_sum(tf.exp(x - tf.reduce_max(x, -1, keepdims=True)), -1) <= 1 / TH_PIX),
    }


def confidence_rows(shape, stride, threads, rounds):
    """Median ms of each variant on logits of `shape` (H, W, C), float32 and int8."""
    rng = np.random.default_rng(0)
    calibration = [rng.normal(0, 3, (1, *shape)).astype(np.float32) for _ in range(reference.CALIBRATION_IMAGES)]
    rows = {name: {"variant": name} for name in confidence_variants(stride)}
    for precision in reference.PRECISIONS:
        calls = {}
        for name, fn in confidence_variants(stride).items():
            logits = keras.Input(shape, batch_size=1)
            model = keras.Model(logits, layers.Lambda(fn)(logits))
            calls[name] = host.signature_calls(export.convert_model(model, precision, calibration), None, threads)
        for name, timing in reference.alternate(calls, rounds).items():
            rows[name][f"{precision}_ms"] = timing.median_ms
    return list(rows.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=None,
                        help="Width multiplier of a MobileNet (default 0.5; ResNets take none).")
    parser.add_argument("--input_size", type=int, default=160, help="Square input size (pixels).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20, help="Timed rounds of each alternation.")
    parser.add_argument("--output", default=None, help="Default bench/results/control_breakdown_<backbone>.json.")
    args = parser.parse_args()
    size = (args.input_size,) * 2
    alpha = args.alpha or (0.5 if args.backbone.startswith("mobilenet") else 1.0)
    net, exit_ids, configs = reference.mess_network(args.backbone, alpha, size)
    calibration = reference.random_images(reference.CALIBRATION_IMAGES, size)
    with tempfile.TemporaryDirectory() as folder:
        signatures = signature_rows(net, exit_ids, configs[f"dynamic x{len(exit_ids)}"], calibration, folder,
                                    args.threads, args.rounds)
    shape = tuple(net.coarse_logits(exit_ids[0]).shape[1:])
    confidence = confidence_rows(shape, net.position_of(exit_ids[0]).stride, args.threads, args.rounds)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"control_breakdown_{args.backbone}.json")
    write_json(output, {"network": net.config.to_dict(), "exits": exit_ids, "precision": reference.DEPLOYED,
                        "threads": args.threads, "rounds": args.rounds, "device": host.host_device(),
                        "runtime": host.runtime_version(), "signatures": signatures,
                        "confidence_logits_shape": list(shape), "confidence": confidence,
                        "measured": provenance.measured_on()})
    print(report.markdown_section(
        f"{args.backbone}: leaving at exit k ({reference.DEPLOYED}, median ms)",
        ["exit", "static", "stage k", "class map k", "signatures 1..k + map", "in turn", "runtime",
         "signatures +%", "in turn +%", "runtime +%"],
        [(r["exit"], f"{r['static_ms']:.3f}", f"{r['stage_ms']:.3f}",
          "-" if r["class_map_ms"] is None else f"{r['class_map_ms']:.3f}",
          f"{r['signatures_ms']:.3f}", f"{r['in_turn_ms']:.3f}", f"{r['runtime_ms']:.3f}",
          f"{100 * r['signatures_overhead']:.1f}", f"{100 * r['in_turn_overhead']:.1f}",
          f"{100 * r['runtime_overhead']:.1f}")
         for r in signatures]))
    print(report.markdown_section(
        f"In-graph confidence on {shape[0]}x{shape[1]}x{shape[2]} logits (median ms, one call including the "
        "interpreter's fixed cost)", ["variant", "float32", "int8"],
        [(r["variant"], f"{r['float32_ms']:.3f}", f"{r['int8_ms']:.3f}") for r in confidence]))
    print(f"\nwrote {output}")
    print(json.dumps({"runtime_overhead": {r["exit"]: r["runtime_overhead"] for r in signatures},
                      "in_turn_overhead": {r["exit"]: r["in_turn_overhead"] for r in signatures},
                      "signatures_overhead": {r["exit"]: r["signatures_overhead"] for r in signatures},
                      "confidence_ms": next(r["int8_ms"] for r in confidence
                                            if r["variant"] == "edge_aware (library)")}))


if __name__ == "__main__":
    main()
