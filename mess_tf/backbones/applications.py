"""MobileNetV2/V3 and ResNet-50/101 from tf_keras.applications, with their expected input scaling.

Layer names are keras.applications' own, so its `.h5` weight files load by name.
"""
import tensorflow as tf

from mess_tf.keras_lib import keras, layers

# name: (keras.applications class, input scaling its weights expect)
_APPLICATIONS = {
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "mobilenet_v3_large": ("MobileNetV3Large", None),  # preprocessing is built into the model
    "mobilenet_v3_small": ("MobileNetV3Small", None),
    "resnet50": ("ResNet50", "caffe"),
    "resnet101": ("ResNet101", "caffe"),
}
NAMES = tuple(_APPLICATIONS)
WIDTH_MULTIPLIED = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")


@keras.utils.register_keras_serializable(package="mess_tf")
class CaffePreprocess(layers.Layer):
    """keras.applications "caffe" preprocessing for ResNets: RGB 0..255 -> BGR minus ImageNet mean."""

    MEAN_BGR = (103.939, 116.779, 123.68)

    def call(self, images):
        return tf.reverse(images, axis=[-1]) - tf.constant(self.MEAN_BGR, dtype=images.dtype)


def _preprocessing(kind, images):
    """Applies the input scaling keras.applications weights expect to RGB images in 0..255."""
    if kind == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(images)
    if kind == "caffe":
        return CaffePreprocess(name="preprocess")(images)
    return images


def classification_network(name, alpha, input_size, include_top=False):
    """The unmodified keras.applications network on RGB 0..255 input named `image`.

    Returns:
      keras Model: images [B, H, W, 3] -> features, or ImageNet probabilities [B, 1000] with the top.
    """
    class_name, preprocessing = _APPLICATIONS[name]
    images = keras.Input((*input_size, 3), name="image")
    kwargs = dict(input_tensor=_preprocessing(preprocessing, images), include_top=include_top, weights=None)
    if name in WIDTH_MULTIPLIED:
        kwargs["alpha"] = alpha
    if name.startswith("mobilenet_v3"):
        kwargs["include_preprocessing"] = True
    return getattr(keras.applications, class_name)(**kwargs)
