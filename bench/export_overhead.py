"""Staging overhead: size and latency of a staged .tflite vs the unstaged model of the same
configuration (one "full" signature running every stage), float32 and int8, on this host.

  python bench/export_overhead.py [--input_size=224 --alpha=1.0 --runs=50 --output=export_overhead.json]

Latency is the median wall time of running every stage of one image (the anytime path: the
worst case for staging, since every boundary is crossed), LiteRT interpreter, XNNPACK; the two
models are timed in alternation.
"""
import time

import numpy as np
from absl import app, flags

from mess_tf import backbones, deployment, export, heads, io_utils, network

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_size", 224, "Square input size.")
flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("runs", 50, "Timed runs (after 5 warm-up runs).")
flags.DEFINE_integer("num_threads", 1, "Interpreter threads.")
flags.DEFINE_string("output", "export_overhead.json", "JSON results.")

EXITS = ("block_3_project_BN:fcn_w32_b0", "block_6_project_BN:fcn_w64_b1", "block_13_project_BN:fcn_w64_b1")


def chain(model_bytes, signatures, num_threads):
    """A callable running `signatures` in order on one image, each stage fed the previous one's
    feature outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes, num_threads=num_threads)
    runners = [interpreter.get_signature_runner(s) for s in signatures]
    dtype = runners[0].get_input_details()["image"]["dtype"]

    def run(image):
        feed = {"image": image.astype(dtype)}
        for runner in runners:
            outputs = runner(**feed)
            feed = {n: v for n, v in outputs.items() if n not in (export.CLASS_MAP, export.CONFIDENCE)}
    return run


def median_ms(runs_by_name, image, runs):
    """Median ms per callable, timed in alternation so that load from other processes hits all alike."""
    times = {name: [] for name in runs_by_name}
    for run in range(runs + 5):
        for name, fn in runs_by_name.items():
            start = time.perf_counter()
            fn(image)
            if run >= 5:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv):
    del argv
    size = (FLAGS.input_size, FLAGS.input_size)
    config = network.NetworkConfig(backbones.BackboneConfig("mobilenet_v2", 16, FLAGS.alpha, None), 21, size,
                                   heads.FinalHeadConfig(filters=256, separable=True))
    net = network.MultiExitNetwork(config, EXITS)
    deploy = deployment.DeploymentConfig(
        "dynamic", [deployment.ExitChoice(*e.split(":"), th_pix=0.9, th_img=0.9) for e in EXITS])
    rng = np.random.RandomState(0)
    calibration = rng.uniform(0, 255, (8, *size, 3)).astype(np.float32)
    image = np.clip(rng.uniform(0, 255, (1, *size, 3)), 0, 127).astype(np.float32)
    rows = []
    for precision in ("float32", "int8"):
        staged, stages = export.build_model(net, deploy, precision, calibration)
        unstaged, _ = export.build_model(net, deploy, precision, calibration, staged=False)
        ms = median_ms({"staged": chain(staged, [s.signature for s in stages], FLAGS.num_threads),
                        "unstaged": chain(unstaged, [export.FULL_SIGNATURE], FLAGS.num_threads)}, image, FLAGS.runs)
        staged_ms, unstaged_ms = ms["staged"], ms["unstaged"]
        rows.append({"precision": precision, "stages": len(stages), "staged_bytes": len(staged),
                     "unstaged_bytes": len(unstaged), "staged_ms": staged_ms, "unstaged_ms": unstaged_ms,
                     "size_overhead": len(staged) / len(unstaged) - 1, "latency_overhead": staged_ms / unstaged_ms - 1})
    print(f"MobileNetV2 alpha={FLAGS.alpha} {size[0]}x{size[1]}, {len(EXITS)} early exits, "
          f"{FLAGS.num_threads} thread(s), median of {FLAGS.runs} runs")
    print(f"{'precision':<10}{'staged KB':>11}{'unstaged KB':>13}{'size +%':>9}{'staged ms':>11}"
          f"{'unstaged ms':>13}{'latency +%':>12}")
    for r in rows:
        print(f"{r['precision']:<10}{r['staged_bytes'] / 1024:>11.0f}{r['unstaged_bytes'] / 1024:>13.0f}"
              f"{100 * r['size_overhead']:>9.1f}{r['staged_ms']:>11.2f}{r['unstaged_ms']:>13.2f}"
              f"{100 * r['latency_overhead']:>12.1f}")
    io_utils.write_json(FLAGS.output, {"input_size": list(size), "alpha": FLAGS.alpha, "exits": list(EXITS),
                                       "num_threads": FLAGS.num_threads, "runs": FLAGS.runs, "rows": rows})


if __name__ == "__main__":
    app.run(main)
