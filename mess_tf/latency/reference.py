"""The reference network of the host latency studies, the models they compare it with, and
their timing.

bench/latency_model.py, bench/control_breakdown.py and bench/table_repeatability.py time one
network: a DeepLabV3 (random weights: latency does not depend on them) with EXIT_HEAD exits at
the candidate positions nearest EXIT_DEPTHS of the backbone's MACs, int8 models calibrated on
random images. Models compared with each other are timed taking turns (`alternate`), so that load
from other processes hits them alike. Latencies are in ms.
"""
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from mess_tf import backbones, deployment, export, heads, network, runtime
from mess_tf.keras_lib import keras, layers
from mess_tf.latency import host
from mess_tf.latency import table as table_lib

EXIT_HEAD = "fcn_w32_b1"
EXIT_DEPTHS = (0.25, 0.5, 0.75)  # fractions of the backbone's MACs
NUM_CLASSES = 21
CALIBRATION_IMAGES = 4
WARMUP_RUNS = 25
# Timed calls in a row per model and round. Each model's first call in a round finds its
# weights evicted by the models timed before it; such cold calls made the sum of 24 part models
# 25-30% slower than the staged models built from the same layers.
BLOCK = 4
# The deployed precision: the studies' composition, control and headline staging overhead use it.
DEPLOYED = "int8"
PRECISIONS = ("float32", "int8")


def alternate(calls, rounds):
    """Times callables taking turns (host.alternate): a block of BLOCK timed calls of each, after
    one untimed call, round after round, so that each is timed with its weights and buffers in
    cache, as in an app segmenting frame after frame, while load from other processes hits all
    alike.

    Args:
      calls: dict name -> callable taking no arguments.
      rounds: timed rounds (after WARMUP_RUNS untimed calls of each).

    Returns:
      dict name -> table.Timing (ms per call).
    """
    config = host.HostTimingConfig(warmup_runs=WARMUP_RUNS, num_runs=rounds * BLOCK, block_runs=BLOCK)
    return {name: table_lib.Timing.from_samples(t) for name, t in host.alternate(calls, config).items()}


def interpreter(model, threads):
    """A LiteRT interpreter of .tflite bytes `model` on `threads` CPU threads (XNNPACK)."""
    return Interpreter(model_content=model, num_threads=threads)


def network_config(backbone, alpha, size):
    """A DeepLabV3 on `backbone` (output stride 16, random weights) at `size` (H, W) pixels."""
    return network.NetworkConfig(backbones.BackboneConfig(backbone, 16, alpha, None), NUM_CLASSES, size,
                                 heads.FinalHeadConfig(filters=256, separable=True))


def mess_network(backbone, alpha, size):
    """The reference MESS network on `backbone` (width `alpha`, input `size` (H, W) pixels) with
    EXIT_HEAD exits at EXIT_DEPTHS -> (MultiExitNetwork, exit ids, configurations(exit ids))."""
    config = network_config(backbone, alpha, size)
    positions = exit_positions(backbones.Backbone(config.backbone, size))
    exit_ids = [deployment.exit_id(p.name, EXIT_HEAD) for p in positions]
    return network.MultiExitNetwork(config, exit_ids), exit_ids, configurations(exit_ids)


def exit_positions(backbone):
    """The candidate positions nearest EXIT_DEPTHS of the backbone's MACs, in depth order."""
    total = backbone.positions[-1].cumulative_macs
    nearest = [min(backbone.positions, key=lambda p: abs(p.cumulative_macs / total - depth)) for depth in EXIT_DEPTHS]
    if len({p.name for p in nearest}) != len(nearest):
        raise ValueError(f"exit depths {EXIT_DEPTHS} map to repeated positions {[p.name for p in nearest]}")
    return nearest


def configurations(exit_ids):
    """name -> DeploymentConfig: budgeted at each exit, dynamic with the first 1..N exits."""
    choices = [deployment.ExitChoice(*e.split(":"), th_pix=0.9, th_img=0.9) for e in exit_ids]
    configs = {f"budgeted@{k + 1}": deployment.DeploymentConfig("budgeted", [c]) for k, c in enumerate(choices)}
    configs.update({f"dynamic x{k}": deployment.DeploymentConfig("dynamic", choices[:k])
                    for k in range(1, len(choices) + 1)})
    return configs


def random_images(count, size, seed=0):
    """`count` float32 images [H, W, 3] of uniform noise in 0..255, `size` = (H, W)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 255, (*size, 3)).astype(np.float32) for _ in range(count)]


def static_models(net, exit_ids, precision, calibration):
    """Per exit k (and the final exit): a single-signature .tflite computing the layers a dynamic
    image leaving at k runs, without confidences: the coarse logits of exits 1..k-1 and exit k's
    class map.

    Returns:
      list of .tflite bytes aligned with exit_ids + ["final"].
    """
    argmax = layers.Lambda(lambda logits: tf.cast(tf.argmax(logits, axis=-1), tf.uint8))
    models = []
    for k, eid in enumerate(list(exit_ids) + [deployment.FINAL_EXIT]):
        outputs = {f"coarse_logits_{i}": net.coarse_logits(e) for i, e in enumerate(exit_ids[:k])}
        model = keras.Model(net.image, {**outputs, "class_map": argmax(net.logits(eid))})
        models.append(export.convert_model(model, precision, [image[None] for image in calibration]))
    return models


def forced_exit(k, num_early_exits):
    """th_img making a dynamic model leave at exit k (0-based; num_early_exits: the final one):
    confidences lie in [0, 1], so threshold 0 always exits and +inf never does."""
    return [0.0 if i == k else float("inf") for i in range(num_early_exits)]


def static_call(model_bytes, image, threads):
    """A callable running a single-signature model on a float image, quantised on the way in
    as the runtime quantises it, so that both sides of a comparison pay the same for it."""
    runner = interpreter(model_bytes, threads).get_signature_runner()
    (input_name, detail), = runner.get_input_details().items()
    return lambda: runner(**{input_name: runtime.quantise(image[None], detail)})
