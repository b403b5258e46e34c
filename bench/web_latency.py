"""Each signature's latency in the browser (LiteRT.js, WebAssembly, 1 thread) beside ai-edge-litert
(1 thread) on the same machine, for the baseline and a dynamic model of the demo run.

  make web            # once: exports the demo's models into runs/web (then Ctrl-C)
  python bench/web_latency.py [--models_dir=runs/web] [--models=baseline,no_loss] [--runs=30]

Both runtimes time the same .tflite, each signature fed its real inputs on one test image (the
stages chained), median of --runs runs after a warm-up. The two runtimes and the models take
turns, round after round (--rounds), so drift of the host hits them alike; a figure is the median
over rounds. Prints a table and writes bench/results/web_latency.json.
"""
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mess_tf import export, io_utils, provenance, runtime, web  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("models_dir", "runs/web", "Models exported for the page (tools.web / `make web`).")
flags.DEFINE_list("models", ["baseline", "no_loss"], "Model names (baseline and a dynamic model).")
flags.DEFINE_list("precisions", ["int8", "float32"], "Precisions (int8: the uint8-boundary export).")
flags.DEFINE_integer("runs", 30, "Timed runs per signature and round.")
flags.DEFINE_integer("rounds", 3, "Rounds; the runtimes and models take turns in each.")
flags.DEFINE_string("out", "bench/results/web_latency.json", "JSON output.")


def litert_times(path, image, runs):
    """{signature: median ms} with ai-edge-litert, 1 thread, each signature fed its real inputs."""
    from ai_edge_litert.interpreter import Interpreter

    model = runtime.StagedModel.load(path, num_threads=1)
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    runners = {key: interpreter.get_signature_runner(key) for key in interpreter.get_signature_list()}
    available = {"image": runtime.quantise(image[None],
                                           runners[model.stages[0].signature].get_input_details()["image"])}
    feeds = {}
    for stage in model.stages:
        feeds[stage.signature] = {name: available[name] for name in stage.inputs}
        available.update(runners[stage.signature](**feeds[stage.signature]))
        if stage.class_map_signature:
            feeds[stage.class_map_signature] = {export.COARSE_LOGITS: available[export.COARSE_LOGITS]}
    times = {}
    for key, inputs in feeds.items():
        runners[key](**inputs)  # warm-up
        ms = []
        for _ in range(runs):
            start = time.perf_counter()
            runners[key](**inputs)
            ms.append((time.perf_counter() - start) * 1e3)
        times[key] = statistics.median(ms)
    return times


def main(argv):
    del argv
    index = io_utils.read_json(os.path.join(FLAGS.models_dir, web.INDEX), "page index (run `make web` first)")
    image_name = index["images"][0]
    image = np.asarray(Image.open(os.path.join(FLAGS.models_dir, "images", image_name)).convert("RGB"), np.float32)
    names = [f"{m}_{p}" for m in FLAGS.models for p in FLAGS.precisions]
    samples = {(name, runtime_name): [] for name in names for runtime_name in ("browser", "litert")}
    with web.serve(FLAGS.models_dir) as url, web.Page(url) as page:
        for round_index in range(FLAGS.rounds):
            for name in names:
                if page.load_model(f"models/{name}.tflite") is None:
                    raise ValueError(f"{name}: {page.status()['text']}")
                samples[name, "browser"].append(page.time_signatures(f"models/images/{image_name}", FLAGS.runs))
                samples[name, "litert"].append(litert_times(os.path.join(FLAGS.models_dir, f"{name}.tflite"), image,
                                                            FLAGS.runs))
            print(f"round {round_index + 1}/{FLAGS.rounds} done", flush=True)
    rows = []
    for name in names:
        for key in samples[name, "litert"][0]:
            browser = statistics.median(s[key] for s in samples[name, "browser"])
            litert = statistics.median(s[key] for s in samples[name, "litert"])
            rows.append({"model": name, "signature": key, "browser_ms": browser, "litert_ms": litert,
                         "ratio": browser / litert})
    print(f"\nimage {image_name}; median of {FLAGS.runs} runs, median over {FLAGS.rounds} rounds\n")
    print("| model | signature | browser WASM 1 thread (ms) | ai-edge-litert 1 thread (ms) | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['signature']} | {row['browser_ms']:.2f} | {row['litert_ms']:.2f} | "
              f"{row['ratio']:.2f}x |")
    io_utils.write_json(FLAGS.out, {"image": image_name, "runs": FLAGS.runs, "rounds": FLAGS.rounds, "rows": rows,
                                    "measured": provenance.measured_on()})
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
