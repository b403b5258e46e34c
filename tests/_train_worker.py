"""Shared by the training tests: a tiny network, a seeded synthetic dataset, and a subprocess entry
point for the kill -9 resume test and the two-worker test.

  python tests/_train_worker.py OUTPUT_DIR WEIGHTS_NPZ [--hang_after=STEP]

runs TRAIN_CONFIG (under MultiWorkerMirroredStrategy when TF_CONFIG is set) and saves every
weight of the network (batch-norm statistics included) to WEIGHTS_NPZ. With --hang_after it
prints "HANG" once that step's checkpoint is written and sleeps, waiting to be killed.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mess_tf import backbones, heads, network, training  # noqa: E402

NUM_CLASSES = 3
SIZE = 32
EXITS = ("block_2_add:fcn_w8_b0", "block_5_add:fcn_w8_b0")
TRAIN_CONFIG = training.TrainConfig(stage="stage1", steps=6, batch_size=4, learning_rate=0.05, exits=EXITS,
                                    checkpoint_every=2, log_every=1, eval_batches=0, seed=3)


def tiny_network_config():
    return network.NetworkConfig(backbone=backbones.BackboneConfig("mobilenet_v2", output_stride=16, alpha=0.35),
                                 num_classes=NUM_CLASSES, input_size=(SIZE, SIZE),
                                 final_head=heads.FinalHeadConfig("deeplabv3", filters=16, separable=True))


def synthetic_dataset(batch_size, num_images=16, seed=0, repeat=True):
    """Seeded images of class-coloured rectangles on noise; labels uint8 with an ignored border.

    Returns:
      tf.data of (images float32 [B, SIZE, SIZE, 3] in 0..255, labels uint8 [B, SIZE, SIZE]).
    """
    rng = np.random.default_rng(seed)
    colours = np.array([[40, 40, 40], [220, 60, 60], [60, 60, 220]], np.float32)
    labels = np.zeros((num_images, SIZE, SIZE), np.uint8)
    for label in labels:
        for cls in range(1, NUM_CLASSES):
            y, x = rng.integers(0, SIZE // 2, 2)
            h, w = rng.integers(SIZE // 4, SIZE // 2, 2)
            label[y:y + h, x:x + w] = cls
        label[0, :] = 255
    images = colours[np.minimum(labels, NUM_CLASSES - 1)] + rng.normal(0, 20, (num_images, SIZE, SIZE, 3))
    dataset = tf.data.Dataset.from_tensor_slices((np.clip(images, 0, 255).astype(np.float32), labels))
    return (dataset.repeat() if repeat else dataset).batch(batch_size, drop_remainder=True)


def network_weights(net):
    """{index-prefixed weight name: value} of every weight, trainable or not."""
    return {f"{i:04d}_{w.name}": w.numpy() for i, w in enumerate(net.model.weights)}


def main(output_dir, weights_path, hang_after=None):
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else None

    def progress(record):
        if hang_after is not None and record.step >= hang_after:
            print("HANG", flush=True)
            time.sleep(600)

    result = training.train(tiny_network_config(), TRAIN_CONFIG, synthetic_dataset(TRAIN_CONFIG.batch_size),
                            output_dir, strategy=strategy, progress=progress)
    np.savez(weights_path, **network_weights(result.network))


if __name__ == "__main__":
    hang = [int(a.split("=")[1]) for a in sys.argv[3:] if a.startswith("--hang_after=")]
    main(sys.argv[1], sys.argv[2], hang[0] if hang else None)
