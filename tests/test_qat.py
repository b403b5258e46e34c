"""QAT: supported layers are fake-quantised, dilated convs stay float, MobileNetV3 falls back."""
import numpy as np

from mess_tf import qat
from mess_tf.keras_lib import keras, layers


def _small_model():
    images = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="plain_conv")(images)
    x = layers.BatchNormalization(name="plain_bn")(x)
    x = layers.ReLU(name="plain_relu")(x)
    x = layers.Conv2D(3, 3, padding="same", dilation_rate=2, name="dilated_conv")(x)
    return keras.Model(images, x)


def test_qat_quantises_supported_layers_and_leaves_dilated_convs_float():
    keras.utils.set_random_seed(0)
    model = _small_model()
    quantised = qat.quantize_aware(model, "mobilenet_v2")
    names = {layer.name for layer in quantised.layers}
    assert "quant_plain_conv" in names and "dilated_conv" in names and "quant_dilated_conv" not in names
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    assert quantised(images).shape == model(images).shape


def test_mobilenet_v3_falls_back_to_float_with_the_reason():
    model = _small_model()
    same, reason = qat.quantize_aware_or_float(model, "mobilenet_v3_small")
    assert same is model and "MobileNetV3" in reason
