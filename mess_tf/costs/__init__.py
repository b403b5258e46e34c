"""Analytic costs: MACs counted from the Keras graph, and the arithmetic that composes a
configuration's cost from per-part costs (in MACs here, in measured ms in mess_tf.latency)."""
