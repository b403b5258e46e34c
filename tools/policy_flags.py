"""The exit-policy flags of tools.calibrate and tools.profile.

A calibration cache and a latency table must be made under the same policy: the cache's image
confidences and the table's head latencies (which include computing that confidence) both depend
on it, and the search refuses a pair that disagrees. Importing this module defines the flags.
"""
from absl import flags

from mess_tf import policy

FLAGS = flags.FLAGS
flags.DEFINE_enum("confidence", "top1", list(policy.CONFIDENCES), "Pixel confidence.")
flags.DEFINE_bool("edge_smoothing", True, "Median-smooth confidence near the exit's own semantic edges.")
flags.DEFINE_integer("confidence_stride", 1, "Exits finer than this stride (a power of two) decide on logits "
                     "average-pooled to it: a cheaper in-graph confidence. 1: each exit at its own resolution.")
flags.DEFINE_integer("class_map_stride", 1, "Class maps at 1/this of the input size (the argmax at a coarser "
                     "resolution); the runtime, or the app, upsamples the class indices. 1: at the input size.")


def policy_config():
    """The PolicyConfig the flags describe (ValueError naming a bad value)."""
    return policy.PolicyConfig(confidence=FLAGS.confidence, edge_smoothing=FLAGS.edge_smoothing,
                               confidence_stride=FLAGS.confidence_stride, class_map_stride=FLAGS.class_map_stride)
