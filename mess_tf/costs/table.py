"""Composing the cost of a deployment configuration from per-part costs.

A network is cut at its candidate positions p_1..p_K (backbone block outputs, in depth order);
segment i runs the backbone from p_{i-1} (the input for i=1) to p_i, and p_K is the backbone
output that the final head reads. A configuration's cost is then arithmetic over parts:

  * an image that leaves at early exit k paid for the segments up to that exit's position, for
    the heads of every exit it passed (their confidence was computed and was too low) and for exit
    k's class map (upsampling its logits to the input size and the argmax), which a staged model
    computes only for the exit an image leaves at;
  * an image that reaches the final exit paid for every segment, every early head and the final
    head (its class map included);
  * a budgeted (truncated) configuration pays the segments up to its one exit, that head and its
    class map.

The same arithmetic serves latency tables (ms, measured per device) and the analytic cost model
(MACs), so it lives in one place and the search, the latency tables and the reports share it.
"""
import dataclasses
from typing import Optional

import numpy as np

from mess_tf.deployment import FINAL_EXIT
from mess_tf.policy import PolicyConfig


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Costs of the parts of one network, in one unit.

    Attributes:
      positions: candidate position names in depth order; the last is the backbone output.
      segment: position name -> cost of the backbone segment ending at that position.
      head: exit id (`position:head_id`) -> cost of that exit head up to its image confidence,
        paid at every exit an image reaches.
      final_head: cost of the final (DeepLab) head, class map included.
      unit: "ms" or "MACs".
      class_map: position name -> cost of the class map of an exit there (from its coarse logits),
        paid only by the images that leave there; None where the unit has no such part (MACs:
        the head's count already holds the upsampling).
      policy: the PolicyConfig whose image confidence the head costs include (measured
        latencies); None where they hold for any policy (MACs count no confidence).
      network_identity: what identifies the network the costs are of, as far as known (see
        LatencyTable.identity); None if unknown.
    """

    positions: tuple
    segment: dict
    head: dict
    final_head: float
    unit: str
    class_map: Optional[dict] = None
    policy: Optional[PolicyConfig] = None
    network_identity: Optional[dict] = None

    def __post_init__(self):
        object.__setattr__(self, "positions", tuple(self.positions))
        missing = [p for p in self.positions if p not in self.segment]
        if missing:
            raise ValueError(f"cost table has no segment cost for positions {missing}")

    def backbone_to(self, position):
        """Cost of the backbone from the input up to and including `position`."""
        if position not in self.segment:
            raise ValueError(f"unknown position {position!r}; expected one of {list(self.positions)}")
        end = self.positions.index(position)
        return float(sum(self.segment[p] for p in self.positions[: end + 1]))

    def head_cost(self, exit_id):
        try:
            return float(self.head[exit_id])
        except KeyError:
            raise ValueError(f"cost table has no head cost for exit {exit_id!r}") from None

    def class_map_cost(self, exit_id):
        """Cost of exit `exit_id`'s class map, paid only by the images leaving there."""
        if self.class_map is None:
            return 0.0
        position = exit_id.rpartition(":")[0]
        if position not in self.class_map:
            raise ValueError(f"cost table has no class-map cost at position {position!r} (exit {exit_id!r})")
        return float(self.class_map[position])

    def exit_costs(self, config):
        """Cost paid by an image leaving at each exit of `config`, aligned with config.exit_ids.

        Returns: float64 array [len(config.exit_ids)], in `self.unit`.
        """
        costs, heads_so_far = [], 0.0
        for choice in config.exits:
            heads_so_far += self.head_cost(choice.exit_id)
            costs.append(self.backbone_to(choice.position) + heads_so_far + self.class_map_cost(choice.exit_id))
        if config.exit_ids[-1] == FINAL_EXIT:
            costs.append(self.backbone_to(self.positions[-1]) + heads_so_far + self.final_head)
        return np.asarray(costs, dtype=np.float64)

    def expected(self, config, exit_fractions):
        """Expected cost per image for a distribution over config.exit_ids (fractions sum to 1)."""
        fractions = np.asarray(exit_fractions, dtype=np.float64)
        costs = self.exit_costs(config)
        if fractions.shape != costs.shape:
            raise ValueError(f"expected {costs.size} exit fractions for exits {config.exit_ids}, got {fractions.shape}")
        return float(fractions @ costs)

    def worst(self, config):
        """Worst-case cost per image: the deepest exit of the configuration."""
        return float(self.exit_costs(config)[-1])
