"""Users' own Keras models as MESS networks: wrap -> run folder -> train -> export -> runtime.

Two user models of different shapes: one whose early features reach the head through average
pooling and a concatenation, a U-Net-like one that concatenates upsampled deep features with early
ones. Both are trained briefly on a task they can learn (each pixel's class is which of a few
prototype colours its region has), so their class maps have real margins and int8 can be held to
the float model's mIoU.
"""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from mess_tf import calibration, checkpoints, deployment, export, metrics, network, policy, runtime, training
from mess_tf.costs import macs
from mess_tf.costs import model as cost_model
from mess_tf.keras_lib import keras, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOTYPES = np.array([[230, 40, 40], [40, 200, 60], [50, 60, 220], [220, 210, 50], [150, 60, 170]], np.float32)


def _conv(x, filters, stride, name):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=name + "_conv")(x)
    return layers.ReLU(name=name)(layers.BatchNormalization(name=name + "_bn")(x))


def pooled_skip_model(size=(64, 64), classes=4):
    """Stride 8; the stride-4 features are average-pooled and concatenated before the classifier."""
    image = keras.Input(size + (3,), name="image")
    x = _conv(layers.Rescaling(1 / 127.5, offset=-1)(image), 8, 2, "stem")
    a = _conv(x, 16, 2, "stage_a")
    c = _conv(_conv(a, 24, 2, "stage_b"), 24, 1, "stage_c")
    x = layers.Concatenate(name="fuse")([c, layers.AveragePooling2D(2, name="skip_pool")(a)])
    return keras.Model(image, layers.Conv2D(classes, 1, name="classifier")(x), name="pooled_skip")


def unet_model(size=(48, 80), classes=5):
    """Stride 4 output; stride-16 features upsampled and concatenated with the stride-4 ones."""
    image = keras.Input(size + (3,), name="image")
    x = _conv(layers.Rescaling(1 / 127.5, offset=-1)(image), 8, 2, "stem")
    a = _conv(x, 16, 2, "stage_a")
    c = _conv(_conv(a, 32, 2, "stage_b"), 32, 2, "stage_c")
    x = layers.Concatenate(name="fuse")([layers.UpSampling2D(4, interpolation="bilinear", name="up")(c), a])
    return keras.Model(image, layers.Conv2D(classes, 1, name="classifier")(_conv(x, 16, 1, "decode")), name="unet")


MODELS = {"pooled_skip": (pooled_skip_model, ["stage_a:fcn_w16_b1", "stage_b:fcn_w16_b0"]),
          "unet": (unet_model, ["stage_a:fcn_w16_b0", "stage_b:fcn_w16_b1_rd"])}


def colour_regions(n, size, classes, seed):
    """Images of 8x8-pixel blocks in prototype colours (+ noise), labelled by the colour's index."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, classes, (n, size[0] // 8, size[1] // 8))
    labels = blocks.repeat(8, 1).repeat(8, 2)
    images = PROTOTYPES[labels] + rng.normal(0, 20, labels.shape + (3,))
    return np.clip(images, 0, 255).astype(np.float32), labels.astype(np.uint8)


def train_jointly(net, images, labels, steps=120):
    """Every exit and the final exit trained together (Adam): a few seconds on the CPU."""
    optimizer = keras.optimizers.Adam(1e-2)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = net.model.trainable_variables
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.choice(len(images), 8)
        with tf.GradientTape() as tape:
            outputs = net.model(images[batch], training=True)
            total = tf.add_n([loss(labels[batch], logits) for logits in outputs.values()])
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))


def miou(class_maps, labels, classes):
    matrix = metrics.ConfusionMatrix(classes, 255)
    for class_map, label in zip(class_maps, labels):
        matrix.update(class_map, label)
    return matrix.miou()


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, tmp_path_factory):
    """(name, trained wrapped network with exits, test images, labels, folder)."""
    name = request.param
    make, exits = MODELS[name]
    folder = tmp_path_factory.mktemp(name)
    keras.utils.set_random_seed(0)
    user = make()
    user.save(str(folder / "user.keras"))
    wrapped = checkpoints.wrap_run(str(folder / "user.keras"), ["stage_c", "stage_a", "stage_b"], str(folder / "run"))
    net = network.build(wrapped.config, exits)
    size, classes = net.backbone.input_size, net.config.num_classes
    train_jointly(net, *colour_regions(64, size, classes, seed=1))
    return name, net, *colour_regions(6, size, classes, seed=2), folder


def _dynamic_config(net):
    exits = [deployment.ExitChoice(*eid.split(":"), th_pix=0.8, th_img=0.6) for eid in net.exit_ids]
    return deployment.DeploymentConfig("dynamic", exits, network=net.config.to_dict())


def test_a_wrap_run_reloads_the_users_model_and_weights(trained):
    name, _, images, _, folder = trained
    run = str(folder / "run")
    reloaded, run_config = checkpoints.load_network(run)
    assert run_config["network"]["kind"] == "wrapped" and run_config["network"]["position_names"] == [
        "stage_a", "stage_b", "stage_c"]
    assert reloaded.config.model_path == os.path.join(os.path.abspath(run), checkpoints.USER_MODEL)
    user = keras.models.load_model(str(folder / "user.keras"), compile=False)
    np.testing.assert_allclose(reloaded.model(images[:2])["final"],
                               tf.image.resize(user(images[:2]), images.shape[1:3]), atol=1e-5)


def test_float_staged_model_equals_keras_except_at_ties(trained, tmp_path):
    _, net, images, _, _ = trained
    path = tmp_path / "float.tflite"
    metadata = export.export_staged_model(path, net, _dynamic_config(net), "float32")
    assert metadata["network"]["kind"] == "wrapped" and metadata["input"]["size"] == list(net.backbone.input_size)
    model = runtime.StagedModel.load(path)
    expected = net.model(images)
    for i, image in enumerate(images):
        for result in model.anytime(image):
            logits = expected[result.exit_id].numpy()[i]
            top = np.sort(logits, -1)
            differ = result.class_map != np.argmax(logits, -1)
            assert np.all((top[..., -1] - top[..., -2])[differ] < 1e-3)


def test_int8_staged_model_keeps_the_keras_miou_in_every_mode(trained, tmp_path):
    name, net, images, labels, _ = trained
    calibration, _ = colour_regions(16, net.backbone.input_size, net.config.num_classes, seed=3)
    path = tmp_path / "int8.tflite"
    export.export_staged_model(path, net, _dynamic_config(net), "int8", calibration_images=list(calibration))
    model = runtime.StagedModel.load(path)
    keras_outputs = net.model(images)
    for k, eid in enumerate(model.exit_ids):  # every exit, run to it in budgeted mode
        expected = miou(np.argmax(keras_outputs[eid].numpy(), -1), labels, net.config.num_classes)
        got = miou([model.run(image, "budgeted", exit_index=k).class_map for image in images], labels,
                   net.config.num_classes)
        # Learned (chance is about 0.15; a stride-16 exit blurs the 8-pixel blocks: 0.76), and int8 within 1 pp.
        assert expected > 0.6 and abs(got - expected) <= 0.01, (name, eid, got, expected)
    dynamic = [model.run(image) for image in images]
    taken = {r.exit_id for r in dynamic}
    assert miou([r.class_map for r in dynamic], labels, net.config.num_classes) > 0.6 and taken
    anytime = model.run(images[0], "anytime", deadline_ms=1e6)
    assert anytime.exit_id == "final" and anytime.confidences and len(anytime.stage_ms) == 3


def test_budgeted_float16_export_of_a_wrapped_network_runs(trained, tmp_path):
    _, net, images, _, _ = trained
    config = deployment.DeploymentConfig("budgeted", [deployment.ExitChoice(*net.exit_ids[0].split(":"))],
                                         network=net.config.to_dict())
    path = tmp_path / "budgeted.tflite"
    export.export_staged_model(path, net, config, "float16")
    result = runtime.StagedModel.load(path).run(images[0])
    expected = np.argmax(net.model(images[:1])[net.exit_ids[0]].numpy()[0], -1)
    assert result.exit_id == net.exit_ids[0] and np.mean(result.class_map == expected) > 0.99


def test_timed_parts_chain_to_the_wrapped_network_and_cost_its_own_head(trained):
    """What profiling and int8 calibration run: segments, heads and a final head that reads the
    user's skip from an earlier position."""
    _, net, images, _, _ = trained
    parts, sources = export.part_models(net), export.part_sources(net, net.exit_ids)
    outputs = {"image": images[:1]}
    for key, sourced in sources.items():
        feeds = {name: outputs[source] for name, source in sourced.items()}
        outputs[key] = parts[key](feeds if len(feeds) > 1 else next(iter(feeds.values()))).numpy()
    assert set(sources["final_head"].values()) == {"segment:stage_a", "segment:stage_c"}  # the skip is an input
    expected = keras.Model(net.image, net.coarse_logits("final"))(images[:1]).numpy()
    np.testing.assert_allclose(outputs["final_head"], expected, atol=1e-4)
    after_backbone = [layer for layer in net.model.layers if layer.name in ("classifier", "decode_conv", "skip_pool")]
    assert cost_model.costs_of(net).final_head.macs == sum(macs.macs_of_layer(layer) for layer in after_backbone) > 0


def test_stage_two_trains_the_exits_of_a_wrap_run_and_calibrates(tmp_path):
    """The user's path after tools.wrap: stage 2 from the run (their model frozen), then calibration."""
    keras.utils.set_random_seed(0)
    pooled_skip_model().save(str(tmp_path / "user.keras"))
    wrapped = checkpoints.wrap_run(str(tmp_path / "user.keras"), ["stage_a", "stage_b", "stage_c"],
                                   str(tmp_path / "run"))
    images, labels = colour_regions(16, (64, 64), 4, seed=5)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4)
    config = training.TrainConfig(stage="stage2", steps=4, batch_size=4, optimizer="adamw", learning_rate=1e-2,
                                  heads=["fcn_w16_b0"], positions=["stage_a"], eval_batches=0, log_every=4)
    result = training.train(wrapped.config, config, data, str(tmp_path / "stage2"), init_from=str(tmp_path / "run"))
    net, run_config = checkpoints.load_network(result.checkpoint)
    assert net.exit_ids == ["stage_a:fcn_w16_b0"] and network.config_from_dict(run_config["network"]) == wrapped.config
    np.testing.assert_allclose(net.model(images[:2])["final"], wrapped.model(images[:2])["final"], atol=1e-5)  # frozen
    batches = [(images[:8], labels[:8])]
    cache = calibration.calibrate_network(net, result.checkpoint, batches, [f"i{k}" for k in range(8)],
                                          np.linspace(0.5, 0.95, 3), policy.PolicyConfig())
    assert list(cache.exit_ids) == ["stage_a:fcn_w16_b0"] and cache.network_config["kind"] == "wrapped"
    assert cache.network_identity == cost_model.network_identity(net)  # the search checks the table against it


def _evil_hdf5_model(path, marker):
    """A model whose Lambda creates `marker` whenever Keras builds it, saved as HDF5 and named `path` (.keras)."""
    image = keras.Input((32, 32, 3), name="image")
    touched = layers.Lambda(lambda x, m=str(marker): (open(m, "w").close(), x)[1], name="side_effect")(image)
    keras.Model(image, layers.Conv2D(2, 1, name="classifier")(touched)).save(str(path) + ".h5")
    os.rename(str(path) + ".h5", path)
    os.remove(marker)  # building it above ran the Lambda once


def test_a_renamed_hdf5_model_is_refused_and_none_of_its_code_runs(tmp_path):
    evil, marker = tmp_path / "evil.keras", tmp_path / "ran"
    _evil_hdf5_model(evil, marker)
    refusal = f"cannot load Keras model {evil}: it is an HDF5 (.h5) model, whose loader can run code stored in the file"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        checkpoints.wrap_run(str(evil), ["classifier"], str(tmp_path / "run"))
    wrapped = network.WrappedConfig(str(evil), ["classifier"], 2, (32, 32))  # a run config pointing at it
    with pytest.raises(ValueError, match=re.escape(refusal)):
        network.build(wrapped)  # what tools.train --init_from and every tool taking the run call
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_model_file_naming_a_module_outside_keras_is_refused_before_it_is_imported(tmp_path, monkeypatch):
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    keras.utils.set_random_seed(0)
    pooled_skip_model().save(str(tmp_path / "user.keras"))
    with zipfile.ZipFile(tmp_path / "user.keras") as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(entries["config.json"])
    config["module"] = "planted"  # where Keras is to find the model's class: it would import planted.py
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "planted.keras", "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    refusal = "it names ['planted.Functional'], outside Keras, which loading would import"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        network.load_user_model(str(tmp_path / "planted.keras"))
    assert not (tmp_path / "ran").exists() and "planted" not in sys.modules


def test_wrap_never_writes_into_a_folder_that_is_not_empty(tmp_path):
    keras.utils.set_random_seed(0)
    pooled_skip_model().save(str(tmp_path / "user.keras"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")  # an earlier run's, with its checkpoints
    (run / "ckpt-100.index").write_bytes(b"index")
    with pytest.raises(ValueError, match=re.escape(f"{run} is not empty (it holds ckpt-100.index, run_config.json): "
                                                   f"wrap writes a new run folder and never replaces one")):
        checkpoints.wrap_run(str(tmp_path / "user.keras"), ["stage_a", "stage_b"], str(run))
    assert sorted(os.listdir(run)) == ["ckpt-100.index", "run_config.json"]
    assert (run / "run_config.json").read_text() == "{}"


def _deeplab(nested):
    """A user's DeepLab-like model on a MobileNetV2, called as one layer (nested) or built into one graph."""
    image = keras.Input((32, 32, 3), name="image")
    if nested:
        base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
        features = base(image)
    else:  # the README's two lines
        base = keras.applications.MobileNetV2(input_tensor=image, alpha=0.35, include_top=False, weights=None)
        features = base.get_layer("block_5_add").output
    return keras.Model(image, layers.Conv2D(3, 1, name="classifier")(features), name="user_deeplab")


def test_models_wrap_cannot_cut_are_refused_saying_what_to_do():
    flat = network.MultiExitNetwork.wrap(_deeplab(nested=False), ["block_2_add", "block_5_add"])
    assert [p.name for p in flat.backbone.positions] == ["block_2_add", "block_5_add"]
    image = keras.Input((32, 32, 3))
    conv = layers.Conv2D(3, 1, name="classifier")
    any_size = keras.Input((None, None, 3))
    grey = keras.Input((32, 32, 1))
    for model, positions, message in [
            (_deeplab(nested=True), ["block_2_add"], "calls the model(s) ['mobilenetv2_0.35_32'] as one layer, so "
                                                     "the layers inside (the exit positions) are not in its graph; "
                                                     "build it as one functional graph"),
            (keras.Model(any_size, conv(any_size)), ["classifier"], "takes input of shape (None, None, 3); expected "
                                                                    "RGB images of a fixed size (H, W, 3)"),
            (keras.Model(grey, layers.Conv2D(3, 1)(grey)), ["classifier"], "takes input of shape (32, 32, 1)"),
            (keras.Model(image, [conv(image), layers.Conv2D(3, 1)(image)]), ["classifier"],
             "has 1 input(s) and 2 output(s); expected one input")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            network.MultiExitNetwork.wrap(model, positions)


def _cli(*flags, tool="wrap"):
    result = subprocess.run([sys.executable, "-m", f"tools.{tool}", *flags], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return result.returncode, result.stdout, result.stderr


def test_wrap_cli_writes_a_run_and_refuses_bad_input_in_one_line(tmp_path):
    keras.utils.set_random_seed(0)
    user = pooled_skip_model()
    user.save(str(tmp_path / "user.keras"))
    code, stdout, stderr = _cli(f"--model={tmp_path / 'user.keras'}", "--positions=stage_a,stage_b,stage_c",
                                f"--output_dir={tmp_path / 'run'}", "--class_names=red,green,blue,yellow")
    assert code == 0, stderr
    assert "position stage_a: stride 4, 16 channels" in stdout
    run_config = checkpoints.read_run_config(str(tmp_path / "run"))
    assert run_config["class_names"] == ["red", "green", "blue", "yellow"]
    final_only = deployment.DeploymentConfig("dynamic", [], network=run_config["network"])
    final_only.save(str(tmp_path / "CONFIG.json"))
    export_flags = [f"--checkpoint={tmp_path / 'run'}", f"--config={tmp_path / 'CONFIG.json'}", "--precision=float32",
                    f"--output={tmp_path / 'model.tflite'}"]
    code, _, stderr = _cli(*export_flags, tool="export")
    assert code == 0, stderr
    assert runtime.StagedModel.load(tmp_path / "model.tflite").metadata["classes"] == ["red", "green", "blue", "yellow"]
    deployment.DeploymentConfig("dynamic", [], network={**run_config["network"], "num_classes": 5,
                                                        "position_names": ["stage_a"]}).save(
        str(tmp_path / "CONFIG.json"))
    code, _, stderr = _cli(*export_flags, tool="export")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        "error: the deployment config was made for another network than the one exported (config -> network: "
        "num_classes: 5 -> 4; position_names: ['stage_a'] -> ['stage_a', 'stage_b', 'stage_c'])")
    for k, (flags, message) in enumerate([
            (["--positions=stage_a,nowhere"], "layers ['nowhere'] are not in model 'pooled_skip'"),
            (["--positions=stage_a,stem"], None),  # order does not matter: both lie on every path
            (["--positions=skip_pool,stage_c"], "positions ['skip_pool'] of model 'pooled_skip' are bypassed"),
            (["--positions=stage_a", "--class_names=a,b"], "2 class names given; "),
    ]):
        code, _, stderr = _cli(f"--model={tmp_path / 'user.keras'}", *flags, f"--output_dir={tmp_path / f'other{k}'}")
        if message is None:
            assert code == 0, stderr
            continue
        assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    (tmp_path / "notes.keras").write_text("not a zip")
    code, _, stderr = _cli(f"--model={tmp_path / 'notes.keras'}", "--positions=a", f"--output_dir={tmp_path / 'x'}")
    assert code == 2 and stderr.splitlines()[-1].startswith(
        f"error: cannot load Keras model {tmp_path / 'notes.keras'}")
    _deeplab(nested=True).save(str(tmp_path / "nested.keras"))
    code, _, stderr = _cli(f"--model={tmp_path / 'nested.keras'}", "--positions=block_2_add",
                           f"--output_dir={tmp_path / 'nested'}")
    assert code == 2 and "Traceback" not in stderr and stderr.splitlines()[-1].endswith(
        "not base(image) (two lines in the README's quick start for your own model)")
    assert not (tmp_path / "x").exists() and not (tmp_path / "nested").exists()
