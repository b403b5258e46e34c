"""What uint8 signature boundaries (export integer_io="uint8", for LiteRT.js) cost against today's
int8 hand-off, in latency and accuracy, on a demo run's test split.

  python bench/integer_io.py [--run_dir=runs/demo] [--models=baseline,no_loss]

Each model is exported twice from the run's checkpoint (int8 inside; int8 or uint8 tensors at the
signature boundaries) and both run every test image with runtime.StagedModel (ai-edge-litert,
1 thread), taking turns image by image in a rotating order. Prints a table (mIoU, mean latency,
the ratio, and how many images got another exit or class map) and writes
bench/results/integer_io.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mess_tf import experiment, export, io_utils, metrics, provenance, runtime  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "A finished run of tools.demo (`make demo`).")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The run's preset.")
flags.DEFINE_list("models", ["baseline", "no_loss"], "Models of the run (a baseline and a dynamic model).")
flags.DEFINE_string("models_dir", "runs/integer_io", "Where the exported models go (reused when there).")
flags.DEFINE_string("out", "bench/results/integer_io.json", "JSON output.")


def main(argv):
    del argv
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset)
    deployments = exp.deployments()
    calibration = list(exp.split_arrays("calibration")[1][:exp.preset.quantization_images])
    paths = {}
    for name in FLAGS.models:
        stage, config = deployments[name]
        for integer_io in export.INTEGER_IO:
            path = paths[name, integer_io] = os.path.join(FLAGS.models_dir, f"{name}_{integer_io}_io.tflite")
            if not os.path.exists(export.metadata_path(path)):
                export.export_staged_model(path, exp.load(stage), config, "int8", calibration,
                                           policy_config=exp.policy(), integer_io=integer_io)
    _, images, labels = exp.split_arrays("test")
    keys = list(paths)
    models = {key: runtime.StagedModel.load(path, num_threads=1) for key, path in paths.items()}
    matrices = {key: metrics.ConfusionMatrix(exp.dataset().info.num_classes) for key in keys}
    times, results = {key: [] for key in keys}, {key: [] for key in keys}
    for i, key, result in runtime.in_turns(models, images):
        matrices[key].update(result.class_map, labels[i])
        times[key].append(result.total_ms)
        results[key].append(result)
    rows = []
    for name in FLAGS.models:
        int8, uint8 = results[name, "int8"], results[name, "uint8"]
        rows.append({
            "model": name,
            "miou_int8_io": matrices[name, "int8"].miou(), "miou_uint8_io": matrices[name, "uint8"].miou(),
            "ms_int8_io": float(np.mean(times[name, "int8"])), "ms_uint8_io": float(np.mean(times[name, "uint8"])),
            "images_other_exit": sum(a.exit_index != b.exit_index for a, b in zip(int8, uint8)),
            "images_other_class_map": sum(not np.array_equal(a.class_map, b.class_map) for a, b in zip(int8, uint8)),
            "images_other_confidence": sum(a.confidences != b.confidences for a, b in zip(int8, uint8)),
            "size_int8_io": os.path.getsize(paths[name, "int8"]),
            "size_uint8_io": os.path.getsize(paths[name, "uint8"]),
        })
    print(f"\n{len(images)} test images, ai-edge-litert 1 thread, the four models taking turns\n")
    print("| model | mIoU int8 I/O | mIoU uint8 I/O | ms int8 I/O | ms uint8 I/O | uint8 / int8 | "
          "images with another exit / class map / confidence | bytes int8 I/O | bytes uint8 I/O |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {100 * r['miou_int8_io']:.2f} | {100 * r['miou_uint8_io']:.2f} | "
              f"{r['ms_int8_io']:.2f} | "
              f"{r['ms_uint8_io']:.2f} | {r['ms_uint8_io'] / r['ms_int8_io']:.3f} | {r['images_other_exit']} / "
              f"{r['images_other_class_map']} / {r['images_other_confidence']} | {r['size_int8_io']} | "
              f"{r['size_uint8_io']} |")
    io_utils.write_json(FLAGS.out, {"images": len(images), "rows": rows,
                                "measured": provenance.measured_on()})
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
