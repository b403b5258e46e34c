"""Backbones: dilation, candidate positions found from the graph, weights files, MAC counts."""
import numpy as np
import pytest

from mess_tf import backbones
from mess_tf.backbones import applications
from mess_tf.keras_lib import keras

# Multiply-adds published for the ImageNet classifiers at 224x224 (MobileNetV2 paper Table 4,
# MobileNetV3 paper Table 3, ResNet paper Table 1 "FLOPs" which count multiply-adds).
PUBLISHED_MACS = {
    "mobilenet_v2": 300e6,
    "mobilenet_v3_large": 219e6,
    "mobilenet_v3_small": 56e6,
    "resnet50": 3.8e9,
    "resnet101": 7.6e9,
}
EXPECTED_POSITIONS = {"mobilenet_v2": 17, "mobilenet_v3_large": 15, "mobilenet_v3_small": 11,
                      "resnet50": 16, "resnet101": 33, "efficientnet_lite0": 16, "efficientnet_lite1": 21,
                      "efficientnet_lite2": 21, "efficientnet_lite3": 24, "efficientnet_lite4": 30}


@pytest.mark.parametrize("name", applications.NAMES)  # EfficientNet-Lite: test_efficientnet_lite.py
def test_classifier_macs_match_published_figures(name):
    assert backbones.classification_macs(name) == pytest.approx(PUBLISHED_MACS[name], rel=0.03)


@pytest.mark.parametrize("name", backbones.BACKBONES)
def test_dilation_keeps_resolution_and_positions(name, output_stride=8):
    b = backbones.Backbone(backbones.BackboneConfig(name, output_stride), (64, 64))
    assert b.model.output.shape[1:3] == (64 // output_stride,) * 2
    assert len(b.positions) == EXPECTED_POSITIONS[name]
    strides = [p.stride for p in b.positions]
    assert strides == sorted(strides) and strides[-1] == output_stride
    macs = [p.cumulative_macs for p in b.positions]
    assert all(later > earlier for earlier, later in zip(macs, macs[1:]))
    assert b.positions[-1].name == b.model.output.node.layer.name
    assert b.positions[-1].channels == b.model.output.shape[-1]


def test_resnet_positions_are_every_bottleneck():
    b = backbones.Backbone(backbones.BackboneConfig("resnet50", 16), (64, 64))
    expected = [f"conv{s}_block{i}_out" for s, n in [(2, 3), (3, 4), (4, 6), (5, 3)] for i in range(1, n + 1)]
    assert [p.name for p in b.positions] == expected


def test_output_stride_32_is_the_unmodified_network():
    config = backbones.BackboneConfig("mobilenet_v2", 32, alpha=0.35)
    b = backbones.Backbone(config, (64, 64))
    original = backbones.classification_network(config, (64, 64))
    convs = [layer for layer in b.model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert all(layer.dilation_rate == (1, 1) for layer in convs)
    assert [layer.get_config()["strides"] for layer in convs] == [
        original.get_layer(layer.name).get_config()["strides"] for layer in convs]


def test_dilated_rates_follow_deeplab():
    b = backbones.Backbone(backbones.BackboneConfig("resnet50", 8), (64, 64))
    assert b.model.get_layer("conv3_block2_2_conv").dilation_rate == (1, 1)
    assert b.model.get_layer("conv4_block2_2_conv").dilation_rate == (2, 2)
    assert b.model.get_layer("conv5_block2_2_conv").dilation_rate == (4, 4)
    assert b.model.get_layer("conv5_block1_1_conv").strides == (1, 1)


def test_local_weights_file_loads_by_name(tmp_path):
    config = backbones.BackboneConfig("mobilenet_v2", 16, alpha=0.35)
    classifier = backbones.classification_network(config, (64, 64), include_top=True)
    path = str(tmp_path / "mobilenet_v2_0.35.h5")
    classifier.save_weights(path)
    b = backbones.Backbone(backbones.BackboneConfig("mobilenet_v2", 16, alpha=0.35, weights=path), (64, 64))
    for name in ["Conv1", "block_13_depthwise", "block_16_project"]:
        for got, want in zip(b.model.get_layer(name).get_weights(), classifier.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    other = backbones.classification_network(backbones.BackboneConfig("mobilenet_v2", 32, alpha=0.5), (64, 64))
    path = str(tmp_path / "wrong.h5")
    other.save_weights(path)
    with pytest.raises(ValueError, match=r"wrong\.h5 does not match the model: layer '\w+' has shapes"):
        backbones.Backbone(backbones.BackboneConfig("mobilenet_v2", 16, alpha=0.35, weights=path), (64, 64))
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        backbones.Backbone(backbones.BackboneConfig("mobilenet_v2", 16, weights=str(tmp_path / "missing.h5")), (64, 64))


def test_bad_backbone_and_input_size_errors():
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'.*mobilenet_v2"):
        backbones.BackboneConfig("vgg16")
    with pytest.raises(ValueError, match=r"output_stride=4"):
        backbones.BackboneConfig("resnet50", 4)
    with pytest.raises(ValueError, match=r"input size 100x100 is not divisible by the output stride 16"):
        backbones.Backbone(backbones.BackboneConfig("mobilenet_v2", 16), (100, 100))


def test_unknown_position_lists_valid_ones():
    b = backbones.Backbone(backbones.BackboneConfig("mobilenet_v2", 16, alpha=0.35), (32, 32))
    with pytest.raises(ValueError, match=r"'block_99_add' is not a candidate position.*block_2_add"):
        b.position("block_99_add")
