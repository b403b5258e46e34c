"""Analytic multiply-accumulate (MAC) counts of Keras layers.

Counted as in the MobileNet and ResNet papers: convolutions and dense layers only. Batch norm
(folded into the conv at export), activations, additions, pooling and resizing are free here.
Shapes are the static shapes of the built graph, so counts are per image at that input size.
"""
import numpy as np

from mess_tf.keras_lib import layers


def _conv_macs(layer):
    out = layer.output.shape
    kh, kw = layer.kernel_size
    c_in = layer.input.shape[-1]
    spatial = int(np.prod(out[1:3]))
    if isinstance(layer, layers.DepthwiseConv2D):
        return spatial * kh * kw * c_in * layer.depth_multiplier
    return spatial * kh * kw * (c_in // layer.groups) * out[-1]


def macs_of_layer(layer):
    """MACs of one layer for one image; 0 for layers that are not convolutions or dense."""
    if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
        return int(_conv_macs(layer))
    if isinstance(layer, layers.Dense):
        return int(layer.input.shape[-1] * layer.units * np.prod(layer.output.shape[1:-1]))
    return 0


def layer_macs(model):
    """Layer name -> MACs per image, for every layer of a built functional model."""
    return {layer.name: macs_of_layer(layer) for layer in model.layers}
