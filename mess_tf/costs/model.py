"""Analytic cost model: MACs and parameters of every part of a multi-exit network.

Parts are the units the latency tables and the search compose (see costs/table.py):
each backbone segment between consecutive candidate positions, each exit head at each
position, and the final head. MACs are per image at the network's input size.
"""
import dataclasses
import hashlib
import json

from mess_tf import backbones, graph, heads, network
from mess_tf.costs import macs
from mess_tf.costs.table import CostTable
from mess_tf.deployment import FINAL_EXIT, exit_id
from mess_tf.keras_lib import keras


@dataclasses.dataclass(frozen=True)
class PartCost:
    """MACs and trainable+frozen parameters of one part, per image."""

    macs: int
    params: int


@dataclasses.dataclass
class NetworkCosts:
    """Costs of all parts of a network and a head space.

    Attributes:
      positions: backbones.Position list, depth order.
      segments: position name -> PartCost of the segment ending there.
      heads: exit id -> PartCost of that head at that position.
      final_head: PartCost of the final head (at the backbone output).
    """

    positions: list
    segments: dict
    heads: dict
    final_head: PartCost

    @property
    def backbone_macs(self):
        return sum(c.macs for c in self.segments.values())

    def cost_table(self):
        """The MACs as a CostTable, the unit the search composes."""
        return CostTable(positions=[p.name for p in self.positions],
                         segment={k: v.macs for k, v in self.segments.items()},
                         head={k: v.macs for k, v in self.heads.items()},
                         final_head=self.final_head.macs, unit="MACs")

    def to_dict(self):
        return {
            "unit": "MACs",
            "positions": [dataclasses.asdict(p) for p in self.positions],
            "segment": {k: dataclasses.asdict(v) for k, v in self.segments.items()},
            "head": {k: dataclasses.asdict(v) for k, v in self.heads.items()},
            "final_head": dataclasses.asdict(self.final_head),
        }


def _part_cost(layer_list):
    return PartCost(sum(macs.macs_of_layer(layer) for layer in layer_list),
                    sum(layer.count_params() for layer in layer_list))


def _standalone_head_cost(build, input_shapes):
    """Builds a head on fresh symbolic inputs and costs its layers."""
    inputs = [keras.Input(shape) for shape in input_shapes]
    model = keras.Model(inputs, build(*inputs))
    return _part_cost([layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)])


def network_costs(config, head_space=None, positions=None, backbone=None, final=None):
    """Costs every part of `config`'s network for each head in `head_space` at each position.

    Args:
      config: network.NetworkConfig.
      head_space: ExitHeadConfigs (default: heads.default_head_space()).
      positions: position names to cost heads at (default: all candidate positions).
      backbone: an already built backbones.Backbone for config, to save building it again.
      final: the final head's PartCost, when already known (costs_of counts a built network's).

    Returns:
      NetworkCosts.
    """
    backbone = backbone or backbones.Backbone(config.backbone, config.input_size)
    head_space = heads.default_head_space() if head_space is None else head_space
    names = [p.name for p in backbone.positions] if positions is None else positions
    segments = {name: _part_cost([backbone.model.get_layer(n) for n in layer_names])
                for name, layer_names in backbone.segment_layers.items()}
    head_costs, by_shape = {}, {}  # positions with equal feature shapes have equal head costs
    for name in names:
        shape = tuple(backbone.feature(name).shape[1:])
        for head in head_space:
            if (shape, head) not in by_shape:
                by_shape[shape, head] = _standalone_head_cost(
                    lambda x, head=head: heads.exit_head(x, head, config.num_classes, config.input_size, "h"), [shape])
            head_costs[exit_id(name, head.id)] = by_shape[shape, head]
    if final is None:
        final_inputs = [backbone.model.output.shape[1:]]
        if config.final_head.kind == "deeplabv3plus":
            decoder = backbone.decoder_position(config.final_head.decoder_position)
            final_inputs.append(backbone.feature(decoder).shape[1:])
        final = _standalone_head_cost(
            lambda x, low=None: heads.final_head(x, low, config.final_head, config.num_classes,
                                                 config.input_size, config.backbone.output_stride), final_inputs)
    return NetworkCosts(list(backbone.positions), segments, head_costs, final)


def costs_of(net):
    """Costs of a built MultiExitNetwork's parts: its segments, its final head, and every head of
    its exit space at every exit position (a superset of net.exit_ids when exits vary by position).

    Returns:
      NetworkCosts.
    """
    pairs = [network.parse_exit_id(e) for e in net.exit_ids]
    return network_costs(net.config, sorted({h for _, h in pairs}, key=lambda h: h.id), sorted({p for p, _ in pairs}),
                         backbone=net.backbone, final=_final_head_cost(net))


def _final_head_cost(net):
    """The final head's cost: the net's own layers after the backbone (a built-in head or a user's alike)."""
    head_layers = graph.ancestors([net.logits(FINAL_EXIT)]) - graph.ancestors([net.backbone.model.output])
    return _part_cost([layer for layer in graph.topological_layers([net.logits(FINAL_EXIT)])
                       if layer.name in head_layers])


def network_identity(net):
    """What identifies a network's architecture, recorded in the files computed or timed on it (the
    calibration cache, the latency table) so that the search can refuse a pair made on two networks.

    Returns:
      {"input_size": [H, W], "num_classes": C, "parts": a 16-hex fingerprint of every position's
      name, stride, channels and MACs and of the final head's MACs, which differ with the
      backbone, its width, the head and the input size}.
    """
    parts = {"positions": [[p.name, p.stride, p.channels, p.cumulative_macs] for p in net.backbone.positions],
             "final_head_macs": _final_head_cost(net).macs}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"input_size": list(net.backbone.input_size), "num_classes": int(net.logits(FINAL_EXIT).shape[-1]),
            "parts": digest}
