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


def test_activation_ranges_are_set_from_data_before_fine_tuning():
    keras.utils.set_random_seed(0)
    images = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(images)
    x = layers.BatchNormalization(momentum=0.0, name="bn")(x)
    logits = layers.Conv2D(3, 1, name="logits")(x)
    model = keras.Model(images, logits)
    data = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    model(data, training=True)  # batch-norm statistics of this data, as a trained network has
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([20 * kernel, bias])  # logits well beyond tfmot's initial +-6
    expected = model(data).numpy()
    quantised = qat.quantize_aware(model, "mobilenet_v2")
    assert "quant_bn" in {layer.name for layer in quantised.layers}  # quantised after the batch norm
    assert np.abs(quantised(data).numpy() - expected).max() > 10  # clipped at the initial range
    qat.calibrate_ranges(quantised, iter([(data, None)] * 20))
    error = np.abs(quantised(data).numpy() - expected).max()
    assert error < 0.05 * np.ptp(expected)  # a few int8 steps of the calibrated range
    np.testing.assert_allclose(quantised.get_layer("quant_bn").layer.moving_mean.numpy(),
                               model.get_layer("bn").moving_mean.numpy())  # statistics kept


def test_a_concatenation_tfmot_reorders_is_rewired_to_its_float_channels():
    keras.utils.set_random_seed(1)
    images = keras.Input((16, 16, 3), name="image")
    x = layers.Rescaling(1 / 128, -1, name="preprocess")(images)
    branches = []
    for i in range(2):
        y = layers.Conv2D(4, 1, name=f"b{i}_conv")(x)
        y = layers.BatchNormalization(momentum=0.0, name=f"b{i}_bn")(y)
        branches.append(layers.ReLU(name=f"b{i}_relu")(y))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="pool_gap")(x)
    pooled = layers.Conv2D(4, 1, activation="relu", name="pool_conv")(pooled)
    branches.append(layers.UpSampling2D((16, 16), name="pool_broadcast")(pooled))  # as ASPP's image pooling
    concat = layers.Concatenate(name="concat")(branches)
    model = keras.Model(images, layers.Conv2D(3, 1, name="project")(concat))
    data = np.random.default_rng(1).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    model(data, training=True)
    quantised = qat.quantize_aware(model, "mobilenet_v2")
    order = [qat._unwrapped_name(layer) for layer in qat._inputs_of(quantised.get_layer("quant_concat"))]
    assert order != ["b0_relu", "b1_relu", "pool_broadcast"]  # tfmot's rewrite moves the pooled branch
    qat.calibrate_ranges(quantised, iter([(data, None)] * 20))
    expected = model(data).numpy()
    assert np.abs(quantised(data).numpy() - expected).max() < 0.05 * np.ptp(expected)  # channels rewired
