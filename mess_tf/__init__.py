"""mess-tf: Multi-Exit Semantic Segmentation networks for phones, in TensorFlow/Keras."""

__version__ = "0.1.0"
