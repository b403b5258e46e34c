"""TFLite conversion: network parts, complete configurations, and the staged deployable model.

Three kinds of artifact come from one trained MultiExitNetwork, each in float32, float16 or int8
(full-integer post-training quantisation, calibrated on caller-supplied images):

  * parts (`part_models` + `convert_parts`): each backbone segment between consecutive candidate
    positions, each exit head at each position, the final head. Latency tables time these.
  * an unstaged model of a configuration (`build_model(..., staged=False)`): one signature
    ("full") running every stage of the configuration back to back; the reference against which
    staging is measured.
  * the staged model (`build_model(..., staged=True)`, `export_staged_model`): ONE .tflite with a
    signature per stage (`stage_1` ... `stage_N`). Stage k takes what earlier stages computed
    (the image for k = 1), and returns the feature maps later stages need, exit k's class map
    (argmax, uint8 [1, H, W]) and, for early exits, its image confidence (float [1], computed in
    the graph by the exit policy, so an app reads one scalar per stage). Weights are stored once.
    A JSON file beside it (MODEL.tflite.json) records classes, input spec, stages, thresholds,
    mode, policy config, and the deployment and network configs it came from.

int8 hand-off between stages (DESIGN.md §5): calibration feeds stage k+1 the real outputs of the
float stage k, and feature maps are int8 at the signature boundaries. The converter then gives a
feature map the same scale and zero point on both sides of the boundary, so an app passes the
int8 bytes on as they are. `check_int8_handoff` verifies that on every converted model (scales
agree to float rounding; zero points exactly) and export fails if they do not.
"""
import dataclasses
import logging
import math

import numpy as np
import tensorflow as tf

from mess_tf import graph, io_utils, network, policy
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig
from mess_tf.keras_lib import keras
from mess_tf.latency import table

PRECISIONS = ("float32", "float16", "int8")
CLASS_MAP = "class_map"
CONFIDENCE = "confidence"
# Stage-model outputs that are the exit itself, not features handed to the next stage.
STAGE_EXIT_OUTPUTS = (network.EXIT_LOGITS, network.EXIT_COARSE_LOGITS)
FULL_SIGNATURE = "full"
METADATA_SUFFIX = ".json"
# Scales of one feature map on both sides of a stage boundary may differ by float rounding only.
SCALE_RTOL = 1e-5
DEFAULT_SIGNATURE = "serving_default"


def stage_signature(k):
    """Signature key of stage k (1-based)."""
    return f"stage_{k}"


def metadata_path(model_path):
    """Where the metadata JSON of a staged model lives: beside it, MODEL.tflite.json."""
    return str(model_path) + METADATA_SUFFIX


def _check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")


# -- the converter -------------------------------------------------------------------------------


def _convert(functions, variables, precision, representative_dataset=None):
    """Converts concrete functions into one .tflite, one signature per function.

    Args:
      functions: dict signature key -> tf ConcreteFunction.
      variables: every tf.Variable they capture. Only the variables are handed to the converter
        as the trackable object: handing it the Keras models makes it trace every layer while
        saving (about 6x slower).
      precision: one of PRECISIONS.
      representative_dataset: int8 only: a callable returning an iterator of
        (signature_key, {input_name: float32 array}) pairs.

    Returns:
      The .tflite flatbuffer (bytes).
    """
    _check_precision(precision)
    holder = tf.Module()
    holder.variables_to_keep = list(variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(list(functions.values()), holder)
    # The converter names a lone function's signature "serving_default" whatever its name.
    single_key = next(iter(functions)) if len(functions) == 1 else None
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if representative_dataset is None:
            raise ValueError("int8 conversion needs calibration images (a representative dataset)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = (
            representative_dataset if single_key is None else
            lambda: ((DEFAULT_SIGNATURE, feed) for _, feed in representative_dataset()))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    model_bytes = converter.convert()
    if single_key not in (None, DEFAULT_SIGNATURE):
        model_bytes = _rename_signature(model_bytes, single_key)
    return model_bytes


def _rename_signature(model_bytes, key):
    """Renames the only signature of a .tflite."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(model_bytes)
    model.signatureDefs[0].signatureKey = key.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _calibration_batches(images, input_size):
    """Calibration images as float32 [1, H, W, 3] arrays, checked against the network's input."""
    count = 0
    for image in images:
        image = np.asarray(image, np.float32)
        if image.ndim == 3:
            image = image[None]
        if image.shape[1:] != (*input_size, 3):
            raise ValueError(f"calibration image {count} has shape {image.shape[1:]}; "
                             f"expected {(*input_size, 3)} (RGB 0..255 at the network's input size)")
        for one in image:
            count += 1
            yield one[None]
    if count == 0:
        raise ValueError("calibration data is empty: int8 conversion needs at least one image")


def _signature_function(key, model, wrap_outputs):
    """A concrete function named `key` (the converter takes signature keys from function names),
    batch 1, calling `model` and post-processing its outputs."""
    inputs = model.input if isinstance(model.input, dict) else {"input": model.input}
    specs = {name: tf.TensorSpec([1, *t.shape[1:]], tf.float32, name=name) for name, t in inputs.items()}

    def call(features):
        feed = features if isinstance(model.input, dict) else features["input"]
        return wrap_outputs(model(feed, training=False))

    call.__name__ = key
    return tf.function(call, input_signature=[specs]).get_concrete_function()


# -- parts: segments, heads, final head ----------------------------------------------------------


def _input_like(tensor, name):
    return keras.Input(tensor.shape[1:], name=network._io_name(name))


def part_models(net, exit_ids=None):
    """Stand-alone Keras models of every part a latency table times, sharing the net's weights.

    Args:
      net: MultiExitNetwork.
      exit_ids: exits whose heads to include (default: all of net.exit_ids).

    Returns:
      dict keyed by latency.table.part_key, in depth order: "segment:<position>" -> model (features at the previous position, or
      the image [1, H, W, 3] RGB 0..255 for the first, -> features at <position>);
      "head:<exit id>" -> model (features at its position -> logits [1, H, W, classes]);
      "final_head" -> model (backbone output [and, for V3+, the decoder's low-level features]
      -> logits).
    """
    exit_ids = net.exit_ids if exit_ids is None else list(exit_ids)
    positions = net.backbone.positions
    parts, previous = {}, net.image
    for position in positions:
        source = keras.Input(previous.shape[1:], name="image" if previous is net.image else
                             network._io_name(graph.producer(previous).name))
        target = net.backbone.feature(position.name)
        parts[table.part_key(table.SEGMENT, position.name)] = keras.Model(
            source, graph.replay(target, [(previous, source)]), name=f"segment_{network._io_name(position.name)}")
        previous = target
    for eid in exit_ids:
        feature = net.backbone.feature(net.position_of(eid).name)
        source = _input_like(feature, net.position_of(eid).name)
        parts[table.part_key(table.HEAD, eid)] = keras.Model(source, graph.replay(net.logits(eid), [(feature, source)]),
                                           name="head_" + network._io_name(eid))
    parts[table.FINAL_HEAD] = _final_head_model(net)
    return parts


def _final_head_model(net):
    final = net.logits(FINAL_EXIT)
    cut = [net.backbone.model.output]
    if net.config.final_head.kind == "deeplabv3plus":
        cut.append(net.backbone.feature(net.backbone.decoder_position(net.config.final_head.decoder_position)))
    sources = {network._io_name(graph.producer(t).name): _input_like(t, graph.producer(t).name) for t in cut}
    feeds = list(zip(cut, sources.values()))
    return keras.Model(sources, graph.replay(final, feeds), name="final_head")


def _part_calibration(net, parts, images):
    """Per part, the list of its real inputs on the calibration images (feature dicts)."""
    names = {network._io_name(p.name): net.backbone.feature(p.name) for p in net.backbone.positions}
    features = keras.Model(net.image, names)
    per_part = {key: [] for key in parts}
    for image in _calibration_batches(images, net.config.input_size):
        available = {k: v.numpy() for k, v in features(image, training=False).items()}
        available["image"] = image
        for key, model in parts.items():
            feed_names = model.input.keys() if isinstance(model.input, dict) else [model.input.name.split(":")[0]]
            per_part[key].append({n: available[n] for n in feed_names})
    return per_part


def convert_model(model, precision, calibration_inputs=None, signature=DEFAULT_SIGNATURE):
    """Converts one Keras model (batch 1) into a .tflite with one signature.

    Args:
      model: keras Model with a tensor or a dict of named tensors as input.
      precision: one of PRECISIONS.
      calibration_inputs: int8 only: iterable of {input_name: float32 [1, ...] array}.
      signature: the signature key.

    Returns:
      The .tflite flatbuffer (bytes). Outputs are the model's outputs (raw logits / features).
    """
    def as_dict(outputs):
        return outputs if isinstance(outputs, dict) else {"output": outputs}

    function = _signature_function(signature, model, as_dict)
    dataset = None
    if precision == "int8":
        def dataset():
            for feed in calibration_inputs:
                if not isinstance(model.input, dict):  # a lone input is named "input" (_signature_function)
                    feed = {"input": next(iter(feed.values())) if isinstance(feed, dict) else feed}
                yield signature, feed
    return _convert({signature: function}, model.variables, precision, dataset)


def convert_parts(net, precision, calibration_images=None, exit_ids=None):
    """Converts every part of `net` (see part_models) to TFLite.

    Args:
      net: MultiExitNetwork.
      precision: one of PRECISIONS.
      calibration_images: int8 only: iterable of RGB 0..255 images [H, W, 3] (or [1, H, W, 3]).
      exit_ids: heads to convert (default all).

    Returns:
      dict part name (as in part_models) -> .tflite bytes.
    """
    _check_precision(precision)
    parts = part_models(net, exit_ids)
    calibration = {}
    if precision == "int8":
        if calibration_images is None:
            raise ValueError("int8 conversion needs calibration images")
        calibration = _part_calibration(net, parts, calibration_images)
    return {key: convert_model(model, precision, calibration.get(key)) for key, model in parts.items()}


# -- staged model of a configuration -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a staged model.

    Attributes:
      signature: signature key, `stage_<k>`.
      exit_id: the exit this stage ends with ("final" for the final exit).
      stride: output stride of the features the exit reads (for the policy's edge window).
      th_pix: pixel-confidence threshold; None for the final exit (it always exits).
      th_img: image-confidence threshold; None for the final exit.
      inputs: input names (what earlier stages computed; "image" for stage 1).
      features: feature-map output names (what later stages need).
    """

    signature: str
    exit_id: str
    stride: int
    th_pix: float
    th_img: float
    inputs: tuple
    features: tuple

    @property
    def is_early_exit(self):
        return self.exit_id != FINAL_EXIT


def _stages(net, config):
    """Keras stage models of `config` and their Stage descriptions."""
    ids = [e.exit_id for e in config.exits]
    models = net.stage_models(ids, truncate=(config.mode == "budgeted" and bool(ids)))
    choices = list(config.exits) + [None]
    stages = []
    for k, model in enumerate(models):
        choice = choices[k]
        eid = choice.exit_id if choice else FINAL_EXIT
        stride = net.position_of(eid).stride if choice else net.config.backbone.output_stride
        stages.append(Stage(stage_signature(k + 1), eid, stride,
                            choice.th_pix if choice else None, choice.th_img if choice else None,
                            tuple(model.input), tuple(n for n in model.output if n not in STAGE_EXIT_OUTPUTS)))
    return models, stages


def _exit_outputs(result, stage, policy_config, precision):
    """Exit k's class map (input resolution) and, for early exits, its image confidence, computed
    on the exit's coarse logits (its own output resolution, as in calibration)."""
    outputs = {CLASS_MAP: tf.cast(tf.argmax(result[network.EXIT_LOGITS], axis=-1), tf.uint8)}
    if stage.is_early_exit:
        confidence = policy.image_confidence_tf(result[network.EXIT_COARSE_LOGITS], stage.th_pix, stage.stride,
                                                policy_config)
        if precision == "int8":
            # A fraction in [0, 1]: pin its int8 range instead of trusting calibration to span it.
            confidence = tf.quantization.fake_quant_with_min_max_args(confidence, min=0.0, max=1.0)
        outputs[CONFIDENCE] = confidence
    return outputs


def _stage_functions(models, stages, policy_config, precision):
    def wrap(stage):
        def outputs(result):
            features = {n: v for n, v in result.items() if n not in STAGE_EXIT_OUTPUTS}
            return {**features, **_exit_outputs(result, stage, policy_config, precision)}
        return outputs

    return {s.signature: _signature_function(s.signature, m, wrap(s)) for m, s in zip(models, stages)}


def _full_function(models, stages, policy_config, precision):
    """One signature running every stage back to back: the unstaged model of a configuration.
    Outputs `<signature>_class_map` and `<signature>_confidence` per stage."""
    image = models[0].input["image"]
    spec = {"image": tf.TensorSpec([1, *image.shape[1:]], tf.float32, name="image")}

    def full(image):
        outputs, available = {}, dict(image)
        for model, stage in zip(models, stages):
            result = model({n: available[n] for n in stage.inputs}, training=False)
            for name, value in _exit_outputs(result, stage, policy_config, precision).items():
                outputs[f"{stage.signature}_{name}"] = value
            available.update({n: result[n] for n in stage.features})
        return outputs

    return tf.function(full, input_signature=[spec]).get_concrete_function()


def _stage_calibration(models, stages, images, input_size, signatures):
    """Representative dataset for staged conversion: each image runs through the float stages,
    and stage k+1 is fed stage k's real outputs."""
    batches = list(_calibration_batches(images, input_size))

    def dataset():
        for image in batches:
            available = {"image": image}
            for model, stage in zip(models, stages):
                feed = {n: available[n] for n in stage.inputs}
                if stage.signature in signatures:
                    yield stage.signature, feed
                result = model(feed, training=False)
                available.update({n: result[n].numpy() for n in stage.features})
            if FULL_SIGNATURE in signatures:
                yield FULL_SIGNATURE, {"image": image}
    return dataset


def build_model(net, config, precision, calibration_images=None, policy_config=None, staged=True):
    """Converts a deployment configuration of `net` into one .tflite.

    Args:
      net: MultiExitNetwork holding every exit of `config`.
      config: DeploymentConfig. "budgeted" gives one stage, truncated after its exit;
        "dynamic"/"anytime" give one stage per early exit plus a final stage.
      precision: one of PRECISIONS.
      calibration_images: int8 only: iterable of RGB 0..255 images [H, W, 3] (calibration split).
      policy_config: policy.PolicyConfig for the in-graph image confidence (default PolicyConfig()).
      staged: True: signatures stage_1..stage_N; False: one signature "full" running them all.

    Returns:
      (tflite bytes, list of Stage).
    """
    _check_precision(precision)
    if precision == "int8" and calibration_images is None:
        raise ValueError("int8 conversion needs calibration images (the calibration split)")
    policy_config = policy_config or policy.PolicyConfig()
    models, stages = _stages(net, config)
    if staged:
        functions = _stage_functions(models, stages, policy_config, precision)
    else:
        functions = {FULL_SIGNATURE: _full_function(models, stages, policy_config, precision)}
    dataset = None
    if precision == "int8":
        dataset = _stage_calibration(models, stages, calibration_images, net.config.input_size, set(functions))
    variables = {id(v): v for m in models for v in m.variables}
    model_bytes = _convert(functions, variables.values(), precision, dataset)
    if precision == "int8" and staged:
        check_int8_handoff(model_bytes, stages)
    return model_bytes, stages


def check_int8_handoff(model_bytes, stages):
    """Checks that every int8 feature map leaves the stage that computes it with the scale and
    zero point each later stage reads it with, so the app passes the int8 tensor on without
    requantising.

    Raises:
      ValueError naming the stages, tensor and both quantisation parameters otherwise.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    producers = {}  # feature name -> (signature, quantisation) of the stage that computes it
    for stage in stages:
        runner = interpreter.get_signature_runner(stage.signature)
        inputs = runner.get_input_details()
        for name in stage.inputs:
            if name == "image":
                continue
            if name not in producers or name not in inputs:
                raise ValueError(f"int8 hand-off -> {stage.signature}: feature map {name!r} is not an output of "
                                 f"an earlier stage and an input of this one")
            source, (out_scale, out_zero) = producers[name]
            in_scale, in_zero = inputs[name]["quantization"]
            if out_zero != in_zero or not math.isclose(out_scale, in_scale, rel_tol=SCALE_RTOL):
                raise ValueError(
                    f"int8 hand-off {source} -> {stage.signature}: feature map {name!r} leaves with "
                    f"(scale={out_scale}, zero_point={out_zero}) but is read with (scale={in_scale}, "
                    f"zero_point={in_zero}); the stages cannot pass int8 tensors on as they are")
        outputs = runner.get_output_details()
        producers.update({name: (stage.signature, outputs[name]["quantization"]) for name in stage.features})


def staged_metadata(net, config, precision, stages, policy_config=None, class_names=None):
    """The JSON-ready metadata of a staged model.

    Args:
      net: MultiExitNetwork the model was converted from.
      config: its DeploymentConfig.
      precision: one of PRECISIONS.
      stages: list of Stage (from build_model).
      policy_config: the policy.PolicyConfig baked into the confidences.
      class_names: optional list of num_classes names (default "class_<i>").

    Returns:
      dict with format, precision, mode, classes, input (size [H, W], dtype, range, channels),
      stages (signature, exit_id, stride, th_pix, th_img, inputs, features), policy,
      deployment (config.to_dict()), network (net.config.to_dict()).
    """
    num_classes = net.config.num_classes
    class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a network of {num_classes} classes")
    return {
        "format": "mess_tf.staged/1",
        "precision": precision,
        "mode": config.mode,
        "classes": class_names,
        "input": {"size": list(net.config.input_size), "channels": "RGB", "dtype": "float32",
                  "range": [0, 255], "batch": 1},
        "stages": [dataclasses.asdict(s) for s in stages],
        "policy": dataclasses.asdict(policy_config or policy.PolicyConfig()),
        "deployment": config.to_dict(),
        "network": net.config.to_dict(),
    }


def export_staged_model(path, net, config, precision, calibration_images=None, policy_config=None,
                        class_names=None):
    """Writes the staged .tflite of `config` to `path` and its metadata to `path`.json.

    Args: as build_model and staged_metadata.

    Returns:
      the metadata dict written.
    """
    policy_config = policy_config or policy.PolicyConfig()
    model_bytes, stages = build_model(net, config, precision, calibration_images, policy_config)
    metadata = staged_metadata(net, config, precision, stages, policy_config, class_names)
    io_utils.write_bytes(path, model_bytes)
    io_utils.write_json(metadata_path(path), metadata)
    logging.info("wrote %s (%d bytes, %d stages, %s)", path, len(model_bytes), len(stages), precision)
    return metadata


def copy_staged_model(source, path, config):
    """Writes the staged model at `source` to `path` as the model of `config`, which must deploy
    the same exits, thresholds and mode (only its provenance metadata may differ): converting it
    again would give the same bytes at the cost of a conversion.

    Returns:
      the metadata dict written.
    """
    metadata = io_utils.read_json(metadata_path(source), "staged-model metadata")
    old = DeploymentConfig.from_dict(metadata["deployment"])
    if old.fingerprint() != config.fingerprint():
        raise ValueError(f"{source} deploys {old.exit_ids} ({old.mode}), not the configuration given for {path}")
    with open(source, "rb") as f:
        io_utils.write_bytes(path, f.read())
    metadata["deployment"] = config.to_dict()
    io_utils.write_json(metadata_path(path), metadata)
    return metadata
