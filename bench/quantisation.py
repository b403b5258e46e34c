"""What int8 costs in mIoU: float, post-training int8 and quantisation-aware int8, for the final exit
and one early exit of a demo run's MESS network, on its test split.

  * float: the Keras network;
  * PTQ int8: full-integer post-training quantisation (calibrated on the calibration split), one
    unstaged model with both exits' class maps;
  * QAT int8: a copy with tensorflow-model-optimization's fake quantisation, its activation
    ranges set on 20 training batches (qat.calibrate_ranges), fine-tuned for --qat_steps steps on
    the training crops, then converted the same way. tfmot cannot
    fake-quantise dilated convolutions (an upstream limit), so those train in float and are
    quantised after training, as in PTQ; the README says how many there are.
For reference, TF Model Garden's DeepLabV3 MobileNetV2 (PASCAL VOC, 512x512): fp32 75.30, PTQ int8
73.95, QAT int8 74.68 mIoU.

  python bench/quantisation.py [--run_dir=runs/demo] [--preset=default] [--qat_steps=200]

Writes bench/results/quantisation.{md,json}.
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

import mess_cli  # noqa: E402
from mess_tf import (  # noqa: E402
    checkpoints,
    experiment,
    export,
    io_utils,
    metrics,
    network,
    provenance,
    qat,
    report,
    runtime,
    training,
)
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "A demo run (its missing steps are run).")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The demo preset of that run.")
flags.DEFINE_integer("qat_steps", 200, "Quantisation-aware fine-tuning steps.", lower_bound=1)
flags.DEFINE_float("qat_learning_rate", 1e-4, "Quantisation-aware fine-tuning rate (AdamW).")
flags.DEFINE_string("results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Where the markdown and JSON tables go.")
OUTPUTS = ("exit", "final")  # signature output names ([A-Za-z0-9_]) of the early exit and the final exit


def early_exit(exp):
    """The first exit of the run's no_loss deployment, or the deepest head at the first position."""
    exits = DeploymentConfig.load(exp.path("configs", "no_loss.json")).exit_ids[:-1]
    return exits[0] if exits else f"{exp.exit_positions()[0]}:{exp.preset.exit_heads[-1]}"


def class_maps(eid):
    """Signature outputs: the argmax of both exits' logits, uint8 [1, H, W]."""
    return lambda outputs: {name: tf.cast(tf.argmax(outputs[key], -1), tf.uint8)
                            for name, key in zip(OUTPUTS, (eid, FINAL_EXIT))}


def tflite_miou(model_bytes, images, labels, num_classes):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model_bytes, num_threads=2).get_signature_runner()
    detail = runner.get_input_details()["input"]
    matrices = {name: metrics.ConfusionMatrix(num_classes) for name in OUTPUTS}
    for image, label in zip(images, labels):
        outputs = runner(input=runtime.quantise(image[None], detail))
        for name in OUTPUTS:
            matrices[name].update(outputs[name][0], label)
    return {name: 100 * m.miou() for name, m in matrices.items()}


def keras_miou(model, eid, images, labels, num_classes):
    miou = training.evaluate(model, tf.data.Dataset.from_tensor_slices((images, labels)).batch(8), num_classes)
    return {name: 100 * miou[key] for name, key in zip(OUTPUTS, (eid, FINAL_EXIT))}


def main(argv):
    del argv
    started = time.time()
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=lambda line: print(line, flush=True))
    exp.run()
    net, eid = exp.load("stage2"), early_exit(exp)
    _, test_images, test_labels = exp.split_arrays("test")
    _, calibration_images, _ = exp.split_arrays("calibration")
    representative = [image[None] for image in calibration_images[:exp.preset.quantization_images]]
    classes = net.config.num_classes
    model = net.subset_model([eid])
    rows = {"float": keras_miou(model, eid, test_images, test_labels, classes)}
    exp.progress(f"  float: {rows['float']}")
    ptq = export.convert_model(model, "int8", representative, outputs=class_maps(eid))
    rows["PTQ int8"] = tflite_miou(ptq, test_images, test_labels, classes)
    exp.progress(f"  PTQ int8: {rows['PTQ int8']}")

    # QAT trains at the crop size; a twin at the input size takes its weights for conversion.
    crop_net = network.MultiExitNetwork(dataclasses.replace(net.config, input_size=exp.crop_size()), net.exit_ids)
    checkpoints.restore_model(crop_net.model, checkpoints.resolve_checkpoint(exp.path("stage2")))
    trainable = qat.quantize_aware(crop_net.subset_model([eid]), net.config.backbone.name)
    float_layers = sum(qat.is_dilated(layer) for layer in crop_net.model.layers)
    batches = iter(exp.train_batches())
    qat.calibrate_ranges(trainable, batches)
    losses = qat.fine_tune(trainable, batches, FLAGS.qat_steps, FLAGS.qat_learning_rate)
    exp.progress(f"  QAT: {FLAGS.qat_steps} steps, loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")
    deployed = qat.quantize_aware(model, net.config.backbone.name)
    deployed.set_weights(trainable.get_weights())
    rows["QAT int8 (fine-tuned)"] = tflite_miou(export.convert_model(deployed, "int8", representative,
                                                                     outputs=class_maps(eid)),
                                                test_images, test_labels, classes)
    exp.progress(f"  QAT int8: {rows['QAT int8 (fine-tuned)']}")
    table = [{"variant": name, f"exit {eid}": v["exit"], "final": v["final"],
              "exit drop (pp)": rows["float"]["exit"] - v["exit"],
              "final drop (pp)": rows["float"]["final"] - v["final"]}
             for name, v in rows.items()]
    markdown = (f"## What int8 costs (test split, {len(test_images)} images; mIoU %)\n\n"
                + report.markdown_table(table, list(table[0]), {c: ".2f" for c in table[0] if c != "variant"})
                + f"\n\nQAT: {FLAGS.qat_steps} steps of AdamW at {FLAGS.qat_learning_rate:g} on "
                  f"{exp.crop_size()[0]}x{exp.crop_size()[1]} crops, batch {exp.preset.batch_size}; "
                  f"{float_layers} dilated convolutions train unquantised (tfmot cannot fake-quantise them). "
                  f"({time.time() - started:.0f} s)\n")
    print(markdown)
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with io_utils.atomic_open(os.path.join(FLAGS.results_dir, "quantisation.md")) as f:
        f.write(markdown)
    io_utils.write_json(os.path.join(FLAGS.results_dir, "quantisation.json"),
                        {"exit": eid, "rows": table, "qat_steps": FLAGS.qat_steps, "qat_losses": losses,
                         "dilated_float_layers": float_layers,
                         "measured": provenance.measured_on()})


if __name__ == "__main__":
    mess_cli.run(main)
