"""Segmentation losses: cross-entropy with an ignore label, and positive-filtering distillation.

Both return a scalar mean over the pixels that count, so exits of any size weigh the same and a
batch whose pixels are all ignored contributes 0 (not NaN). Logits of any float dtype (e.g.
float16 under mixed precision) are computed in float32.
"""
import collections

import tensorflow as tf

IGNORE_LABEL = 255


def _valid_mean(per_pixel, mask):
    """Mean of `per_pixel` [B, H, W] over pixels where `mask` is True; 0 if there are none."""
    mask = tf.cast(mask, per_pixel.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_pixel * mask), tf.reduce_sum(mask))


def cross_entropy(labels, logits, ignore_label=IGNORE_LABEL):
    """Softmax cross-entropy averaged over the labelled pixels.

    Args:
      labels: int/uint8 [B, H, W] class indices; `ignore_label` marks unlabelled pixels.
      logits: float [B, H, W, C].
      ignore_label: label value excluded from the mean.

    Returns:
      float32 scalar.
    """
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))  # any class; masked out below
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(safe_labels, tf.cast(logits, tf.float32))
    return _valid_mean(per_pixel, valid)


class DistillationTarget(collections.namedtuple("DistillationTarget",
                                                 ("probabilities", "negative_entropy", "positive", "temperature"))):
    """What positive-filtering distillation needs of the teacher, computed once for all exits.

    Fields:
      probabilities: float32 [B, H, W, C], the teacher's softmax at `temperature` (no gradient).
      negative_entropy: float32 [B, H, W], sum over classes of p log p.
      positive: bool [B, H, W], labelled pixels the teacher classifies correctly.
      temperature: the softmax temperature (> 0).
    """


def distillation_target(labels, teacher_logits, temperature=1.0, ignore_label=IGNORE_LABEL):
    """The DistillationTarget of the final exit's logits float [B, H, W, C] for labels [B, H, W]."""
    labels = tf.cast(labels, tf.int32)
    teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    positive = tf.equal(tf.argmax(teacher_logits, axis=-1, output_type=tf.int32), labels)
    positive = tf.logical_and(positive, tf.not_equal(labels, ignore_label))
    log_p = tf.nn.log_softmax(teacher_logits / temperature)
    p = tf.exp(log_p)
    return DistillationTarget(p, tf.reduce_sum(p * log_p, axis=-1), positive, temperature)


def _distillation(student_log_p, target):
    """Mean KL(teacher || student) over the target's positive pixels, times temperature**2;
    student_log_p: the student's log-softmax at the target's temperature."""
    kl = target.negative_entropy - tf.reduce_sum(target.probabilities * student_log_p, axis=-1)
    return _valid_mean(kl, target.positive) * target.temperature ** 2


def positive_filtering_distillation(labels, student_logits, teacher_logits, temperature=1.0,
                                    ignore_label=IGNORE_LABEL):
    """KL(teacher || student) at `temperature`, only on pixels the teacher classifies correctly.

    MESS distils the final exit into each early exit, but only where the final exit is right
    ("positive filtering"), so exits are not taught the final exit's mistakes. The teacher gets no
    gradient. As in Hinton et al., the KL is scaled by temperature**2 to keep gradient magnitudes
    comparable across temperatures.

    Args:
      labels: int/uint8 [B, H, W] class indices (`ignore_label` pixels never count).
      student_logits: float [B, H, W, C], the early exit.
      teacher_logits: float [B, H, W, C], the final exit.
      temperature: softmax temperature (> 0).

    Returns:
      float32 scalar: mean KL over the positive pixels (0 if there are none).
    """
    target = distillation_target(labels, teacher_logits, temperature, ignore_label)
    return _distillation(tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature), target)


def exit_loss(labels, exit_logits, target=None, distillation_weight=0.0, ignore_label=IGNORE_LABEL):
    """An early exit's stage-2 loss: cross-entropy, plus weighted positive-filtering distillation
    towards `target` (distillation_target() of the final exit, shared by every exit) when given
    and `distillation_weight` > 0.

    One log-softmax of the exit's logits serves both terms (at temperature 1): stage 2 computes
    this for every exit at full resolution, the largest part of a step on stored views.

    Returns:
      (total, cross_entropy, distillation) float32 scalars; distillation is 0 when off.
    """
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    logits = tf.cast(exit_logits, tf.float32)
    log_p = tf.nn.log_softmax(logits)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    ce = _valid_mean(-tf.gather(log_p, safe_labels, batch_dims=3), valid)
    if target is None or distillation_weight <= 0:
        return ce, ce, tf.constant(0.0)
    student_log_p = log_p if target.temperature == 1 else tf.nn.log_softmax(logits / target.temperature)
    kd = _distillation(student_log_p, target)
    return ce + distillation_weight * kd, ce, kd
