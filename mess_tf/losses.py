"""Segmentation losses: cross-entropy with an ignore label, and positive-filtering distillation.

Both return a scalar mean over the pixels that count, so exits of any size weigh the same and a
batch whose pixels are all ignored contributes 0 (not NaN). Logits of any float dtype (e.g.
float16 under mixed precision) are computed in float32.
"""
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
    labels = tf.cast(labels, tf.int32)
    teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    student_logits = tf.cast(student_logits, tf.float32)
    positive = tf.equal(tf.argmax(teacher_logits, axis=-1, output_type=tf.int32), labels)
    positive = tf.logical_and(positive, tf.not_equal(labels, ignore_label))
    teacher_log_p = tf.nn.log_softmax(teacher_logits / temperature)
    student_log_p = tf.nn.log_softmax(student_logits / temperature)
    kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return _valid_mean(kl, positive) * temperature ** 2


def exit_loss(labels, exit_logits, final_logits=None, distillation_weight=0.0, temperature=1.0,
              ignore_label=IGNORE_LABEL):
    """An early exit's stage-2 loss: cross-entropy, plus weighted positive-filtering distillation
    from `final_logits` when `distillation_weight` > 0 (pass final_logits=None to switch it off).

    Returns:
      (total, cross_entropy, distillation) float32 scalars; distillation is 0 when off.
    """
    ce = cross_entropy(labels, exit_logits, ignore_label)
    if final_logits is None or distillation_weight <= 0:
        return ce, ce, tf.constant(0.0)
    kd = positive_filtering_distillation(labels, exit_logits, final_logits, temperature, ignore_label)
    return ce + distillation_weight * kd, ce, kd
