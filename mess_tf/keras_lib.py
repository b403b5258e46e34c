"""The one place that imports Keras.

tensorflow-model-optimization's QAT refuses Keras 3 models, so mess-tf builds everything with
the Keras 2 API shipped as `tf_keras`. Every other module imports `keras` from here, which keeps
a later move to Keras 3 a one-file change.
"""
import tf_keras as keras

layers = keras.layers

__all__ = ["keras", "layers"]
