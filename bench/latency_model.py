"""Host latency model of the deployable MESS network: how well latency tables compose, and what
staging, dynamic-exit control and int8 cost on this machine (LiteRT interpreter, XNNPACK).

The network (mess_tf.latency.reference): a MobileNetV2 DeepLabV3 (random weights: latency does not
depend on them) with three early exits `fcn_w32_b1` at the candidate positions nearest 25/50/75% of
the backbone's MACs. int8 models are full-integer, calibrated on random images.

  1. composition (int8): a LatencyTable of every part (export.convert_parts) composes each
     configuration's latency (CostTable.worst); the staged model of the configuration, every
     stage run, is the measured side. Parts and staged models are timed in one alternation.
     Configurations: budgeted (truncated) at each exit; dynamic with the first 1, 2, 3 exits,
     run to the final exit (the worst case: the exits passed compute their confidence but no
     class map; the table's head parts end at the confidence, its class-map parts are
     charged only where an image leaves).
  2. staging: the staged model of the 3-exit dynamic configuration (one signature per stage,
     every stage chained, every exit's class-map signature run) vs its unstaged model (one
     signature running them all, every class map): size and latency, float32 and int8.
  3. dynamic control (int8): the staged model run by mess_tf.runtime, forced to leave at exit k
     (in-graph confidence, thresholds checked in Python, feature maps handed between
     signatures, exit k's class map from its own signature) vs a static single-signature model
     of the same layers (backbone to exit k, the heads of exits 1..k-1 to their coarse logits,
     exit k's class map; no confidence); with the default edge-aware policy, with top-1
     confidence only (no edge smoothing), and with the default policy decided at stride 8 at
     most (PolicyConfig.confidence_stride); for the MobileNetV2 network above and for the same
     network on ResNet-50 (--control_backbones). The confidence costs about the same per exit
     pixel on any backbone, so its share is largest on the smallest network.
  4. float32 vs int8 latency of each backbone's single-exit DeepLab network.

Models compared with each other are timed in alternation (a block of A, a block of B, a block of
A, ...: `alternate`), so that load from other processes hits them alike; the figures quoted are
ratios of medians.

    python bench/latency_model.py [--alpha=0.5 --input_size=160 --rounds=30 --threads=1]
                                  [--control_backbones=mobilenet_v2,resnet50]

Prints markdown tables, writes bench/results/latency_model.json, and prints, last, a JSON line
with `median_composition_error` (vs the staged models), `staging_size_overhead`,
`staging_latency_overhead` (int8), `dynamic_control_overhead` (MobileNetV2, median over exits,
default policy) and `dynamic_control_overhead_<backbone>` for the other control backbones, each a
fraction.
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mess_tf import backbones, deployment, export, network, policy, provenance, report, runtime  # noqa: E402
from mess_tf.io_utils import write_json  # noqa: E402
from mess_tf.keras_lib import keras  # noqa: E402
from mess_tf.latency import host, reference  # noqa: E402
from mess_tf.latency import table as table_lib  # noqa: E402

# -- timing ------------------------------------------------------------------------------------


def chained(model, stages, threads):
    """A callable running every stage of one model in order on one image, each fed the feature
    maps earlier ones returned, and every early exit's class-map signature (what the app does
    for the anytime path). `stages`: export.Stage list."""
    loaded = reference.interpreter(model, threads)
    runners = [(s, loaded.get_signature_runner(s.signature),
                s.class_map_signature and loaded.get_signature_runner(s.class_map_signature)) for s in stages]
    image = host.random_inputs(runners[0][1].get_input_details())

    def run():
        available = dict(image)
        for stage, runner, class_map in runners:
            outputs = runner(**{n: available[n] for n in stage.inputs})
            if class_map:
                class_map(**{export.COARSE_LOGITS: outputs[export.COARSE_LOGITS]})
            available.update({n: outputs[n] for n in stage.features})
    return run




# -- 1. composition ----------------------------------------------------------------------------


def composition(net, configs, precision, folder, calibration, threads, rounds):
    """Times every part of `net` and the staged model of each configuration (every stage run, no
    early class map: the worst case) in one alternation, so that both sides of the comparison
    see the same load; the parts' timings make a LatencyTable that composes the configurations.

    Returns:
      (LatencyTable, dict name -> staged model path, list of (name, config, Timing) for
      host.composition_errors).
    """
    parts = export.convert_parts(net, precision, calibration)
    calls = {key: host.signature_calls(model, None, threads) for key, model in parts.items()}
    paths = {}
    for name, config in configs.items():
        paths[name] = os.path.join(folder, f"{name.replace(' ', '_').replace('@', '_')}_{precision}.tflite")
        metadata = export.export_staged_model(paths[name], net, config, precision, calibration)
        calls[name] = host.signature_calls(paths[name], [s["signature"] for s in metadata["stages"]], threads)
    timings = reference.alternate(calls, rounds)
    table = table_lib.LatencyTable(table_lib.TableKey(host.host_device(), precision, threads, net.config.input_size),
                                   [p.name for p in net.backbone.positions],
                                   metadata={"tool": "bench/latency_model.py", "notes": "random weights"})
    for key in parts:
        table.set(key, table_lib.PartLatency.from_timing(timings[key]))
    return table, paths, [(name, config, timings[name]) for name, config in configs.items()]


# -- 2. staging overhead -----------------------------------------------------------------------


def staging(net, config, precision, calibration, threads, rounds):
    """Size and latency of the staged model vs the unstaged model of `config` (every stage run)."""
    staged, stages = export.build_model(net, config, precision, calibration)
    unstaged, _ = export.build_model(net, config, precision, calibration, staged=False)
    ms = reference.alternate({"staged": chained(staged, stages, threads),
                    "unstaged": host.signature_calls(unstaged, [export.FULL_SIGNATURE], threads)}, rounds)
    return {"precision": precision, "stages": len(stages), "staged_bytes": len(staged), "unstaged_bytes": len(unstaged),
            "staged_ms": ms["staged"].median_ms, "unstaged_ms": ms["unstaged"].median_ms,
            "size_overhead": len(staged) / len(unstaged) - 1,
            "latency_overhead": ms["staged"].median_ms / ms["unstaged"].median_ms - 1}


# -- 3. dynamic-exit control overhead ----------------------------------------------------------


def control(dynamic_paths, statics, exit_ids, input_size, threads, rounds):
    """Per exit k: the runtime running each dynamic staged model, forced to leave at k, vs the
    static model of the same layers, timed in alternation. All take the same float image and
    quantise it on the way in.

    Args:
      dynamic_paths: dict policy name -> staged model path of the same configuration.
      statics: static .tflite bytes per exit (reference.static_models).

    Returns:
      list of rows: exit, static_ms, and per policy `<policy>_ms` and `<policy>_overhead`.
    """
    dynamic = {name: runtime.StagedModel.load(path, num_threads=threads) for name, path in dynamic_paths.items()}
    image = reference.random_images(1, input_size, seed=1)[0]
    rows = []
    for k, (eid, static_bytes) in enumerate(zip(list(exit_ids) + [deployment.FINAL_EXIT], statics)):
        th_img = reference.forced_exit(k, len(exit_ids))
        for name, model in dynamic.items():
            if model.run(image, "dynamic", th_img).exit_index != k:
                raise RuntimeError(f"{name}: thresholds {th_img} did not force exit {k}")
        calls = {name: lambda model=model: model.run(image, "dynamic", th_img) for name, model in dynamic.items()}
        calls["static"] = reference.static_call(static_bytes, image, threads)
        ms = reference.alternate(calls, rounds)
        row = {"exit": eid, "static_ms": ms["static"].median_ms}
        for name in dynamic:
            row[f"{name}_ms"] = ms[name].median_ms
            row[f"{name}_overhead"] = ms[name].median_ms / ms["static"].median_ms - 1
        rows.append(row)
    return rows


# The policies of the control study: the default, top-1 confidence only, and the default decided
# at stride 8 at most (a stride-4 exit's logits pooled 2x2 first).
CONTROL_POLICIES = {"edge_aware": policy.PolicyConfig(), "top1": policy.PolicyConfig(edge_smoothing=False),
                    "edge_aware_stride8": policy.PolicyConfig(confidence_stride=8)}


def control_study(net, exit_ids, dynamic_config, calibration, folder, threads, rounds, edge_aware_path=None):
    """The control rows of one network: its dynamic staged model with each of CONTROL_POLICIES
    (the default one exported here unless `edge_aware_path` is given) vs the static models of
    each exit."""
    paths = {}
    for name, policy_config in CONTROL_POLICIES.items():
        paths[name] = edge_aware_path if name == "edge_aware" else None
        if paths[name] is None:
            paths[name] = os.path.join(folder, f"control_{net.config.backbone.name}_{name}_{reference.DEPLOYED}.tflite")
            export.export_staged_model(paths[name], net, dynamic_config, reference.DEPLOYED, calibration, policy_config)
    return control(paths, reference.static_models(net, exit_ids, reference.DEPLOYED, calibration), exit_ids,
                   net.config.input_size, threads, rounds)


def median_overhead(rows, policy_name):
    """Median over exits of a control study's overhead (a fraction) with one policy."""
    return float(np.median([r[f"{policy_name}_overhead"] for r in rows]))


# -- 4. float32 vs int8 per backbone -----------------------------------------------------------


def backbone_precisions(input_size, threads, rounds):
    """float32 and int8 latency of each backbone's single-exit DeepLab network (output stride 16)."""
    rows = []
    calibration = reference.random_images(reference.CALIBRATION_IMAGES, input_size, seed=2)
    for name in backbones.BACKBONES:
        keras.backend.clear_session()
        model = network.MultiExitNetwork(reference.network_config(name, 1.0, input_size)).single_exit_model()
        calls = {}
        for precision in reference.PRECISIONS:
            runner = reference.interpreter(export.convert_model(model, precision, [im[None] for im in calibration]),
                                 threads).get_signature_runner()
            inputs = host.random_inputs(runner.get_input_details())
            calls[precision] = lambda runner=runner, inputs=inputs: runner(**inputs)
        ms = reference.alternate(calls, rounds)
        rows.append({"backbone": name, "float32_ms": ms["float32"].median_ms, "int8_ms": ms["int8"].median_ms,
                     "int8_speedup": ms["float32"].median_ms / ms["int8"].median_ms})
    return rows


# -- report ------------------------------------------------------------------------------------


def composition_row(check):
    return (check.name, f"{check.composed_ms:.2f}", f"{check.measured_ms:.2f}", f"{100 * check.error:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.5, help="MobileNetV2 width multiplier.")
    parser.add_argument("--input_size", type=int, default=160, help="Square input size (pixels) of the MESS network.")
    parser.add_argument("--backbone_input_size", type=int, default=128, help="Square input size of the backbone sweep.")
    parser.add_argument("--threads", type=int, default=1, help="Interpreter threads.")
    parser.add_argument("--rounds", type=int, default=30, help="Timed rounds of each alternation.")
    parser.add_argument("--backbone_rounds", type=int, default=10, help="Timed rounds per backbone.")
    parser.add_argument("--control_backbones", default="mobilenet_v2,resnet50",
                        help="Backbones of the dynamic-control study (MobileNetV2 at --alpha, others at width 1).")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "results", "latency_model.json"))
    args = parser.parse_args()
    started = time.time()
    size = (args.input_size,) * 2
    net, exit_ids, configs = reference.mess_network("mobilenet_v2", args.alpha, size)
    dynamic_name = f"dynamic x{len(exit_ids)}"
    calibration = reference.random_images(reference.CALIBRATION_IMAGES, size)
    with tempfile.TemporaryDirectory() as folder:
        table, paths, measured = composition(net, configs, reference.DEPLOYED, folder, calibration, args.threads,
                                             args.rounds)
        checks, median_error = host.composition_errors(table, measured)
        control_rows = {"mobilenet_v2": control_study(net, exit_ids, configs[dynamic_name], calibration, folder,
                                                      args.threads, args.rounds, paths[dynamic_name])}
        for name in args.control_backbones.split(","):
            if name and name != "mobilenet_v2":
                other, other_exits, other_configs = reference.mess_network(name, 1.0, size)
                control_rows[name] = control_study(other, other_exits, other_configs[dynamic_name], calibration,
                                                   folder, args.threads, args.rounds)
    staging_rows = [staging(net, configs[dynamic_name], precision, calibration, args.threads, args.rounds)
                    for precision in reference.PRECISIONS]
    backbone_rows = backbone_precisions((args.backbone_input_size,) * 2, args.threads, args.backbone_rounds)
    deployed_staging = next(r for r in staging_rows if r["precision"] == reference.DEPLOYED)
    summary = {
        "median_composition_error": median_error,
        "staging_size_overhead": deployed_staging["size_overhead"],
        "staging_latency_overhead": deployed_staging["latency_overhead"],
        "dynamic_control_overhead": median_overhead(control_rows["mobilenet_v2"], "edge_aware"),
        **{f"dynamic_control_overhead_{name}": median_overhead(rows, "edge_aware")
           for name, rows in control_rows.items() if name != "mobilenet_v2"},
    }
    results = {
        "measured": provenance.measured_on(),
        "network": net.config.to_dict(), "exits": exit_ids, "precision": reference.DEPLOYED, "threads": args.threads,
        "rounds": args.rounds, "device": host.host_device(), "runtime": host.runtime_version(),
        "table": table.to_dict(),
        "composition": [dataclasses.asdict(c) | {"error": c.error} for c in checks],
        "control": control_rows,
        "median_control_overhead": {name: {p: median_overhead(rows, p) for p in CONTROL_POLICIES}
                                    for name, rows in control_rows.items()},
        "staging": staging_rows, "backbones": backbone_rows, "seconds": time.time() - started, "summary": summary,
    }
    write_json(args.output, results)

    print(f"MobileNetV2 alpha={args.alpha} {size[0]}x{size[1]}, exits {exit_ids}, {reference.DEPLOYED}, "
          f"{args.threads} thread(s), {host.runtime_version()}, XNNPACK; {results['seconds']:.0f} s")
    deployed = reference.DEPLOYED
    print(report.markdown_section(
        f"Composition: latency table vs staged models, every stage run (median ms, {deployed})",
        ["measured model", "composed ms", "measured ms", "error %"], [composition_row(c) for c in checks]))
    for name, rows in control_rows.items():
        print(report.markdown_section(
            f"Dynamic control, {name}: runtime + {dynamic_name} staged model leaving at exit k vs a static model of "
            f"the same layers ({deployed}), per policy (CONTROL_POLICIES)",
            ["exit", "static ms"] + [f"{p} {unit}" for p in CONTROL_POLICIES for unit in ("ms", "+%")],
            [[r["exit"], f"{r['static_ms']:.2f}"]
             + [v for p in CONTROL_POLICIES for v in (f"{r[f'{p}_ms']:.2f}", f"{100 * r[f'{p}_overhead']:.1f}")]
             for r in rows]))
    print(report.markdown_section(
        f"Staging: staged vs unstaged model, {dynamic_name}, every stage run",
        ["precision", "stages", "staged KB", "unstaged KB", "size +%", "staged ms", "unstaged ms", "latency +%"],
        [(r["precision"], r["stages"], f"{r['staged_bytes'] / 1024:.0f}", f"{r['unstaged_bytes'] / 1024:.0f}",
          f"{100 * r['size_overhead']:.2f}", f"{r['staged_ms']:.2f}", f"{r['unstaged_ms']:.2f}",
          f"{100 * r['latency_overhead']:.1f}") for r in staging_rows]))
    size_label = f"{args.backbone_input_size}x{args.backbone_input_size}"
    print(report.markdown_section(
        f"float32 vs int8, single-exit DeepLab, {size_label}, output stride 16",
        ["backbone", "float32 ms", "int8 ms", "int8 speed-up"],
        [(r["backbone"], f"{r['float32_ms']:.2f}", f"{r['int8_ms']:.2f}", f"{r['int8_speedup']:.2f}x")
         for r in backbone_rows]))
    print(f"\nwrote {args.output}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
