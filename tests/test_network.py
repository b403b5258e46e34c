"""MultiExitNetwork: stage chaining, subsets, the original model, wrapping a user's model."""
import numpy as np
import pytest

from mess_tf import backbones, heads, network
from mess_tf.keras_lib import keras, layers

SIZE = 64


def _config(name, final="deeplabv3", num_classes=5):
    alpha = 0.35 if name == "mobilenet_v2" else 1.0
    return network.NetworkConfig(backbones.BackboneConfig(name, 16, alpha), num_classes, (SIZE, SIZE),
                                 heads.FinalHeadConfig(final, filters=16))


def _images(n=2, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _chain(stages, images):
    """Runs stage models in order, feeding each the named tensors earlier stages returned."""
    carried, logits = {"image": images}, []
    for stage in stages:
        out = stage({name: carried[name] for name in stage.input}, training=False)
        logits.append(out.pop(network.EXIT_LOGITS).numpy())
        out.pop(network.EXIT_COARSE_LOGITS)
        carried.update(out)
    return logits


def _three_exits(net):
    names = [p.name for p in net.backbone.positions]
    return [f"{names[1]}:fcn_w0_b0", f"{names[len(names) // 2]}:fcn_w32_b1_rd", f"{names[-2]}:aspp_w32"]


@pytest.mark.parametrize("name,final", [("mobilenet_v2", "deeplabv3plus"), ("mobilenet_v3_large", "deeplabv3"),
                                        ("mobilenet_v3_small", "deeplabv3plus"), ("resnet50", "deeplabv3"),
                                        ("resnet101", "deeplabv3plus")])
def test_chained_stages_reproduce_the_full_model(name, final):
    net = network.MultiExitNetwork(_config(name, final))
    ids = _three_exits(net)
    net = network.MultiExitNetwork(_config(name, final), ids)
    images = _images()
    full = net.model(images, training=False)
    chained = _chain(net.stage_models(ids), images)
    for got, key in zip(chained, ids + ["final"]):
        assert got.shape == (2, SIZE, SIZE, 5)
        np.testing.assert_allclose(got, full[key].numpy(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mobilenet():
    config = _config("mobilenet_v2")
    probe = network.MultiExitNetwork(config)
    ids = _three_exits(probe) + [f"{probe.backbone.positions[1].name}:fcn_w32_b0"]
    return network.MultiExitNetwork(config, ids)


def test_outputs_are_keyed_by_exit_id_in_depth_order(mobilenet):
    positions = [mobilenet.position_of(e).index for e in mobilenet.exit_ids]
    assert positions == sorted(positions)
    assert list(mobilenet.model.output.keys()) == mobilenet.exit_ids + ["final"]


def test_single_exit_model_is_the_original_network_sharing_weights(mobilenet):
    original = mobilenet.single_exit_model()
    assert list(original.output.keys()) == ["final"]
    assert not any(layer.name.startswith("exit_") for layer in original.layers)
    images = _images(seed=1)
    np.testing.assert_array_equal(original(images)["final"].numpy(), mobilenet.model(images)["final"].numpy())
    conv = original.get_layer("final_logits")
    conv.kernel.assign(conv.kernel + 1.0)  # one set of weights: the full model sees the change
    np.testing.assert_array_equal(original(images)["final"].numpy(), mobilenet.model(images)["final"].numpy())


def test_subset_model_has_only_the_chosen_exits(mobilenet):
    chosen = [mobilenet.exit_ids[2], mobilenet.exit_ids[0]]
    subset = mobilenet.subset_model(chosen)
    assert list(subset.output.keys()) == [mobilenet.exit_ids[0], mobilenet.exit_ids[2], "final"]
    images = _images(seed=2)
    full, part = mobilenet.model(images), subset(images)
    for key in part:
        np.testing.assert_array_equal(part[key].numpy(), full[key].numpy())
    with pytest.raises(ValueError, match=r"exits \['block_1_project_BN:aspp_w999'\] are not in this network"):
        mobilenet.subset_model(["block_1_project_BN:aspp_w999"])


def test_truncated_stages_stop_at_the_last_exit(mobilenet):
    stages = mobilenet.stage_models([mobilenet.exit_ids[1]], truncate=True)
    assert len(stages) == 1
    assert not any(layer.name.startswith("final_") for layer in stages[0].layers)


def test_two_exits_at_one_position_cannot_both_be_stages(mobilenet):
    same = [e for e in mobilenet.exit_ids if mobilenet.position_of(e).index == 1]
    with pytest.raises(ValueError, match="increasing positions"):
        mobilenet.stage_models(same)


def test_bad_exit_ids_are_clear_errors():
    config = _config("mobilenet_v2")
    with pytest.raises(ValueError, match=r"unknown exit-head id 'mlp_w3'"):
        network.MultiExitNetwork(config, ["block_2_add:mlp_w3"])
    with pytest.raises(ValueError, match=r"'conv9_out' is not a candidate position"):
        network.MultiExitNetwork(config, ["conv9_out:fcn_w0_b0"])
    with pytest.raises(ValueError, match="not of the form"):
        network.MultiExitNetwork(config, ["fcn_w0_b0"])


def test_config_round_trips_through_a_dict():
    config = _config("resnet50", "deeplabv3plus")
    assert network.NetworkConfig.from_dict(config.to_dict()) == config


def test_wrapping_a_user_model():
    image = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(image)
    a = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="stage_a")(x)
    b = layers.Conv2D(16, 3, padding="same", activation="relu", name="stage_b")(a)
    logits = layers.Conv2D(4, 1, name="classifier")(b)
    user = keras.Model(image, logits)
    net = network.MultiExitNetwork.wrap(user, ["stage_b", "stage_a"], exits=["stage_a:fcn_w8_b1"])
    assert [p.name for p in net.backbone.positions] == ["stage_a", "stage_b"]
    assert [p.stride for p in net.backbone.positions] == [4, 4]
    images = np.random.RandomState(3).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    out = net.model(images)
    assert out["stage_a:fcn_w8_b1"].shape == (1, 32, 32, 4) and out["final"].shape == (1, 32, 32, 4)
    chained = _chain(net.stage_models(net.exit_ids), images)
    np.testing.assert_allclose(chained[1], out["final"].numpy(), atol=1e-5)


def test_coarse_logits_are_the_exit_before_upsampling_and_stages_return_them(mobilenet):
    ids = [mobilenet.exit_ids[0], mobilenet.exit_ids[-1]]  # at different positions
    images = _images()
    coarse = keras.Model(mobilenet.image, {e: mobilenet.coarse_logits(e) for e in ids + ["final"]})(images)
    full = mobilenet.model(images, training=False)
    carried = {"image": images}
    for eid, stage in zip(ids + ["final"], mobilenet.stage_models(ids)):
        out = stage({name: carried[name] for name in stage.input}, training=False)
        stride = mobilenet.position_of(eid).stride if eid != "final" else 16
        assert coarse[eid].shape == (2, SIZE // stride, SIZE // stride, 5)
        np.testing.assert_allclose(out.pop(network.EXIT_COARSE_LOGITS).numpy(), coarse[eid].numpy(), atol=1e-5)
        # Upsampling the coarse logits gives the exit's logits.
        upsampled = layers.Resizing(SIZE, SIZE, interpolation="bilinear")(coarse[eid]).numpy()
        np.testing.assert_allclose(upsampled, full[eid].numpy(), atol=1e-4)
        out.pop(network.EXIT_LOGITS)
        carried.update(out)
