"""Quantisation-aware training (tensorflow-model-optimization) for fine-tuning before int8 export.

Known limits (DESIGN.md §5):
  * dilated (atrous) convolutions stay float: tfmot's QAT cannot fake-quantise them (upstream
    issue), so they are left unannotated, as are layers tfmot has no 8-bit rule for (resizing,
    rescaling, ...). Post-training int8 export still quantises everything.
  * MobileNetV3 is unsupported upstream (tfmot crashes on keras.applications MobileNetV3).
Where QAT cannot run, `quantize_aware_or_float` returns the float model and says why.
"""
import logging

import numpy as np
import tensorflow as tf

from mess_tf import losses
from mess_tf.keras_lib import keras, layers


class QatUnavailable(RuntimeError):
    """QAT cannot wrap this model; the message says why."""


def is_dilated(layer):
    """True for a dilated convolution, which tfmot cannot fake-quantise."""
    return isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)) and max(layer.dilation_rate) > 1


def quantize_aware(model, backbone_name=None):
    """A QAT copy of `model`: fake-quantised (int8) wherever tfmot supports the layer.

    Args:
      model: functional tf_keras model.
      backbone_name: the network's backbone (backbones.BACKBONES), to refuse MobileNetV3 early.

    Returns:
      keras Model with the same inputs/outputs, starting from `model`'s weights (its own copies).

    Raises:
      QatUnavailable with the reason.
    """
    if backbone_name and backbone_name.startswith("mobilenet_v3"):
        raise QatUnavailable(f"QAT does not support {backbone_name}: tensorflow-model-optimization fails on "
                             f"keras.applications MobileNetV3 upstream")
    try:
        import tensorflow_model_optimization as tfmot
        from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
            default_8bit_quantize_registry,
        )
    except ImportError as e:
        raise QatUnavailable(f"tensorflow-model-optimization is not installed ({e})") from None
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    quantize = tfmot.quantization.keras

    def quantisable(layer):
        return registry.supports(layer) and not is_dilated(layer)

    def annotate(layer):
        # A batch norm is annotated with the convolution it follows, so tfmot quantises after it; left
        # out, tfmot fake-quantises the convolution's raw output instead, which ruins the network.
        if quantisable(layer) or (isinstance(layer, layers.BatchNormalization) and quantisable(_inputs_of(layer)[0])):
            return quantize.quantize_annotate_layer(layer)
        return layer

    try:
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        with quantize.quantize_scope():
            quantised = quantize.quantize_apply(annotated)
    except Exception as e:  # tfmot raises assorted errors on graphs it cannot rewrite
        raise QatUnavailable(f"tensorflow-model-optimization could not wrap model {model.name!r}: "
                             f"{type(e).__name__}: {e}") from None
    for layer in model.layers:
        if isinstance(layer, layers.Concatenate):
            _restore_concat_order(quantised, layer)
    return quantised


def _unwrapped_name(layer):
    return layer.name[len("quant_"):] if layer.name.startswith("quant_") else layer.name


def _inputs_of(layer):
    inbound = layer._inbound_nodes[-1].inbound_layers  # noqa: SLF001 (keras keeps the graph only here)
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def _restore_concat_order(quantised, concat):
    """tfmot's rewrite can reorder a concatenation's inputs (ASPP's image-pooling branch moves to the
    front), which scrambles the channels its consumers read. Where every consumer is a convolution,
    their kernels' input channels are permuted back; anything else is refused.
    """
    original = [layer.name for layer in _inputs_of(concat)]
    rewritten = next(layer for layer in quantised.layers if _unwrapped_name(layer) == concat.name)
    order = [_unwrapped_name(layer) for layer in _inputs_of(rewritten)]
    if order == original:
        return
    widths = {layer.name: layer.output.shape[-1] for layer in _inputs_of(concat)}
    starts = dict(zip(original, np.cumsum([0] + [widths[n] for n in original])))
    channels = np.concatenate([np.arange(starts[n], starts[n] + widths[n]) for n in order])
    consumers = [layer for layer in quantised.layers if rewritten in _inputs_of(layer)]
    convs = [_unwrapped(layer) for layer in consumers]
    if not convs or not all(isinstance(c, layers.Conv2D) and not isinstance(c, layers.DepthwiseConv2D)
                            for c in convs):
        raise QatUnavailable(f"tensorflow-model-optimization reordered the inputs of {concat.name!r} "
                             f"({original} -> {order}) and its consumers are not convolutions to re-wire")
    for consumer in consumers:  # a wrapper holds the kernel variable; its .layer.kernel is a graph tensor
        kernel = next(w for w in consumer.weights if w.name.split("/")[-1].startswith("kernel"))
        kernel.assign(tf.gather(kernel, channels, axis=2))


def calibrate_ranges(model, batches, steps=20, decay=0.5):
    """Sets a QAT model's activation ranges from data before fine-tuning.

    tfmot starts every activation range at [-6, 6] and widens it with a moving average of decay
    0.999, so the linear outputs (projections, residual adds, logits) stay clipped for thousands
    of steps. This runs `steps` batches in training mode with that decay set to `decay`; batch-norm
    statistics are kept as they are (momentum 1 meanwhile).

    Args:
      model: a quantize_aware model. batches: iterator of (images [B, H, W, 3] RGB 0..255, labels).
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    norms = [_unwrapped(layer) for layer in model.layers if isinstance(_unwrapped(layer), layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    original = quant_ops.MovingAvgQuantize

    def fast(*args, **kwargs):
        return original(*args, **{**kwargs, "ema_decay": decay})

    quant_ops.MovingAvgQuantize = fast
    try:
        for layer in norms:
            layer.momentum = 1.0
        for _ in range(steps):
            model(next(batches)[0], training=True)
    finally:
        quant_ops.MovingAvgQuantize = original
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


def _unwrapped(layer):
    return getattr(layer, "layer", layer)  # tfmot's wrappers hold the layer they quantise in .layer


def quantize_aware_or_float(model, backbone_name=None):
    """(QAT model, None), or (`model` itself, the reason) when QAT cannot run; logs the fallback."""
    try:
        return quantize_aware(model, backbone_name), None
    except QatUnavailable as e:
        logging.warning("QAT unavailable, fine-tuning in float: %s", e)
        return model, str(e)


def fine_tune(model, batches, steps, learning_rate=1e-4):
    """Quantisation-aware fine-tuning: AdamW on the summed cross-entropy of every output.

    A short loop of its own, not training.train: a QAT copy is a different Keras model (tfmot's
    wrappers), trained for a few hundred steps to adapt to its fake quantisation, with no stages,
    schedules or checkpoints.

    Args:
      model: a quantize_aware model, images [B, H, W, 3] -> {name: logits [B, H, W, C]}.
      batches: iterator of (images float32 [B, H, W, 3] RGB 0..255, labels [B, H, W]).
      steps: optimiser steps.
      learning_rate: AdamW rate (constant).

    Returns:
      list of the total loss after each step.
    """
    optimizer = keras.optimizers.AdamW(learning_rate)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            loss = tf.add_n([losses.cross_entropy(labels, logits) for logits in outputs.values()])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return [float(step(*next(batches))) for _ in range(steps)]
