"""The optimisers DeepLab users expect: SGD with momentum and poly decay, or AdamW; warm-up;
decoupled weight decay (not on batch-norm parameters and biases)."""
import tensorflow as tf

from mess_tf.keras_lib import keras

OPTIMIZERS = ("sgd", "adamw")


@keras.utils.register_keras_serializable(package="mess_tf")
class WarmupPolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """DeepLab's "poly" schedule, lr * (1 - step / steps) ** power, after a linear warm-up.

    During the first `warmup_steps` steps the rate rises linearly from lr / warmup_steps to lr.
    """

    def __init__(self, learning_rate, steps, warmup_steps=0, power=0.9):
        self.learning_rate, self.steps, self.warmup_steps, self.power = learning_rate, steps, warmup_steps, power

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        progress = tf.minimum(step / float(max(self.steps, 1)), 1.0)
        poly = self.learning_rate * (1.0 - progress) ** self.power
        if not self.warmup_steps:
            return poly
        warm = self.learning_rate * (step + 1.0) / float(self.warmup_steps)
        return tf.where(step < self.warmup_steps, warm, poly)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "steps": self.steps,
                "warmup_steps": self.warmup_steps, "power": self.power}


def make_optimizer(name, learning_rate, steps, momentum=0.9, weight_decay=0.0, warmup_steps=0, power=0.9):
    """An optimiser with a warm-up + poly-decay learning rate.

    Args:
      name: "sgd" (with momentum) or "adamw".
      learning_rate: peak learning rate.
      steps: total training steps (the poly decay reaches 0 there).
      momentum: SGD momentum.
      weight_decay: decoupled weight decay per step (multiplied by the learning rate);
        batch-norm gamma/beta and biases are excluded.
      warmup_steps: linear warm-up length.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    schedule = WarmupPolyDecay(learning_rate, steps, warmup_steps, power)
    decay = weight_decay or None
    if name == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=momentum, weight_decay=decay)
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer
