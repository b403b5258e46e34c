"""TFLite conversion: network parts, complete configurations, and the staged deployable model.

Three kinds of artifact come from one trained MultiExitNetwork, each in float32, float16 or int8
(full-integer post-training quantisation, calibrated on caller-supplied images):

  * parts (`part_models` + `convert_parts`): each backbone segment between consecutive candidate
    positions, each exit head at each position (to its image confidence), the class map of an
    exit at each position, the final head. Latency tables time these.
  * an unstaged model of a configuration (`build_model(..., staged=False)`): one signature
    ("full") running every stage of the configuration back to back; the reference against which
    staging is measured.
  * the staged model (`build_model(..., staged=True)`, `export_staged_model`): ONE .tflite with a
    signature per stage (`stage_1` ... `stage_N`). Stage k takes what earlier stages computed
    (the image for k = 1), and returns the feature maps later stages need and, for early exits,
    its image confidence (float [1], computed in the graph by the exit policy, so an app reads
    one scalar per stage). The final stage returns its class map (argmax, uint8 [1, H, W], or
    [1, H / s, W / s] with policy class_map_stride s, which the app upsamples). An
    early exit k of a dynamic/anytime model returns its coarse logits instead, and signature
    `class_map_k` turns them into its class map: an app runs it only for an image that leaves
    there, so an image passing an exit does not pay for upsampling logits it never shows (at
    128x128 and 11 classes that was a fifth of a MobileNetV2 stage on the host). A budgeted
    model's one stage returns its class map itself. Weights are stored once.
    A JSON file beside it (MODEL.tflite.json) records classes, input spec, stages, thresholds,
    mode, policy config, and the deployment and network configs it came from.

int8 hand-off between stages (DESIGN.md §5): calibration feeds stage k+1 the real outputs of the
float stage k, and feature maps are int8 at the signature boundaries. The converter then gives a
feature map the same scale and zero point on both sides of the boundary, so an app passes the
int8 bytes on as they are. `check_int8_handoff` verifies that on every converted model (scales
agree to float rounding; zero points exactly) and export fails if they do not.

`integer_io="uint8"` puts uint8 tensors at the signature boundaries of an int8 model instead
(the converter adds one requantise op per boundary tensor, zero point + 128, same scale; inside,
the model is the same int8 model): for runtimes without int8 tensors, such as LiteRT.js. The
hand-off check holds for it as for int8.
"""
import dataclasses
import logging
import math
import warnings
from typing import Optional

import numpy as np
import tensorflow as tf

from mess_tf import checkpoints, graph, io_utils, network, policy
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig
from mess_tf.keras_lib import keras
from mess_tf.latency import table

PRECISIONS = ("float32", "float16", "int8")
# Tensor type at the signature boundaries of an int8 model; LiteRT.js has no int8 tensors.
INTEGER_IO = ("int8", "uint8")
CLASS_MAP = "class_map"
CONFIDENCE = "confidence"
# An early exit's logits at its own resolution: an output of its stage, the input of its class map.
COARSE_LOGITS = "coarse_logits"
# Stage-model outputs that are the exit itself, not features handed to the next stage.
STAGE_EXIT_OUTPUTS = (network.EXIT_LOGITS, network.EXIT_COARSE_LOGITS)
FULL_SIGNATURE = "full"
METADATA_SUFFIX = ".json"
# /3 added `signatures` (every boundary tensor's dtype, shape and quantisation).
METADATA_FORMAT = "mess_tf.staged/3"
# Scales of one feature map on both sides of a stage boundary may differ by float rounding only.
SCALE_RTOL = 1e-5
DEFAULT_SIGNATURE = "serving_default"


def stage_signature(k):
    """Signature key of stage k (1-based)."""
    return f"stage_{k}"


def class_map_signature(k):
    """Signature key of early exit k's class map (1-based), run only when an image leaves there."""
    return f"class_map_{k}"


def metadata_path(model_path):
    """Where the metadata JSON of a staged model lives: beside it, MODEL.tflite.json."""
    return str(model_path) + METADATA_SUFFIX


def _check_precision(precision, integer_io="int8"):
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if integer_io not in INTEGER_IO:
        raise ValueError(f"integer_io {integer_io!r} is not one of {INTEGER_IO}")


# -- the converter -------------------------------------------------------------------------------


def _convert(functions, variables, precision, representative_dataset=None, integer_io="int8"):
    """Converts concrete functions into one .tflite, one signature per function.

    Args:
      functions: dict signature key -> tf ConcreteFunction.
      variables: every tf.Variable they capture. Only the variables are handed to the converter
        as the trackable object: handing it the Keras models makes it trace every layer while
        saving (about 6x slower).
      precision: one of PRECISIONS.
      representative_dataset: int8 only: a callable returning an iterator of
        (signature_key, {input_name: float32 array}) pairs.
      integer_io: int8 only: one of INTEGER_IO, the type of every float input and output.

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
        converter.inference_input_type = converter.inference_output_type = tf.as_dtype(integer_io)
    with warnings.catch_warnings():
        # The converter itself calibrates int8 with the deprecated tf.lite.Interpreter; we run
        # models with ai_edge_litert. Its deprecation notice is about TF's code, not ours.
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
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


# -- exit outputs: what an app reads ------------------------------------------------------------


def class_map_size(input_size, policy_config):
    """(H, W) of the class maps a model outputs: the input size / policy_config.class_map_stride."""
    stride = policy_config.class_map_stride
    if input_size[0] % stride or input_size[1] % stride:
        raise ValueError(f"class_map_stride={stride} does not divide the input size {input_size[0]}x{input_size[1]}")
    return input_size[0] // stride, input_size[1] // stride


def _class_map(coarse_logits, size):
    """An exit's coarse logits [1, h, w, C] -> uint8 [1, H', W'] class indices: the logits resized
    bilinearly to `size` (at the input size, exactly what the exit's own upsampling layer does),
    then their argmax."""
    return tf.cast(tf.argmax(tf.image.resize(coarse_logits, size, method="bilinear"), axis=-1), tf.uint8)


def upsample_class_map(class_map, stride):
    """uint8 [..., H', W'] class indices -> [..., H' * stride, W' * stride] by nearest neighbour:
    what an app does with a map exported at class_map_stride > 1 (on its GPU, for free)."""
    if stride == 1:
        return class_map
    return np.repeat(np.repeat(class_map, stride, axis=-2), stride, axis=-1)


def _confidence(coarse_logits, th_pix, stride, policy_config, precision):
    """Image confidence [1] (or [1, P] for P thresholds th_pix) of an exit from its coarse logits
    (its own output resolution, as in calibration), computed in the graph by the exit policy."""
    confidence = policy.image_confidence_tf(coarse_logits, th_pix, stride, policy_config)
    if precision == "int8":
        # A fraction in [0, 1]: pin its int8 range instead of trusting calibration to span it.
        confidence = tf.quantization.fake_quant_with_min_max_args(confidence, min=0.0, max=1.0)
    return confidence


# -- parts: segments, heads, class maps, final head -----------------------------------------------

# th_pix of the confidence in timed head parts: its value does not change the work done.
PROFILE_TH_PIX = 0.5


def _input_like(tensor, name):
    return keras.Input(tensor.shape[1:], name=network._io_name(name))


def _class_map_model(net, eid):
    """The model of exit `eid`'s class-map signature: its coarse logits {COARSE_LOGITS: [1, h, w, C]},
    passed on as they are; the signature's outputs (`_class_map`) resize them and take the argmax."""
    source = keras.Input(net.coarse_logits(eid).shape[1:], name=COARSE_LOGITS)
    return keras.Model({COARSE_LOGITS: source}, source, name="class_map_" + network._io_name(eid))


def _class_map_outputs(size):
    """The outputs callable of a signature ending at a class map, from coarse logits:
    {CLASS_MAP: uint8 [1, H', W']} at `size`."""
    return lambda coarse_logits: {CLASS_MAP: _class_map(coarse_logits, size)}


def segment_positions(net, exit_ids):
    """The positions where part segments end for `exit_ids`: every exit's position, those the final
    head reads (the backbone output; the decoder's in V3+), in depth order. Between them a segment has no other exit to
    serve, so cutting there only adds conversions and timing noise."""
    wanted = {net.position_of(e).name for e in exit_ids} | set(net.final_head_positions())
    return [p for p in net.backbone.positions if p.name in wanted]


def _parts(net, exit_ids, positions=None):
    """Part key -> (Keras model, {model input name: the net's tensor that feeds it}); segments end
    at `positions` (default every candidate position)."""
    positions = net.backbone.positions if positions is None else positions
    parts, previous = {}, net.image
    for position in positions:
        name = "image" if previous is net.image else network._io_name(graph.producer(previous).name)
        source = keras.Input(previous.shape[1:], name=name)
        target = net.backbone.feature(position.name)
        parts[table.part_key(table.SEGMENT, position.name)] = (
            keras.Model(source, graph.replay(target, [(previous, source)]),
                        name=f"segment_{network._io_name(position.name)}"), {name: previous})
        previous = target
    for eid in exit_ids:
        feature = net.backbone.feature(net.position_of(eid).name)
        source = _input_like(feature, net.position_of(eid).name)
        parts[table.part_key(table.HEAD, eid)] = (
            keras.Model(source, graph.replay(net.coarse_logits(eid), [(feature, source)]),
                        name="head_" + network._io_name(eid)), {network._io_name(net.position_of(eid).name): feature})
    for position, eid in class_map_exits(net, exit_ids).items():
        parts[table.part_key(table.CLASS_MAP, position)] = (_class_map_model(net, eid),
                                                            {COARSE_LOGITS: net.coarse_logits(eid)})
    parts[table.FINAL_HEAD] = _final_head_part(net)
    return parts


def part_sources(net, exit_ids, positions=None):
    """Where each part's inputs come from, to chain converted parts as the network runs.

    Returns:
      {part key: {input name: "image" or the key of the segment part whose output it is}} for the
      segments, heads and the final head of _parts(net, exit_ids, positions); a class map's input
      is the coarse logits of a head at its position.
    """
    parts = _parts(net, exit_ids, positions)
    segment_of = {id(net.image): "image"}
    for key in parts:
        if table.parse_part_key(key)[0] == table.SEGMENT:
            segment_of[id(net.backbone.feature(table.parse_part_key(key)[1]))] = key
    return {key: {name: segment_of[id(tensor)] for name, tensor in feeds.items()}
            for key, (_, feeds) in parts.items() if table.parse_part_key(key)[0] != table.CLASS_MAP}


def class_map_exits(net, exit_ids):
    """Position name -> one exit there: every head at a position gives coarse logits of the same
    shape, upsampled the same way, so one class-map part per position times them all.

    Raises:
      ValueError: two exits at one position give coarse logits of different shapes.
    """
    exits = {}
    for eid in exit_ids:
        position = net.position_of(eid).name
        first = exits.setdefault(position, eid)
        if net.coarse_logits(eid).shape != net.coarse_logits(first).shape:
            raise ValueError(f"exits {first} and {eid} at one position give coarse logits of different shapes "
                             f"{net.coarse_logits(first).shape} and {net.coarse_logits(eid).shape}")
    return exits


def part_models(net, exit_ids=None, positions=None):
    """Stand-alone Keras models of every part a latency table times, sharing the net's weights.

    Args:
      net: MultiExitNetwork.
      exit_ids: exits whose heads to include (default: all of net.exit_ids).
      positions: Positions where segments end (default every candidate position; see
        segment_positions for the fewest a set of exits needs).

    Returns:
      dict keyed by latency.table.part_key, in depth order:
      "segment:<position>" -> model (features at the previous position, or the image
        [1, H, W, 3] RGB 0..255 for the first, -> features at <position>);
      "head:<exit id>" -> model (features at its position -> coarse logits [1, h, w, classes]);
      "class_map:<position>" -> model ({COARSE_LOGITS: coarse logits of an exit there}, passed on
        as they are);
      "final_head" -> model (backbone output, and the features of any earlier position the head
        reads: V3+'s decoder, a wrapped model's skip -> its coarse logits [1, h, w, classes]).
      convert_parts adds what a staged model computes at each: the image confidence after a head,
      the class map (bilinear resize to the class-map size, argmax) after a class map and after
      the final head.
    """
    exit_ids = net.exit_ids if exit_ids is None else list(exit_ids)
    return {key: model for key, (model, _) in _parts(net, exit_ids, positions).items()}


def _final_head_part(net):
    final = net.coarse_logits(FINAL_EXIT)
    *skipped, last = net.final_head_positions()
    cut = [net.backbone.feature(p) for p in [last] + skipped]
    sources = {network._io_name(graph.producer(t).name): _input_like(t, graph.producer(t).name) for t in cut}
    feeds = list(zip(cut, sources.values()))
    return keras.Model(sources, graph.replay(final, feeds), name="final_head"), dict(zip(sources, cut))


def _part_calibration(net, parts, images):
    """Per part, the list of its real inputs on the calibration images ({input name: array})."""
    tensors = {f"{key}/{name}": tensor for key, (_, feeds) in parts.items() for name, tensor in feeds.items()}
    tensors = {k: t for k, t in tensors.items() if t is not net.image}
    features = keras.Model(net.image, tensors)
    per_part = {key: [] for key in parts}
    for image in _calibration_batches(images, net.backbone.input_size):
        available = {k: v.numpy() for k, v in features(image, training=False).items()}
        for key, (_, feeds) in parts.items():
            per_part[key].append({name: image if tensor is net.image else available[f"{key}/{name}"]
                                  for name, tensor in feeds.items()})
    return per_part


def convert_model(model, precision, calibration_inputs=None, signature=DEFAULT_SIGNATURE, outputs=None):
    """Converts one Keras model (batch 1) into a .tflite with one signature.

    Args:
      model: keras Model with a tensor or a dict of named tensors as input.
      precision: one of PRECISIONS.
      calibration_inputs: int8 only: iterable of {input_name: float32 [1, ...] array}.
      signature: the signature key.
      outputs: callable from the model's outputs to the signature's {name: tensor} (default: the
        model's outputs as they are, a lone one named "output").

    Returns:
      The .tflite flatbuffer (bytes).
    """
    def as_dict(result):
        return result if isinstance(result, dict) else {"output": result}

    function = _signature_function(signature, model, outputs or as_dict)
    dataset = None
    if precision == "int8":
        def dataset():
            for feed in calibration_inputs:
                if not isinstance(model.input, dict):  # a lone input is named "input" (_signature_function)
                    feed = {"input": next(iter(feed.values())) if isinstance(feed, dict) else feed}
                yield signature, feed
    return _convert({signature: function}, model.variables, precision, dataset)


def _part_outputs(net, key, precision, policy_config, th_pix=PROFILE_TH_PIX):
    """What a staged model computes after part `key`, as a convert_model `outputs` callable: a
    head's coarse logits and image confidence (at th_pix: a float, or a grid of them), a class
    map's or the final head's argmax."""
    kind, name = table.parse_part_key(key)
    if kind == table.HEAD:
        stride = net.position_of(name).stride

        def head(coarse):
            return {COARSE_LOGITS: coarse, CONFIDENCE: _confidence(coarse, th_pix, stride, policy_config, precision)}
        return head
    if kind in (table.CLASS_MAP, table.FINAL_HEAD):
        return _class_map_outputs(class_map_size(net.backbone.input_size, policy_config))
    return None


def convert_parts(net, precision, calibration_images=None, exit_ids=None, policy_config=None, positions=None,
                  th_pix_grid=None, keys=None):
    """Converts every part of `net` (see part_models) to TFLite, each with what a staged model
    computes after it: heads end at their image confidence, class maps and the final head at the
    argmax.

    Args:
      net: MultiExitNetwork.
      precision: one of PRECISIONS.
      calibration_images: int8 only: iterable of RGB 0..255 images [H, W, 3] (or [1, H, W, 3]).
      exit_ids: heads to convert (default all).
      policy_config: policy.PolicyConfig of the heads' confidences (default PolicyConfig()).
      positions: where segments end (see part_models).
      th_pix_grid: None: heads output one confidence, as timed (PROFILE_TH_PIX). A grid of P
        pixel thresholds: heads output the confidence at each, [1, P], computed as a deployed
        model computes one (what calibrate_parts reads).
      keys: convert only these parts (default all).

    Returns:
      dict part name (as in part_models) -> .tflite bytes.
    """
    _check_precision(precision)
    policy_config = policy_config or policy.PolicyConfig()
    th_pix = PROFILE_TH_PIX if th_pix_grid is None else [float(t) for t in th_pix_grid]
    parts = _parts(net, net.exit_ids if exit_ids is None else list(exit_ids), positions)
    if keys is not None:
        parts = {key: parts[key] for key in keys}
    calibration = {}
    if precision == "int8":
        if calibration_images is None:
            raise ValueError("int8 conversion needs calibration images")
        calibration = _part_calibration(net, parts, calibration_images)
    return {key: convert_model(model, precision, calibration.get(key),
                               outputs=_part_outputs(net, key, precision, policy_config, th_pix))
            for key, (model, _) in parts.items()}


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
      class_map_signature: the signature that turns this stage's COARSE_LOGITS output into the
        exit's class map, run only for an image that leaves here; None when the stage outputs
        CLASS_MAP itself (the final stage, and the one stage of a budgeted model).
    """

    signature: str
    exit_id: str
    stride: int
    th_pix: float
    th_img: float
    inputs: tuple
    features: tuple
    class_map_signature: Optional[str] = None

    @property
    def is_early_exit(self):
        return self.exit_id != FINAL_EXIT


def _stages(net, config):
    """Keras stage models of `config`, their Stage descriptions, and the Keras class-map model
    of each stage that has a class-map signature (keyed by that signature)."""
    ids = [e.exit_id for e in config.exits]
    budgeted = config.mode == "budgeted" and bool(ids)
    models = net.stage_models(ids, truncate=budgeted)
    choices = list(config.exits) + [None]
    stages, class_maps = [], {}
    for k, model in enumerate(models):
        choice = choices[k]
        eid = choice.exit_id if choice else FINAL_EXIT
        stride = net.position_of(eid).stride if choice else net.output_stride
        class_map_key = class_map_signature(k + 1) if choice and not budgeted else None
        if class_map_key:
            class_maps[class_map_key] = _class_map_model(net, eid)
        stages.append(Stage(stage_signature(k + 1), eid, stride,
                            choice.th_pix if choice else None, choice.th_img if choice else None,
                            tuple(model.input), tuple(n for n in model.output if n not in STAGE_EXIT_OUTPUTS),
                            class_map_key))
    return models, stages, class_maps


def _exit_outputs(result, stage, policy_config, precision, size):
    """What stage k returns about its exit: the class map (at `size`), or, where a class-map
    signature computes it on demand, the coarse logits it starts from; and, for early exits, the
    image confidence on the coarse logits (their own output resolution, as in calibration)."""
    coarse = result[network.EXIT_COARSE_LOGITS]
    outputs = {COARSE_LOGITS: coarse} if stage.class_map_signature else {CLASS_MAP: _class_map(coarse, size)}
    if stage.is_early_exit:
        outputs[CONFIDENCE] = _confidence(coarse, stage.th_pix, stage.stride, policy_config, precision)
    return outputs


def _stage_functions(models, stages, class_maps, policy_config, precision, size):
    def wrap(stage):
        def outputs(result):
            features = {n: v for n, v in result.items() if n not in STAGE_EXIT_OUTPUTS}
            return {**features, **_exit_outputs(result, stage, policy_config, precision, size)}
        return outputs

    functions = {s.signature: _signature_function(s.signature, m, wrap(s)) for m, s in zip(models, stages)}
    for key, model in class_maps.items():
        functions[key] = _signature_function(key, model, _class_map_outputs(size))
    return functions


def _full_function(models, stages, policy_config, precision, size):
    """One signature running every stage back to back, every exit's class map included: the
    unstaged model of a configuration. Outputs `<signature>_class_map` and
    `<signature>_confidence` per stage."""
    image = models[0].input["image"]
    spec = {"image": tf.TensorSpec([1, *image.shape[1:]], tf.float32, name="image")}

    def full(image):
        outputs, available = {}, dict(image)
        for model, stage in zip(models, stages):
            result = model({n: available[n] for n in stage.inputs}, training=False)
            exit_outputs = _exit_outputs(result, stage, policy_config, precision, size)
            if stage.class_map_signature:
                exit_outputs[CLASS_MAP] = _class_map(exit_outputs.pop(COARSE_LOGITS), size)
            for name, value in exit_outputs.items():
                outputs[f"{stage.signature}_{name}"] = value
            available.update({n: result[n] for n in stage.features})
        return outputs

    return tf.function(full, input_signature=[spec]).get_concrete_function()


def _stage_calibration(models, stages, images, input_size, signatures):
    """Representative dataset for staged conversion: each image runs through the float stages,
    stage k+1 is fed stage k's real outputs and a class-map signature its stage's coarse logits."""
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
                if stage.class_map_signature in signatures:
                    yield stage.class_map_signature, {COARSE_LOGITS: result[network.EXIT_COARSE_LOGITS].numpy()}
            if FULL_SIGNATURE in signatures:
                yield FULL_SIGNATURE, {"image": image}
    return dataset


def policy_of(config):
    """The exit policy a DeploymentConfig was chosen under: the one its search recorded in
    config.metadata["policy"] (the calibration cache's), else the default PolicyConfig(). The
    predicted figures hold only for a model whose confidences use that policy."""
    return policy.PolicyConfig.from_dict((config.metadata or {}).get("policy") or {})


# Network fields that do not change what is exported: where the initial weights came from.
_PROVENANCE_FIELDS = ("backbone.weights", "model_path")


def check_network(net, config):
    """Refuses a deployment config searched for another network than `net` (its `network` entry,
    when it has one, must equal net.config but for the initial weights' file).

    Raises:
      ValueError naming each field that differs: "num_classes: 11 -> 12" (config -> network).
    """
    if not config.network:
        return
    diffs = [d for d in checkpoints.config_differences(config.network, net.config.to_dict())
             if d.split(":")[0] not in _PROVENANCE_FIELDS]
    if diffs:
        raise ValueError(f"the deployment config was made for another network than the one exported (config -> "
                         f"network: {'; '.join(diffs)})")


def build_model(net, config, precision, calibration_images=None, policy_config=None, staged=True,
                integer_io="int8"):
    """Converts a deployment configuration of `net` into one .tflite.

    Args:
      net: MultiExitNetwork holding every exit of `config`.
      config: DeploymentConfig. "budgeted" gives one stage, truncated after its exit;
        "dynamic"/"anytime" give one stage per early exit plus a final stage.
      precision: one of PRECISIONS.
      calibration_images: int8 only: iterable of RGB 0..255 images [H, W, 3] (calibration split).
      policy_config: policy.PolicyConfig for the in-graph image confidence (default:
        policy_of(config)).
      staged: True: signatures stage_1..stage_N and class_map_k for each early exit k of a
        dynamic/anytime model; False: one signature "full" running them all.
      integer_io: int8 only: one of INTEGER_IO, the type of the image, feature maps, coarse
        logits and confidences at the signature boundaries (class maps are uint8 always).

    Returns:
      (tflite bytes, list of Stage).
    """
    _check_precision(precision, integer_io)
    check_network(net, config)
    if precision == "int8" and calibration_images is None:
        raise ValueError("int8 conversion needs calibration images (the calibration split)")
    policy_config = policy_config or policy_of(config)
    models, stages, class_maps = _stages(net, config)
    size = class_map_size(net.backbone.input_size, policy_config)
    if staged:
        functions = _stage_functions(models, stages, class_maps, policy_config, precision, size)
    else:
        functions = {FULL_SIGNATURE: _full_function(models, stages, policy_config, precision, size)}
    dataset = None
    if precision == "int8":
        dataset = _stage_calibration(models, stages, calibration_images, net.backbone.input_size, set(functions))
    variables = {id(v): v for m in models + list(class_maps.values()) for v in m.variables}
    model_bytes = _convert(functions, variables.values(), precision, dataset, integer_io)
    if precision == "int8" and staged:
        check_int8_handoff(model_bytes, stages)
    return model_bytes, stages


def check_int8_handoff(model_bytes, stages):
    """Checks that every int8 (or uint8: integer_io) feature map leaves the stage that computes it
    with the scale and zero point each later stage reads it with (and an early exit's coarse logits
    leave with those its class-map signature reads them with), so the app passes the integer
    tensor on without requantising.

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
            source, quantisation = producers[name]
            _check_same_quantisation(source, stage.signature, name, quantisation, inputs[name]["quantization"])
        outputs = runner.get_output_details()
        producers.update({name: (stage.signature, outputs[name]["quantization"]) for name in stage.features})
        if stage.class_map_signature:
            _check_same_quantisation(stage.signature, stage.class_map_signature, COARSE_LOGITS,
                                     outputs[COARSE_LOGITS]["quantization"],
                                     interpreter.get_signature_runner(stage.class_map_signature)
                                     .get_input_details()[COARSE_LOGITS]["quantization"])


def _check_same_quantisation(source, target, name, out_quantisation, in_quantisation):
    (out_scale, out_zero), (in_scale, in_zero) = out_quantisation, in_quantisation
    if out_zero != in_zero or not math.isclose(out_scale, in_scale, rel_tol=SCALE_RTOL):
        raise ValueError(
            f"int8 hand-off {source} -> {target}: feature map {name!r} leaves with "
            f"(scale={out_scale}, zero_point={out_zero}) but is read with (scale={in_scale}, "
            f"zero_point={in_zero}); the stages cannot pass int8 tensors on as they are")


def signature_tensors(model_bytes):
    """What an app needs to feed and read each signature without a TFLite interpreter API for
    quantisation parameters (LiteRT.js has none): every input and output tensor of every signature.

    Returns:
      {signature: {"inputs"|"outputs": {name: {"dtype": "float32"|"uint8"|"int8", "shape": [..],
      "scale": float, "zero_point": int}}}}; real value = (stored - zero_point) * scale for
      integer tensors with scale > 0, the stored value otherwise.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)

    def describe(details):
        return {name: {"dtype": np.dtype(d["dtype"]).name, "shape": [int(n) for n in d["shape"]],
                       "scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
                for name, d in details.items()}

    return {key: {"inputs": describe(runner.get_input_details()), "outputs": describe(runner.get_output_details())}
            for key in interpreter.get_signature_list() for runner in [interpreter.get_signature_runner(key)]}


def staged_metadata(net, config, precision, stages, policy_config=None, class_names=None, signatures=None):
    """The JSON-ready metadata of a staged model.

    Args:
      net: MultiExitNetwork the model was converted from.
      config: its DeploymentConfig.
      precision: one of PRECISIONS.
      stages: list of Stage (from build_model).
      policy_config: the policy.PolicyConfig baked into the confidences (default:
        policy_of(config)).
      class_names: optional list of num_classes names (default "class_<i>").
      signatures: signature_tensors of the converted model.

    Returns:
      dict with format, precision, mode, classes, input (size [H, W], dtype, range, channels),
      class_map (stride: input pixels per class-map pixel, size [H', W'], upsampling: how an app
      brings it to the input size), stages (signature, exit_id, stride, th_pix, th_img, inputs,
      features, class_map_signature), signatures (signature_tensors), policy, deployment
      (config.to_dict()), network (net.config.to_dict(): a NetworkConfig's, or a wrapped
      model's WrappedConfig).
    """
    num_classes = net.config.num_classes
    policy_config = policy_config or policy_of(config)
    class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a network of {num_classes} classes")
    return {
        "format": METADATA_FORMAT,
        "precision": precision,
        "mode": config.mode,
        "classes": class_names,
        "input": {"size": list(net.backbone.input_size), "channels": "RGB", "dtype": "float32",
                  "range": [0, 255], "batch": 1},
        "class_map": {"stride": policy_config.class_map_stride,
                      "size": list(class_map_size(net.backbone.input_size, policy_config)), "upsampling": "nearest"},
        "stages": [dataclasses.asdict(s) for s in stages],
        "signatures": signatures,
        "policy": policy_config.to_dict(),
        "deployment": config.to_dict(),
        "network": net.config.to_dict(),
    }


def export_staged_model(path, net, config, precision, calibration_images=None, policy_config=None,
                        class_names=None, integer_io="int8"):
    """Writes the staged .tflite of `config` to `path` and its metadata to `path`.json.

    Args: as build_model and staged_metadata.

    Returns:
      the metadata dict written.
    """
    policy_config = policy_config or policy_of(config)
    model_bytes, stages = build_model(net, config, precision, calibration_images, policy_config,
                                      integer_io=integer_io)
    metadata = staged_metadata(net, config, precision, stages, policy_config, class_names,
                               signature_tensors(model_bytes))
    with io_utils.together():  # a model without its metadata is one no runtime can use
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
    metadata["deployment"] = config.to_dict()
    with open(source, "rb") as f, io_utils.together():
        io_utils.write_bytes(path, f.read())
        io_utils.write_json(metadata_path(path), metadata)
    return metadata
