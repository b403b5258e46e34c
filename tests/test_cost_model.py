"""The analytic cost model agrees with the layers actually built, and the describe CLI."""
import json
import subprocess
import sys

import pytest

from mess_tf import backbones, heads, network
from mess_tf.costs import macs
from mess_tf.costs import model as cost_model
from tools import describe

CONFIG = network.NetworkConfig(backbones.BackboneConfig("mobilenet_v2", 16, 0.35), 5, (64, 64),
                               heads.FinalHeadConfig("deeplabv3plus", filters=16))
SPACE = [heads.ExitHeadConfig("fcn", 0, 0), heads.ExitHeadConfig("fcn", 16, 1, True), heads.ExitHeadConfig("aspp", 16)]


@pytest.fixture(scope="module")
def built():
    probe = network.MultiExitNetwork(CONFIG)
    ids = [f"{p.name}:{h.id}" for p in probe.backbone.positions[::5] for h in SPACE]
    net = network.MultiExitNetwork(CONFIG, ids)
    return net, cost_model.network_costs(CONFIG, SPACE, backbone=net.backbone)


def _built_macs(model, prefix):
    return sum(macs.macs_of_layer(layer) for layer in model.layers if layer.name.startswith(prefix))


def test_segments_sum_to_the_backbone(built):
    net, costs = built
    assert costs.backbone_macs == net.backbone.positions[-1].cumulative_macs
    assert costs.backbone_macs == sum(macs.layer_macs(net.backbone.model).values())
    cumulative = 0
    for p in net.backbone.positions:
        cumulative += costs.segments[p.name].macs
        assert cumulative == p.cumulative_macs
    assert sum(c.params for c in costs.segments.values()) == net.backbone.model.count_params()


def test_head_costs_match_the_built_network(built):
    net, costs = built
    for eid in net.exit_ids:
        position, head = network.parse_exit_id(eid)
        prefix = network._layer_prefix(position, head.id) + "_"
        assert costs.heads[eid].macs == _built_macs(net.model, prefix), eid
        assert costs.heads[eid].params == sum(
            layer.count_params() for layer in net.model.layers if layer.name.startswith(prefix))
    assert costs.final_head.macs == _built_macs(net.model, "final_")


def test_bare_classifier_cost_is_a_1x1_conv(built):
    net, costs = built
    p = net.backbone.positions[5]
    h, w = net.backbone.feature(p.name).shape[1:3]
    assert costs.heads[f"{p.name}:fcn_w0_b0"].macs == h * w * p.channels * CONFIG.num_classes


def test_cost_table_composes_a_configuration(built):
    from mess_tf.deployment import DeploymentConfig, ExitChoice

    net, costs = built
    table = costs.cost_table()
    p = net.backbone.positions[5]
    config = DeploymentConfig("dynamic", [ExitChoice(p.name, "fcn_w0_b0", 0.9, 0.8)])
    early = p.cumulative_macs + costs.heads[f"{p.name}:fcn_w0_b0"].macs
    full = costs.backbone_macs + costs.heads[f"{p.name}:fcn_w0_b0"].macs + costs.final_head.macs
    assert list(table.exit_costs(config)) == [early, full]
    assert table.expected(config, [0.25, 0.75]) == pytest.approx(0.25 * early + 0.75 * full)
    budgeted = DeploymentConfig("budgeted", [ExitChoice(p.name, "fcn_w0_b0")])
    assert table.worst(budgeted) == early


@pytest.mark.parametrize("name", backbones.BACKBONES)
def test_describe_covers_every_backbone(name):
    config = network.NetworkConfig(backbones.BackboneConfig(name, 8), 21, (64, 64))
    d = describe.describe(config, SPACE[:1])
    assert set(d) >= {"backbone_macs", "positions", "final_head_macs", "heads"}
    assert d["positions"][-1]["cumulative_macs"] == d["backbone_macs"]
    assert d["positions"][-1]["stride"] == 8
    assert list(d["heads"][0]["macs_by_position"]) == [p["name"] for p in d["positions"]]


def test_describe_cli_prints_one_json_object():
    out = subprocess.run([sys.executable, "-m", "tools.describe", "--backbone=efficientnet_lite0", "--input_size=224",
                          "--output_stride=32", "--heads=fcn_w0_b0,aspp_w64", "--format=json"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert [h["id"] for h in d["heads"]] == ["fcn_w0_b0", "aspp_w64"]
    assert len(d["positions"]) == 16
    assert d["classifier_macs"] == pytest.approx(407e6, rel=0.06)  # EfficientNet-Lite0's published MAdds


def test_describe_cli_rejects_bad_input():
    bad_size = subprocess.run([sys.executable, "-m", "tools.describe", "--input_size=100", "--output_stride=16"],
                              capture_output=True, text=True)
    assert (bad_size.returncode == 2
            and "error: input size 100x100 is not divisible by the output stride 16" in bad_size.stderr)
    bad_head = subprocess.run([sys.executable, "-m", "tools.describe", "--input_size=64", "--heads=fcn_w1"],
                              capture_output=True, text=True)
    assert bad_head.returncode == 2 and "error: unknown exit-head id 'fcn_w1'" in bad_head.stderr
