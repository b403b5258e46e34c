"""The page (web/, LiteRT.js in headless Chromium) against mess_tf.runtime.StagedModel, image by
image, on the demo's test images: the same file and metadata must give the same decisions.

The network is the shipped demo network (trained/: backbone and final head) with two exits whose
heads are freshly initialised (batch norms set on calibration images): what matters here is that
two runtimes agree on one file, and the heads' pixel thresholds are set at the median top-1
probability and the image thresholds between the images' confidences, so images leave at every exit.
"""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mess_tf import deployment, experiment, export, io_utils, network, runtime, shipped, web
from mess_tf.data import demo
from mess_tf.keras_lib import keras, layers

pytestmark = pytest.mark.skipif(web.missing() is not None, reason=f"web tests: {web.missing()}")

EXITS = ("block_4_add:fcn_w32_b1", "block_10_add:fcn_w64_b2_rd")
NUM_IMAGES = 6
TIE_EPSILON = 1e-3  # float logits this close are a tie: either runtime may pick either class
FLOAT_CONFIDENCE_ATOL = 1e-5
INT8_MAX_DIFFERING_PIXELS = 0.001
# Where to write a screenshot of the page (the README's: MESS_TF_SCREENSHOT=web/screenshot.png); none if unset.
SCREENSHOT = os.environ.get("MESS_TF_SCREENSHOT")


def demo_net_with_exits():
    """The shipped demo network with EXITS attached (fresh heads, batch norms set on the
    calibration images; the backbone and final head as shipped)."""
    keras.utils.set_random_seed(0)
    base, _ = shipped.load_network(shipped.folder(experiment.PRESETS["default"].shipped_baseline))
    net = network.MultiExitNetwork(base.config, EXITS)
    shipped_layers = {layer.name: layer for layer in base.model.layers}
    for layer in net.model.layers:
        if layer.name in shipped_layers:
            layer.set_weights(shipped_layers[layer.name].get_weights())
            layer.trainable = False  # frozen: its batch norms keep their statistics below
        elif isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.0
    calibration = np.stack([demo.render_sample("calibration", i)[0] for i in range(8)]).astype(np.float32)
    net.model(calibration, training=True)
    return net, calibration


def median_top1(net, eid, images):
    coarse = keras.Model(net.image, net.coarse_logits(eid))(images).numpy()
    exp = np.exp(coarse - coarse.max(-1, keepdims=True))
    return float(np.median(exp.max(-1) / exp.sum(-1)))


def split_thresholds(confidences):
    """th_img per early exit so that about a third of the images leave at each exit: between two
    confidences, never on one (a threshold on a confidence would make float rounding decide)."""
    remaining = np.asarray(confidences)
    thresholds = []
    for k in range(remaining.shape[1]):
        values = np.sort(remaining[:, k])
        cut = len(values) - max(1, len(values) // (remaining.shape[1] + 1 - k))
        thresholds.append(float((values[cut - 1] + values[cut]) / 2) if cut > 0 else 0.0)
        remaining = remaining[remaining[:, k] < thresholds[-1]]
        if len(remaining) == 0:
            thresholds += [1.0] * (confidences.shape[1] - len(thresholds))
            break
    return thresholds


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The models (float32; int8 with uint8 and with int8 boundaries) and images, served."""
    root = tmp_path_factory.mktemp("web")
    net, calibration = demo_net_with_exits()
    names = [f"test_{i:05d}.png" for i in range(NUM_IMAGES)]
    images = np.stack([demo.render_sample("test", i)[0] for i in range(NUM_IMAGES)])
    (root / "images").mkdir()
    for name, image in zip(names, images):
        Image.fromarray(image).save(root / "images" / name)
    exits = [deployment.ExitChoice(*eid.split(":"), th_pix=round(median_top1(net, eid, images.astype(np.float32)), 4))
             for eid in EXITS]
    config = deployment.DeploymentConfig("dynamic", exits, network=net.config.to_dict())
    for name, precision, integer_io in (("float32", "float32", "int8"), ("int8", "int8", "uint8"),
                                        ("int8_io", "int8", "int8")):
        path = root / f"{name}.tflite"
        export.export_staged_model(path, net, config, precision, list(calibration),
                                   class_names=demo.info("default").class_names,
                                   integer_io=integer_io)
        model = runtime.StagedModel.load(path)
        confidences = np.array([list(model.anytime(image))[-1].confidences for image in images.astype(np.float32)])
        metadata = io_utils.read_json(export.metadata_path(path))
        for stage, th_img in zip(metadata["stages"], split_thresholds(confidences)):
            stage["th_img"] = th_img  # th_img is read by the runtime only: no conversion needed
        io_utils.write_json(export.metadata_path(path), metadata)
    logits = net.subset_model(list(EXITS))(images.astype(np.float32))
    with web.serve(root) as url, web.Page(url, root / "page.log") as page:
        yield {"root": root, "page": page, "names": names, "images": images.astype(np.float32),
               "logits": {eid: value.numpy() for eid, value in logits.items()}}


def top2_gap(logits):
    top = np.sort(logits, axis=-1)
    return top[..., -1] - top[..., -2]


def quantised(confidence, spec):
    return round(confidence / spec["scale"] + spec["zero_point"])


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_page_takes_the_python_runtimes_decisions(served, precision):
    page, root = served["page"], served["root"]
    path = root / f"{precision}.tflite"
    assert page.load_model(f"models/{path.name}") is not None, page.status()
    model = runtime.StagedModel.load(path)
    specs = [model.metadata["signatures"][s.signature]["outputs"][export.CONFIDENCE] for s in model.stages
             if s.is_early_exit]
    print(f"\n{precision}: thresholds {model.thresholds}\n"
          "| image | exit (python / page) | confidences python | confidences page | max abs difference | "
          "class-map pixels differing per exit |\n|---|---|---|---|---|---|")
    for name, image in zip(served["names"], served["images"]):
        python = model.run(image, "dynamic")
        browser = page.segment(f"models/images/{name}", mode="dynamic")
        # Every exit's map, and every early exit's confidence (budgeted at the final exit runs them all).
        maps = [(model.run(image, "budgeted", exit_index=k), page.segment(f"models/images/{name}", mode="budgeted",
                                                                          exit_index=k))
                for k in range(len(model.stages))]
        everything_python, everything_page = maps[-1][0].confidences, maps[-1][1]["confidences"]
        differing = [float((p.class_map != b["class_map"]).mean()) for p, b in maps]
        print(f"| {name} | {python.exit_id} / {browser['exit_id']} | {np.round(everything_python, 6).tolist()} | "
              f"{np.round(everything_page, 6).tolist()} | "
              f"{np.max(np.abs(np.subtract(everything_page, everything_python))):.1e} | "
              f"{[f'{d:.4%}' for d in differing]} |")
        assert browser["exit_index"] == python.exit_index, (
            f"{name}: exit {browser['exit_id']} in the page, {python.exit_id} in Python")
        np.testing.assert_array_equal(browser["class_map"], python.class_map,
                                      err_msg=f"{name}: class map of the exit taken")
        assert browser["confidences"] == pytest.approx(python.confidences, abs=FLOAT_CONFIDENCE_ATOL), name
        for (p, b), eid in zip(maps, model.exit_ids):
            if precision == "float32":
                assert np.all(
                    top2_gap(served["logits"][eid][served["names"].index(name)])[p.class_map != b["class_map"]]
                    < TIE_EPSILON), f"{name}: exit {eid}: class maps differ away from ties"
            else:
                assert (p.class_map != b["class_map"]).mean() <= INT8_MAX_DIFFERING_PIXELS, f"{name}: exit {eid}"
        if precision == "float32":
            assert everything_page == pytest.approx(everything_python, abs=FLOAT_CONFIDENCE_ATOL), name
        else:
            assert ([quantised(c, spec) for c, spec in zip(everything_page, specs)]
                    == [quantised(c, spec) for c, spec in zip(everything_python, specs)]), name


def test_anytime_deadline_and_the_exits_taken(served):
    page = served["page"]
    assert page.load_model("models/float32.tflite") is not None, page.status()
    image = f"models/images/{served['names'][0]}"
    missed = page.segment(image, mode="anytime", deadline_ms=0)
    assert missed["exit_index"] == 0 and not missed["deadline_met"]
    assert page.segment(image, mode="anytime")["exit_id"] == "final"  # no deadline: to the final exit
    taken = {page.segment(f"models/images/{name}", mode="dynamic")["exit_index"] for name in served["names"]}
    assert taken == {0, 1, 2}, "the thresholds should send images out at every exit"


def test_bad_input_gets_a_message_and_the_page_keeps_working(served):
    page, root = served["page"], served["root"]
    metadata = json.loads((root / "float32.tflite.json").read_text())
    shutil.copy(root / "float32.tflite", root / "bare.tflite")
    shutil.copy(root / "float32.tflite", root / "old.tflite")
    (root / "old.tflite.json").write_text(json.dumps({**metadata, "format": "mess_tf.staged/2"}))
    shutil.copy(root / "int8.tflite", root / "mismatch.tflite")
    (root / "mismatch.tflite.json").write_text(json.dumps(metadata))
    Image.fromarray(served["images"][1].astype(np.uint8)).resize((300, 200)).save(root / "images" / "small.png")
    cases = {"bare": "has no metadata", "old": "metadata format mess_tf.staged/2 is not the one this page reads",
             "mismatch": "is uint8, the metadata says float32",
             "int8_io": "INT8 is not supported. (LiteRT.js has no int8 tensors: export with --integer_io=uint8)"}
    for name, message in cases.items():
        assert page.load_model(f"models/{name}.tflite") is None, name
        status = page.status()
        assert status["kind"] == "error" and message in status["text"], status
        assert page.load_model("models/float32.tflite") is not None, page.status()  # and the page works on
    result = page.segment("models/images/small.png", mode="dynamic")
    assert result["class_map"].shape == (384, 384)
    assert "small.png is 300×200; resized to the model's 384×384" in page.status()["text"]
    if SCREENSHOT:
        # The page as a person sees it: an image that passes both exits to the final one.
        assert page.load_model("models/int8.tflite") is not None
        model = runtime.StagedModel.load(root / "int8.tflite")
        name = next(n for n, image in zip(served["names"], served["images"]) if model.run(image).exit_id == "final")
        page.segment(f"models/images/{name}", mode="dynamic")
        page.screenshot(SCREENSHOT)
