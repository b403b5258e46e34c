"""Run directories: checkpoints plus the config that built them.

A training run writes into one directory:
  run_config.json   {"network": NetworkConfig dict, "train": TrainConfig dict, "exits": [...], "init_from": ...}
  checkpoint, ckpt-<step>.*   tf.train.CheckpointManager files (model, optimiser, step)
  metrics.json      written at the end
  logs/             TensorBoard summaries

Every tool that takes a checkpoint accepts either the run directory (its latest checkpoint) or a
checkpoint prefix (RUN_DIR/ckpt-<step>), and rebuilds the network from run_config.json.
"""
import dataclasses
import os
import shutil

import tensorflow as tf

from mess_tf import io_utils, network, run_lock

RUN_CONFIG = "run_config.json"
# Fields of a network config that fix the shapes of the backbone and final-head weights; the input
# size may differ (the network is fully convolutional) and weight-file paths do not matter. A
# wrapped user model is fixed by its layers (copied by name, shapes checked) and its positions.
_WEIGHT_SHAPING_FIELDS = ("backbone.name", "backbone.output_stride", "backbone.alpha", "num_classes", "final_head")
_WRAPPED_WEIGHT_SHAPING_FIELDS = ("position_names", "num_classes", "input_size")


def resolve_checkpoint(path):
    """A run directory (-> its latest checkpoint) or a checkpoint prefix -> the checkpoint prefix.

    Raises:
      FileNotFoundError naming `path` and what was expected.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if not latest:
            raise FileNotFoundError(f"run directory {path} holds no checkpoint (no 'checkpoint' file written by "
                                    f"tools.train); pass a run directory or a prefix like RUN_DIR/ckpt-1000")
        return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"checkpoint not found: {path} (expected a run directory or a checkpoint prefix such as "
                            f"RUN_DIR/ckpt-1000, whose files are ckpt-1000.index and ckpt-1000.data-*)")


def read_run_config(path):
    """The run_config.json of a run directory or of the run a checkpoint prefix belongs to."""
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.fspath(path))
    return io_utils.read_json(os.path.join(run_dir, RUN_CONFIG), what="run config")


def write_run_config(run_dir, run_config):
    io_utils.write_json(os.path.join(run_dir, RUN_CONFIG), run_config)


def network_config(run_config):
    """The NetworkConfig of a run, without its pretrained-weights file (checkpoints supersede it),
    or the WrappedConfig of a run of a wrapped user model."""
    config = network.config_from_dict(run_config["network"])
    if isinstance(config, network.WrappedConfig):
        return config
    return dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, weights=None))


def restore_model(model, checkpoint):
    """Restores a model's weights (not the optimiser) from a training checkpoint.

    Raises:
      ValueError if the checkpoint lacks some of the model's variables.
    """
    status = tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(f"checkpoint {checkpoint} does not match the network built from its run config: {e}") from None


def load_network(checkpoint_or_run_dir):
    """Rebuilds a trained network (all its exits) and loads its weights.

    Args:
      checkpoint_or_run_dir: a run directory (its latest checkpoint) or a checkpoint prefix.

    Returns:
      (network.MultiExitNetwork, run_config dict).
    """
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir)
    run_config = read_run_config(checkpoint)
    net = network.build(network_config(run_config), run_config["exits"])
    restore_model(net.model, checkpoint)
    return net, run_config


def _field(d, dotted):
    for key in dotted.split("."):
        d = d[key]
    return d


def config_differences(old, new, fields=None):
    """["field: old -> new", ...] for the (dotted) fields of two nested dicts that differ."""
    def flatten(d, prefix=""):
        flat = {}
        for k, v in d.items():
            flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return flat

    if fields is not None:
        old, new = ({f: _field(d, f) for f in fields} for d in (old, new))
    old, new = flatten(old), flatten(new)
    return [f"{k}: {_as_json(old.get(k))!r} -> {_as_json(new.get(k))!r}" for k in sorted(set(old) | set(new))
            if _as_json(old.get(k)) != _as_json(new.get(k))]


def _as_json(value):
    return list(value) if isinstance(value, tuple) else value


def inherit_network(checkpoint_or_run_dir, given, num_classes):
    """The network of a run initialised from another: the source run's own, checked against what
    this run asks for.

    Args:
      checkpoint_or_run_dir: the source run (directory or checkpoint prefix).
      given: {dotted NetworkConfig field: value} of what the user set explicitly, e.g.
        {"backbone.alpha": 0.5, "input_size": (96, 96)}.
      num_classes: classes of this run's dataset.

    Returns:
      (the source's NetworkConfig or WrappedConfig, {dotted field: value} of what it supplied that
      was not given).

    Raises:
      ValueError naming every field that differs ("num_classes: source 11, dataset 12"), before
      anything is built: a class-count mismatch never reaches training as an out-of-range label.
    """
    config = network_config(read_run_config(resolve_checkpoint(checkpoint_or_run_dir)))
    source = config.to_dict()
    diffs = ([] if config.num_classes == num_classes
             else [f"num_classes: source {config.num_classes}, dataset {num_classes}"])
    for field, value in given.items():
        if isinstance(config, network.WrappedConfig) and field != "input_size":
            diffs.append(f"{field}: the source is a wrapped Keras model, which has none")
        elif _as_json(_field(source, field)) != _as_json(value):
            diffs.append(f"{field}: source {_as_json(_field(source, field))!r}, flag {_as_json(value)!r}")
    if diffs:
        raise ValueError(f"--init_from {checkpoint_or_run_dir}: the source network differs from this run's "
                         f"({'; '.join(diffs)})")
    inherited = {f: _as_json(_field(source, f)) for f in _INHERITED_FIELDS if f not in given and _has_field(source, f)}
    return config, inherited


_INHERITED_FIELDS = ("backbone.name", "backbone.alpha", "backbone.output_stride", "input_size", "final_head.kind",
                     "final_head.filters", "final_head.separable")


def _has_field(d, dotted):
    try:
        _field(d, dotted)
        return True
    except KeyError:
        return False


def init_from(net, checkpoint_or_run_dir):
    """Initialises `net` from another run's checkpoint, layer by layer by name.

    Every backbone and final-head layer of `net` must be in the source run, with the same shapes
    (e.g. stage 2 starting from stage 1); exit heads the source also has are copied too, the
    others keep their fresh initialisation.

    Returns:
      (checkpoint path used, names of the exit-head layers copied).

    Raises:
      ValueError if the source network's architecture is incompatible.
    """
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir)
    source_config = read_run_config(checkpoint)
    source, target = source_config["network"], net.config.to_dict()
    if source.get("kind") != target.get("kind"):
        raise ValueError(f"--init_from {checkpoint_or_run_dir}: one network is a wrapped Keras model, the other a "
                         f"built-in one")
    fields = _WRAPPED_WEIGHT_SHAPING_FIELDS if target.get("kind") == network.WRAPPED else _WEIGHT_SHAPING_FIELDS
    diffs = config_differences(source, target, fields)
    if diffs:
        raise ValueError(f"--init_from {checkpoint_or_run_dir}: its network is incompatible with this one "
                         f"({'; '.join(diffs)})")
    source_net = network.build(network_config(source_config), source_config["exits"])
    restore_model(source_net.model, checkpoint)
    source_layers = {layer.name: layer for layer in source_net.model.layers}
    copied = []
    for layer in net.model.layers:
        if not layer.weights:
            continue
        is_exit = layer.name.startswith("exit_")
        if layer.name not in source_layers:
            if is_exit:
                continue
            raise ValueError(f"--init_from {checkpoint_or_run_dir}: the source network has no layer {layer.name!r}")
        layer.set_weights(source_layers[layer.name].get_weights())
        if is_exit:
            copied.append(layer.name)
    return checkpoint, copied


USER_MODEL = "user_model.keras"


def wrap_run(model_path, position_names, run_dir, class_names=None):
    """Makes a run folder of a user's own Keras model, which every tool that takes a run reads.

    The folder gets a copy of the model file (USER_MODEL), a run_config.json whose network is its
    WrappedConfig (no early exits yet: train them with stage 2 from this run), and a checkpoint of
    its weights (ckpt-0). It is locked while written (run_lock) and must be new or empty: a run
    folder already there is never replaced. If writing fails, what was written is removed again.

    Args:
      model_path: a functional Keras model saved as .keras: images [B, H, W, 3] RGB 0..255 ->
        logits [B, h, w, classes].
      position_names: its layers whose outputs are candidate exit positions.
      run_dir: the run folder to write.
      class_names: optional class names for the exported metadata.

    Returns:
      network.MultiExitNetwork of the wrapped model (config.model_path: the copy in run_dir).

    Raises:
      ValueError or FileNotFoundError naming the model file, a position, the class names, or
      `run_dir` when it is not empty.
    """
    with run_lock.hold(run_dir):
        present = sorted(set(os.listdir(run_dir)) - {run_lock.LOCK_FILE})
        if present:
            raise ValueError(f"{run_dir} is not empty (it holds {', '.join(present[:3])}"
                             f"{', ...' if len(present) > 3 else ''}): wrap writes a new run folder and never "
                             f"replaces one; give a new or empty folder")
        try:
            return _write_wrap_run(model_path, position_names, run_dir, class_names)
        except BaseException:
            for name in set(os.listdir(run_dir)) - {run_lock.LOCK_FILE}:  # all of it written here, just now
                path = os.path.join(run_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            raise


def _write_wrap_run(model_path, position_names, run_dir, class_names):
    """wrap_run(), in an empty run folder this process holds."""
    copy = os.path.abspath(os.path.join(run_dir, USER_MODEL))
    net = network.MultiExitNetwork.wrap(network.load_user_model(model_path), position_names, model_path=copy)
    if class_names is not None and len(class_names) != net.config.num_classes:
        raise ValueError(f"{len(class_names)} class names given; {model_path} predicts {net.config.num_classes} "
                         f"classes")
    with open(model_path, "rb") as f:
        io_utils.write_bytes(copy, f.read())
    run_config = {"network": net.config.to_dict(), "train": None, "exits": [], "init_from": None,
                  "wrapped_from": os.path.abspath(model_path)}
    if class_names is not None:
        run_config["class_names"] = list(class_names)
    write_run_config(run_dir, run_config)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=net.model), run_dir, max_to_keep=1).save(checkpoint_number=0)
    return net
