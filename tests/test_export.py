"""TFLite conversion: parts and complete networks of every backbone, staged models, int8 hand-off."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mess_tf import backbones, deployment, export, heads, network, policy, runtime
from mess_tf.keras_lib import keras, layers

EXITS = ("block_2_add:fcn_w16_b0", "block_6_project_BN:fcn_w16_b1_rd")


def calibrate_batch_norm(net, images):
    """Gives a random-weight network batch-norm statistics of real activations, so its
    activations neither vanish nor explode with depth and its class maps have real margins."""
    for layer in net.model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.0
    net.model(images, training=True)


def tiny_config(num_classes=5, kind="deeplabv3"):
    return network.NetworkConfig(
        backbone=backbones.BackboneConfig("mobilenet_v2", output_stride=16, alpha=0.35, weights=None),
        num_classes=num_classes, input_size=(64, 64),
        final_head=heads.FinalHeadConfig(kind, filters=16, separable=True))


def images(n, seed=0, size=64):
    """Smooth random images: low-resolution noise upsampled, RGB 0..255."""
    rng = np.random.RandomState(seed)
    small = rng.uniform(0, 255, (n, size // 8, size // 8, 3)).astype(np.float32)
    return tf.image.resize(small, (size, size)).numpy() + rng.normal(0, 8, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_net():
    keras.utils.set_random_seed(0)
    net = network.MultiExitNetwork(tiny_config(), EXITS)
    calibrate_batch_norm(net, images(8, seed=1))
    return net


def dynamic_config(net, th_pix=0.5, th_img=0.5):
    exits = [deployment.ExitChoice(*eid.split(":"), th_pix=th_pix, th_img=th_img) for eid in net.exit_ids]
    return deployment.DeploymentConfig("dynamic", exits, network=net.config.to_dict())


def run_signature(model_bytes, key, **inputs):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model_bytes).get_signature_runner(key)(**inputs)


# A position half-way down each backbone (at 32x32, output stride 8).
MIDDLE_POSITIONS = {"mobilenet_v2": "block_8_add", "mobilenet_v3_large": "expanded_conv_7/Add",
                    "mobilenet_v3_small": "expanded_conv_5/Add", "resnet50": "conv4_block2_out",
                    "resnet101": "conv4_block10_out"}
SLOW = pytest.mark.skipif(not os.environ.get("MESS_TF_SLOW_TESTS"),
                          reason="ResNets take 25-50 s to build and convert; set MESS_TF_SLOW_TESTS=1")


@pytest.mark.parametrize("name", [n if n.startswith("mobilenet") else pytest.param(n, marks=SLOW)
                                  for n in backbones.BACKBONES])
def test_every_backbone_with_aspp_dilation_and_resize_converts(name):
    # Output stride 8 dilates the deepest blocks; an aspp exit, a rapid-dilation fcn exit and the
    # DeepLabV3 head add ASPP (dilated separable convs, image pooling) and bilinear resizes.
    keras.utils.set_random_seed(0)
    config = network.NetworkConfig(backbones.BackboneConfig(name, output_stride=8, weights=None, alpha=0.35
                                                            if name.startswith("mobilenet") else 1.0),
                                   num_classes=3, input_size=(32, 32), final_head=heads.FinalHeadConfig(filters=16))
    middle = MIDDLE_POSITIONS[name]
    net = network.MultiExitNetwork(config, [f"{middle}:aspp_w16_rd", f"{middle}:fcn_w16_b2_rd"])
    model = net.model
    model_bytes = export.convert_model(model, "float32")
    image = images(1, size=32)
    outputs = run_signature(model_bytes, "serving_default", input=image)
    expected = model(image)
    for eid in net.exit_ids + ["final"]:
        np.testing.assert_allclose(outputs[eid], expected[eid].numpy(), atol=1e-3, rtol=1e-3)


def test_parts_chain_to_the_network_and_convert(tiny_net):
    parts = export.part_models(tiny_net)
    positions = [p.name for p in tiny_net.backbone.positions]
    exit_positions = [e.split(":")[0] for e in tiny_net.exit_ids]
    assert list(parts) == ([f"segment:{p}" for p in positions] + [f"head:{e}" for e in tiny_net.exit_ids]
                           + [f"class_map:{p}" for p in exit_positions] + ["final_head"])
    image = images(1)
    features, x = {}, image
    for p in positions:
        x = parts[f"segment:{p}"](x).numpy()
        features[p] = x
    expected = tiny_net.model(image)
    for eid, position in zip(tiny_net.exit_ids, exit_positions):
        coarse = parts[f"head:{eid}"](features[position])
        network_coarse = keras.Model(tiny_net.image, tiny_net.coarse_logits(eid))(image)
        np.testing.assert_allclose(coarse.numpy(), network_coarse.numpy(), atol=1e-4)
        # A class map takes the coarse logits as they are; its signature resizes them (below).
        passed = parts[f"class_map:{position}"]({export.COARSE_LOGITS: coarse})
        np.testing.assert_array_equal(passed.numpy(), coarse.numpy())
    final = parts["final_head"](features[positions[-1]])
    network_final = keras.Model(tiny_net.image, tiny_net.coarse_logits("final"))(image)
    np.testing.assert_allclose(final.numpy(), network_final.numpy(), atol=1e-4)

    # Converted (as convert_parts does), each part ends with what a staged model computes after it.
    def convert(key):
        outputs = export._part_outputs(tiny_net, key, "float16", policy.PolicyConfig())
        return export.convert_model(parts[key], "float16", outputs=outputs)

    head = run_signature(convert(f"head:{EXITS[1]}"), "serving_default", input=features["block_6_project_BN"])
    assert sorted(head) == sorted([export.CONFIDENCE, export.COARSE_LOGITS]) and 0 <= head[export.CONFIDENCE][0] <= 1
    class_map = run_signature(convert("class_map:block_6_project_BN"), "serving_default",
                              **{export.COARSE_LOGITS: head[export.COARSE_LOGITS]})[export.CLASS_MAP]
    agree = class_map[0] == expected[EXITS[1]].numpy()[0].argmax(-1)
    assert class_map.dtype == np.uint8 and agree.mean() > 0.98  # float16 flips near-ties only
    # class_map_stride=2: the argmax of the logits resized to half the input, upsampled by the app.
    halved = export._part_outputs(tiny_net, "class_map:block_6_project_BN", "float32",
                                  policy.PolicyConfig(class_map_stride=2))
    small = run_signature(export.convert_model(parts["class_map:block_6_project_BN"], "float32", outputs=halved),
                          "serving_default", **{export.COARSE_LOGITS: head[export.COARSE_LOGITS]})[export.CLASS_MAP]
    want = tf.image.resize(head[export.COARSE_LOGITS], (32, 32)).numpy().argmax(-1)
    assert small.shape == (1, 32, 32) and (small == want).mean() > 0.99
    assert export.upsample_class_map(small, 2).shape == (1, 64, 64)
    calibration = export._part_calibration(tiny_net, {"final_head": export._final_head_part(tiny_net)}, images(4))
    int8 = export.convert_model(parts["final_head"], "int8", calibration["final_head"])
    from ai_edge_litert.interpreter import Interpreter
    details = Interpreter(model_content=int8).get_signature_runner().get_input_details()
    assert [d["dtype"] for d in details.values()] == [np.int8]


def test_unknown_precision_and_missing_calibration_are_clear_errors(tiny_net):
    with pytest.raises(ValueError, match="precision 'int4'"):
        export.build_model(tiny_net, dynamic_config(tiny_net), "int4")
    with pytest.raises(ValueError, match="calibration"):
        export.build_model(tiny_net, dynamic_config(tiny_net), "int8")
    with pytest.raises(ValueError, match=r"calibration image 0 has shape \(32, 32, 3\)"):
        export.build_model(tiny_net, dynamic_config(tiny_net), "int8", calibration_images=images(1, size=32))


def test_staged_model_signatures_metadata_and_weights_stored_once(tiny_net, tmp_path):
    # The policy the configuration was searched under (its metadata) is the one baked in.
    searched_under = policy.PolicyConfig("entropy", edge_smoothing=False)
    config = dataclasses.replace(dynamic_config(tiny_net), metadata={"policy": searched_under.to_dict()})
    path = tmp_path / "model.tflite"
    metadata = export.export_staged_model(path, tiny_net, config, "float32", class_names=list("abcde"))
    on_disk = json.loads((tmp_path / "model.tflite.json").read_text())
    assert on_disk == json.loads(json.dumps(metadata))
    metadata = on_disk
    assert [s["signature"] for s in metadata["stages"]] == ["stage_1", "stage_2", "stage_3"]
    assert [s["class_map_signature"] for s in metadata["stages"]] == ["class_map_1", "class_map_2", None]
    from ai_edge_litert.interpreter import Interpreter
    signatures = Interpreter(model_path=str(path)).get_signature_list()
    assert sorted(signatures) == ["class_map_1", "class_map_2", "stage_1", "stage_2", "stage_3"]
    # Early stages hand on coarse logits, not a class map: the upsampling waits for an exit.
    assert sorted(signatures["stage_1"]["outputs"]) == sorted(["block_2_add", export.COARSE_LOGITS, export.CONFIDENCE])
    assert sorted(signatures["stage_3"]["outputs"]) == [export.CLASS_MAP]
    assert [s["exit_id"] for s in metadata["stages"]] == config.exit_ids
    assert metadata["stages"][1]["inputs"] == ["block_2_add"]
    assert metadata["stages"][1]["features"] == ["block_6_project_BN"]
    assert metadata["classes"] == list("abcde")
    assert policy.PolicyConfig.from_dict(metadata["policy"]) == searched_under
    assert metadata["input"]["size"] == [64, 64] and metadata["mode"] == "dynamic"
    assert network.NetworkConfig.from_dict(metadata["network"]) == tiny_net.config
    assert deployment.DeploymentConfig.from_dict(metadata["deployment"]).exits == config.exits
    # Staging stores the weights once: the staged file is within 5% of the unstaged one.
    unstaged, _ = export.build_model(tiny_net, config, "float32", staged=False)
    assert abs(path.stat().st_size / len(unstaged) - 1) < 0.05

    # A configuration that differs only in provenance is copied; any other one is refused.
    relabelled = dataclasses.replace(config, metadata={"requirement": "other"})
    copied = export.copy_staged_model(path, tmp_path / "copy.tflite", relabelled)
    assert (tmp_path / "copy.tflite").read_bytes() == path.read_bytes()
    assert copied["deployment"]["metadata"] == {"requirement": "other"} and copied["stages"] == metadata["stages"]
    with pytest.raises(ValueError, match="model.tflite deploys"):
        export.copy_staged_model(path, tmp_path / "wrong.tflite", dynamic_config(tiny_net, th_img=0.9))
    assert not (tmp_path / "wrong.tflite").exists()


def test_a_model_and_its_metadata_are_written_together_or_not_at_all(tiny_net, tmp_path, json_writes_fill_the_disk):
    config = deployment.DeploymentConfig("budgeted", [deployment.ExitChoice("block_2_add", "fcn_w16_b0")])
    path = tmp_path / "model.tflite"
    with pytest.raises(OSError) as raised:
        export.export_staged_model(path, tiny_net, config, "float32")
    assert raised.value.filename == export.metadata_path(path) and os.listdir(tmp_path) == []


def test_budgeted_model_is_truncated_after_its_exit(tiny_net):
    config = deployment.DeploymentConfig("budgeted", [deployment.ExitChoice("block_2_add", "fcn_w16_b0")])
    model_bytes, stages = export.build_model(tiny_net, config, "float32")
    assert [s.exit_id for s in stages] == [EXITS[0]] and stages[0].features == ()
    assert stages[0].class_map_signature is None  # its one exit is always taken: it returns the map itself
    full, _ = export.build_model(tiny_net, dynamic_config(tiny_net), "float32")
    assert len(model_bytes) < 0.5 * len(full)  # the rest of the backbone and the heads are gone


def test_int8_stages_hand_off_int8_feature_maps_with_equal_scales(tiny_net):
    model_bytes, stages = export.build_model(tiny_net, dynamic_config(tiny_net), "int8",
                                             calibration_images=images(6, seed=2))
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_content=model_bytes)
    first = interpreter.get_signature_runner("stage_1").get_output_details()["block_2_add"]
    second = interpreter.get_signature_runner("stage_2").get_input_details()["block_2_add"]
    assert first["dtype"] == second["dtype"] == np.int8
    assert first["quantization"][1] == second["quantization"][1]
    np.testing.assert_allclose(first["quantization"][0], second["quantization"][0], rtol=export.SCALE_RTOL)
    # An early exit's coarse logits go to its class-map signature as they are, too.
    coarse = interpreter.get_signature_runner("stage_1").get_output_details()[export.COARSE_LOGITS]
    read = interpreter.get_signature_runner("class_map_1").get_input_details()[export.COARSE_LOGITS]
    assert coarse["dtype"] == read["dtype"] == np.int8 and coarse["quantization"][1] == read["quantization"][1]
    np.testing.assert_allclose(coarse["quantization"][0], read["quantization"][0], rtol=export.SCALE_RTOL)
    # The check fails loudly on stages that do not chain.
    with pytest.raises(ValueError, match="int8 hand-off -> stage_3: feature map 'block_6_project_BN' is not an output"):
        export.check_int8_handoff(model_bytes, [stages[0], stages[2]])


def test_int8_features_skip_the_stages_that_do_not_read_them():
    # DeepLabV3+ reads the stride-4 features (block_2_add, computed in stage 1) only in the final
    # stage. Passed through stage 2 they would be a tensor no op touches, which int8 conversion
    # leaves unquantised (scale 0); they go from stage 1 to stage 3 directly instead.
    keras.utils.set_random_seed(0)
    exits = ("block_4_add:fcn_w16_b0", "block_8_add:fcn_w16_b0")
    net = network.MultiExitNetwork(tiny_config(kind="deeplabv3plus"), exits)
    calibrate_batch_norm(net, images(8, seed=1))
    model_bytes, stages = export.build_model(net, dynamic_config(net), "int8", calibration_images=images(4, seed=2))
    assert "block_2_add" in stages[0].features and "block_2_add" in stages[2].inputs
    assert "block_2_add" not in stages[1].inputs + stages[1].features
    export.check_int8_handoff(model_bytes, stages)


def test_uint8_boundaries_change_no_result_and_are_in_the_metadata(tiny_net, tmp_path):
    # LiteRT.js has no int8 tensors. uint8 boundaries: the same int8 model inside, each boundary
    # tensor with the same scale and its zero point + 128, and the same results.
    config, calibration = dynamic_config(tiny_net, th_pix=0.4), images(6, seed=2)
    models = {}
    for integer_io in export.INTEGER_IO:
        path = tmp_path / f"{integer_io}.tflite"
        export.export_staged_model(path, tiny_net, config, "int8", calibration, integer_io=integer_io)
        models[integer_io] = runtime.StagedModel.load(path)
    int8, uint8 = (models[k].metadata["signatures"] for k in export.INTEGER_IO)
    assert uint8.keys() == int8.keys() == {"stage_1", "stage_2", "stage_3", "class_map_1", "class_map_2"}
    for key in int8:
        for side in ("inputs", "outputs"):
            for name, spec in int8[key][side].items():
                other = uint8[key][side][name]
                if name == export.CLASS_MAP:
                    assert spec["dtype"] == other["dtype"] == "uint8"
                    continue
                assert (spec["dtype"], other["dtype"]) == ("int8", "uint8") and spec["shape"] == other["shape"]
                assert other["zero_point"] == spec["zero_point"] + 128 and other["scale"] == spec["scale"]
    for image in images(4, seed=7):
        for a, b in zip(models["int8"].anytime(image), models["uint8"].anytime(image)):
            np.testing.assert_array_equal(a.class_map, b.class_map)
            assert a.confidences == b.confidences
    with pytest.raises(ValueError, match="integer_io 'int16'"):
        export.build_model(tiny_net, config, "int8", calibration, integer_io="int16")
