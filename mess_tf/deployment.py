"""What the search chooses and the exporter builds: a deployment configuration.

A configuration names the early exits kept (in depth order), each exit's head and policy
thresholds, and the mode:
  * "budgeted": exactly one exit, the network truncated right after it (zero early exits means
    the unchanged single-exit network, i.e. the baseline);
  * "dynamic":  a cascade; an image stops at the first early exit whose image confidence passes
    `th_img`, otherwise it runs to the final exit;
  * "anytime":  the same cascade, emitting every exit's map as it is produced.

It is the contract between search.py (writes CONFIG.json), latency/ (composes its latency),
export.py (builds a staged .tflite from it) and runtime.py (runs it).
"""
import dataclasses
import json
from typing import Optional

from mess_tf import io_utils

MODES = ("budgeted", "dynamic", "anytime")
FINAL_EXIT = "final"


def exit_id(position, head):
    """The stable id of an exit: `<position name>:<head id>`, e.g. `block_6_add:fcn_w64_b1`."""
    return f"{position}:{head}"


@dataclasses.dataclass(frozen=True)
class ExitChoice:
    """One early exit of a configuration.

    Attributes:
      position: candidate position name (a backbone block output, see backbones.Position).
      head: exit-head id (see heads.ExitHeadConfig.id).
      th_pix: pixel-confidence threshold in [0, 1].
      th_img: image threshold in [0, 1]: the fraction of pixels that must reach `th_pix`.
    """

    position: str
    head: str
    th_pix: float = 1.0
    th_img: float = 1.0

    @property
    def exit_id(self):
        return exit_id(self.position, self.head)


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    """A deployable configuration of one trained multi-exit network.

    Attributes:
      mode: one of MODES.
      exits: early exits in depth order. In "budgeted" mode at most one.
      network: the NetworkConfig (as a dict) of the trained network, so an artifact records
        what made it.
      metadata: free-form provenance (objective, predicted mIoU/latency, cache fingerprint...).
    """

    mode: str
    exits: tuple = ()
    network: Optional[dict] = None
    metadata: Optional[dict] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        object.__setattr__(self, "exits", tuple(
            e if isinstance(e, ExitChoice) else ExitChoice(**e) for e in self.exits))
        if self.mode == "budgeted" and len(self.exits) > 1:
            raise ValueError(f"a budgeted configuration keeps one exit, got {len(self.exits)}")
        for e in self.exits:
            for name in ("th_pix", "th_img"):
                value = getattr(e, name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"exit {e.exit_id}: {name}={value} is outside [0, 1]")

    @property
    def exit_ids(self):
        """Ids of the exits an image can leave at, in depth order; the final exit last
        unless the configuration is a truncated budgeted one."""
        ids = [e.exit_id for e in self.exits]
        if self.mode != "budgeted" or not self.exits:
            ids.append(FINAL_EXIT)
        return ids

    def to_dict(self):
        return dataclasses.asdict(self)

    def fingerprint(self):
        """JSON of everything but the provenance metadata: equal exactly for configurations that
        deploy the same model (network, mode, exits and thresholds)."""
        return json.dumps(dataclasses.replace(self, metadata=None).to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown deployment-config keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path):
        """Writes the configuration as CONFIG.json (atomically)."""
        io_utils.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        d = io_utils.read_json(path, "deployment config")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"deployment config {path}: {e}") from None
