"""Trained networks shipped in the repository: the user's trained DeepLab that `make demo` converts.

MESS converts a segmentation network that has already learned its task. Training the demo's
EfficientNet-Lite0 DeepLab that far takes hours on a 2-core CPU, longer than `make demo` may take,
so it is trained once (`python -m tools.train_demo_baseline`) and shipped in `trained/<name>/`:

  weights.npz   every weight by `<layer name>/<index>`: kernels float16, vectors (biases, batch-norm
                parameters and statistics) float32. Read with allow_pickle=False: no code runs.
  record.json   how it was made and what it scored: network config, training config and metrics
                (the validation curve included), the command, validation and test mIoU of the
                weights as stored (after rounding to float16).

`import_run` turns a shipped network into an ordinary run folder (TF checkpoint + run_config.json),
so stage 1 starts from it as from any trained baseline.
"""
import os

import numpy as np
import tensorflow as tf

from mess_tf import checkpoints, io_utils, network, training

TRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trained")
WEIGHTS, RECORD = "weights.npz", "record.json"


def folder(name):
    """trained/<name>."""
    return os.path.join(TRAINED_DIR, name)


def _arrays(model):
    """{`layer/index`: weight} with kernels in float16 and vectors in float32."""
    arrays = {}
    for layer in model.layers:
        for i, weight in enumerate(layer.weights):
            value = weight.numpy()
            arrays[f"{layer.name}/{i}"] = value.astype(np.float16 if value.ndim >= 2 else np.float32)
    return arrays


def round_weights(model):
    """Rounds `model`'s weights as `save` stores them, so what is scored is what ships."""
    set_weights(model, _arrays(model), "rounded weights")


def save(path, model, record):
    """Writes `model`'s weights (rounded as above) and `record` (a JSON-able dict) to folder `path`."""
    io_utils.save_npz(os.path.join(path, WEIGHTS), **_arrays(model))
    io_utils.write_json(os.path.join(path, RECORD), record)


def read_record(path):
    """The record.json of a shipped network folder."""
    return io_utils.read_json(os.path.join(path, RECORD), "shipped network record")


def set_weights(model, arrays, source):
    """Sets every weight of `model` from {`layer/index`: array}.

    Raises:
      ValueError naming `source` and the first weight missing, extra or of another shape.
    """
    unused = set(arrays)
    for layer in model.layers:
        values = []
        for i, weight in enumerate(layer.weights):
            key = f"{layer.name}/{i}"
            if key not in arrays:
                raise ValueError(f"{source} has no weight {key!r} ({weight.name}); was it saved from another network?")
            if tuple(arrays[key].shape) != tuple(weight.shape):
                raise ValueError(f"{source}: weight {key!r} has shape {tuple(arrays[key].shape)}, the network's "
                                 f"{weight.name} has {tuple(weight.shape)}")
            values.append(arrays[key].astype(np.float32))
            unused.discard(key)
        if values:
            layer.set_weights(values)
    if unused:
        raise ValueError(f"{source} holds {len(unused)} weights the network lacks, e.g. {sorted(unused)[0]!r}")


def load_network(path, input_size=None):
    """The shipped network in folder `path`, built (at `input_size`, default its own) with its weights.

    Returns:
      (network.MultiExitNetwork, record dict).
    """
    record = read_record(path)
    config = checkpoints.network_config({"network": record["network"]})
    if input_size is not None:
        config = network.NetworkConfig.from_dict({**config.to_dict(), "input_size": tuple(input_size)})
    net = network.MultiExitNetwork(config, record.get("exits", []))
    weights_path = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"shipped weights not found: {weights_path}")
    set_weights(net.model, io_utils.read_npz(weights_path, "shipped weights"), weights_path)
    return net, record


def import_run(path, run_dir):
    """Writes the shipped network of folder `path` as a run folder (a checkpoint at its step, its
    run_config.json and metrics.json), as tools.train would have left it.

    Returns:
      the checkpoint prefix written.
    """
    net, record = load_network(path)
    checkpoints.write_run_config(run_dir, {"network": record["network"], "train": record["train"],
                                           "exits": record.get("exits", []), "init_from": record.get("init_from")})
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=net.model), run_dir, max_to_keep=1)
    prefix = manager.save(checkpoint_number=record["train"]["steps"])
    io_utils.write_json(os.path.join(run_dir, training.METRICS), record["metrics"])
    return prefix
