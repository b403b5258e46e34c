"""Per-device latency look-up tables: the measured cost of every part of a network.

A LatencyTable holds, for one (device, precision, threads, input size), the latency of each
backbone segment (keyed by the candidate position it ends at), each exit head up to its image
confidence (keyed by exit id `position:head_id`), the class map of an exit at each position
(upsampling the coarse logits and the argmax: the same for every head there), and the final
head, each with its median and p90 over repeated timed runs after warm-up, plus its MACs. It
records what identifies the network it timed (cost_model.network_identity), which the search
checks against the calibration cache's. Heads
and class maps are apart because a staged model computes an exit's class map only for the
images that leave there (export.py). A head's time includes its in-graph image confidence, so the
table records the exit policy it was timed with (`policy`), and the search refuses to combine it
with a calibration cache made under another policy. A configuration's latency is composed from it
with the same arithmetic as the MAC cost model (costs.CostTable).

Parts are named by part keys, the names model files and progress logs use:
  `segment:<position>`, `head:<position>:<head_id>`, `class_map:<position>`, `final_head`.

Measuring is slow (on a phone, minutes per part), so `fill_table` saves the table after every
measured part and skips the parts an earlier, interrupted run already measured. (The host times
all parts taking turns instead and saves its runs every few seconds: host.measure_parts.)
"""
import dataclasses
import datetime
import logging
import os
from typing import Optional

import numpy as np

from mess_tf import io_utils
from mess_tf.costs.table import CostTable
from mess_tf.policy import PolicyConfig

# 2: heads end at their image confidence, class maps are parts of their own (1 timed heads
# with their full-resolution logits).
TABLE_VERSION = 2
PRECISIONS = ("float32", "float16", "int8")
STATS = ("median", "p90")
SEGMENT, HEAD, CLASS_MAP, FINAL_HEAD = "segment", "head", "class_map", "final_head"
_NAMED_KINDS = (SEGMENT, HEAD, CLASS_MAP)
# How p90_ms was obtained: from per-run times, or (for tools that print no p90) the tool's p95,
# or mean + 1.2816 std (the 90th percentile of a normal distribution) when only avg/std exist.
P90_METHODS = ("exact", "p95", "normal")
_Z90 = 1.2816


def part_key(kind, name=None):
    """The key of a part: part_key("segment", "block_3_add"), part_key("head", "block_3_add:fcn_w64_b1"),
    part_key("class_map", "block_3_add"), part_key("final_head")."""
    if kind == FINAL_HEAD:
        return FINAL_HEAD
    if kind not in _NAMED_KINDS or not name:
        raise ValueError(f"part kind must be one of {_NAMED_KINDS} with a name, or {FINAL_HEAD!r}; "
                         f"got {kind!r}, {name!r}")
    return f"{kind}:{name}"


def parse_part_key(key):
    """`segment:<position>` | `head:<exit id>` | `class_map:<position>` | `final_head` -> (kind, name or None)."""
    if key == FINAL_HEAD:
        return FINAL_HEAD, None
    kind, sep, name = key.partition(":")
    if not sep or kind not in _NAMED_KINDS or not name:
        raise ValueError(f"part key {key!r} is not 'segment:<position>', 'head:<position>:<head_id>', "
                         f"'class_map:<position>' or 'final_head'")
    return kind, name


@dataclasses.dataclass(frozen=True)
class Timing:
    """Latency statistics of one model (or signature) over repeated timed runs, in ms.

    Attributes:
      median_ms, p90_ms, mean_ms, min_ms, max_ms, std_ms: statistics of the timed runs (ms).
      runs: number of timed runs (warm-up runs excluded).
      p90_method: one of P90_METHODS, how p90_ms was obtained.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    runs: int
    p90_method: str = "exact"

    @classmethod
    def from_samples(cls, times_ms):
        """Statistics of per-run times [runs] in ms; p90 is exact (linear interpolation)."""
        t = np.asarray(times_ms, dtype=np.float64)
        if t.ndim != 1 or t.size == 0:
            raise ValueError(f"expected a non-empty 1-D list of run times, got shape {t.shape}")
        return cls(median_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)), mean_ms=float(t.mean()),
                   min_ms=float(t.min()), max_ms=float(t.max()), std_ms=float(t.std()), runs=int(t.size))

    @staticmethod
    def normal_p90(mean_ms, std_ms):
        """The 90th percentile of a normal distribution with this mean and std (ms)."""
        return mean_ms + _Z90 * std_ms


@dataclasses.dataclass(frozen=True)
class PartLatency:
    """One table entry: the measured latency of one part (ms) and its MACs per image."""

    median_ms: float
    p90_ms: float
    runs: int
    macs: Optional[int] = None
    p90_method: str = "exact"

    @classmethod
    def from_timing(cls, timing, macs=None):
        return cls(timing.median_ms, timing.p90_ms, timing.runs, None if macs is None else int(macs), timing.p90_method)

    def stat(self, name):
        if name not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {name!r}")
        return self.median_ms if name == "median" else self.p90_ms


@dataclasses.dataclass(frozen=True)
class TableKey:
    """What a latency table is valid for.

    Attributes:
      device: "host:<machine>" (e.g. "host:x86_64") or "adb:<serial>:<model>".
      precision: one of PRECISIONS.
      threads: CPU threads the runtime used.
      input_size: (H, W) of the network input in pixels.
    """

    device: str
    precision: str
    threads: int
    input_size: tuple

    def __post_init__(self):
        object.__setattr__(self, "input_size", tuple(self.input_size))
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a non-empty string, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if not _is_int(self.threads) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if len(self.input_size) != 2 or not all(_is_int(v) and v > 0 for v in self.input_size):
            raise ValueError(f"input_size must be two positive integers (H, W), got {self.input_size!r}")


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass
class LatencyTable:
    """Measured latencies of the parts of one network on one device.

    Attributes:
      key: TableKey.
      positions: candidate position names in depth order; the last is the backbone output.
      segments: position name -> PartLatency of the backbone segment ending there.
      heads: exit id -> PartLatency of the head, from the position's features to its image
        confidence (and coarse logits).
      class_maps: position name -> PartLatency of the class map of an exit there, from its coarse
        logits.
      final_head: PartLatency of the final head (class map included), or None until measured.
      metadata: date, tool, runtime version, notes (JSON-serialisable).
      policy: the PolicyConfig whose image confidence the heads were timed with.
      network_identity: cost_model.network_identity of the network timed (None in tables
        written before it was recorded).
    """

    key: TableKey
    positions: tuple
    segments: dict = dataclasses.field(default_factory=dict)
    heads: dict = dataclasses.field(default_factory=dict)
    final_head: Optional[PartLatency] = None
    metadata: dict = dataclasses.field(default_factory=dict)
    class_maps: dict = dataclasses.field(default_factory=dict)
    policy: PolicyConfig = PolicyConfig()
    network_identity: Optional[dict] = None

    def __post_init__(self):
        self.positions = tuple(self.positions)
        if not self.positions:
            raise ValueError("a latency table needs at least one position")
        for kind, entries in ((SEGMENT, self.segments), (CLASS_MAP, self.class_maps)):
            unknown = set(entries) - set(self.positions)
            if unknown:
                raise ValueError(f"{kind} entries {sorted(unknown)} are not among the positions {list(self.positions)}")
        self.metadata.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    # ---- entries by part key --------------------------------------------------------------

    def get(self, key):
        """The PartLatency of part `key`, or None if not measured yet."""
        kind, name = parse_part_key(key)
        if kind == FINAL_HEAD:
            return self.final_head
        return self._entries(kind).get(name)

    def _entries(self, kind):
        return {SEGMENT: self.segments, HEAD: self.heads, CLASS_MAP: self.class_maps}[kind]

    def set(self, key, entry):
        """Records the PartLatency of part `key` (replacing an earlier one)."""
        kind, name = parse_part_key(key)
        if kind == FINAL_HEAD:
            self.final_head = entry
        else:
            if kind in (SEGMENT, CLASS_MAP) and name not in self.positions:
                raise ValueError(f"{kind} {name!r} is not among the positions {list(self.positions)}")
            self._entries(kind)[name] = entry

    def part_keys(self):
        """Keys of the measured parts, segments in depth order first."""
        keys = [part_key(SEGMENT, p) for p in self.positions if p in self.segments]
        keys += [part_key(HEAD, h) for h in self.heads]
        keys += [part_key(CLASS_MAP, p) for p in self.positions if p in self.class_maps]
        return keys + ([FINAL_HEAD] if self.final_head is not None else [])

    def depth_order(self, key):
        """Sort key putting parts in network order: segments by depth, then heads and class maps
        by the depth of their position, then the final head."""
        kind, name = parse_part_key(key)
        if kind == FINAL_HEAD:
            return (2, len(self.positions), "", 0)
        position = name if kind in (SEGMENT, CLASS_MAP) else name.rpartition(":")[0]
        depth = self.positions.index(position) if position in self.positions else len(self.positions)
        return (0 if kind == SEGMENT else 1, depth, name, kind == CLASS_MAP)

    def missing(self, keys):
        """The keys among `keys` not measured yet, in the given order."""
        return [k for k in keys if self.get(k) is None]

    def merge(self, other):
        """A new table with this table's entries updated by `other`'s (same key and positions).

        Entries measured in `other` win; entries only in this table are kept, so a resumed run
        never loses what an interrupted one measured.
        """
        self._check_compatible(other, "merge")
        merged = LatencyTable(self.key, self.positions, dict(self.segments), dict(self.heads),
                              self.final_head, {**self.metadata, **other.metadata}, dict(self.class_maps),
                              self.policy, self.network_identity or other.network_identity)
        for key in other.part_keys():
            merged.set(key, other.get(key))
        return merged

    def _check_compatible(self, other, what):
        if other.key != self.key:
            raise ValueError(f"cannot {what} latency tables for different keys: {self.key} vs {other.key}")
        if other.positions != self.positions:
            raise ValueError(f"cannot {what} latency tables with different positions: "
                             f"{list(self.positions)} vs {list(other.positions)}")
        if other.policy != self.policy:
            raise ValueError(f"cannot {what} latency tables whose heads were timed with different exit policies: "
                             f"{self.policy.to_dict()} vs {other.policy.to_dict()}")
        identities = (self.network_identity, other.network_identity)
        if None not in identities and identities[0] != identities[1]:  # a table of unrecorded network fits any
            raise ValueError(f"cannot {what} latency tables of different networks: {self.network_identity} vs "
                             f"{other.network_identity}")

    # ---- composition ------------------------------------------------------------------------

    def cost_table(self, stat="median"):
        """The latencies (ms) as a CostTable; `stat` is "median" or "p90".

        Raises ValueError naming the parts not measured yet (composing an exit whose head or class
        map is not measured raises later, naming it).
        """
        missing = [p for p in self.positions if p not in self.segments]
        if missing or self.final_head is None:
            raise ValueError(f"latency table for {self.key.device} is incomplete: segments {missing} "
                             f"{'and the final head ' if self.final_head is None else ''}are not measured")
        return CostTable(positions=self.positions,
                         segment={p: e.stat(stat) for p, e in self.segments.items()},
                         head={h: e.stat(stat) for h, e in self.heads.items()},
                         final_head=self.final_head.stat(stat), unit="ms",
                         class_map={h: e.stat(stat) for h, e in self.class_maps.items()}, policy=self.policy,
                         network_identity=self.identity())

    def identity(self):
        """What identifies the network timed, as far as the table records it: its network_identity,
        or for a table written before that was recorded, its input size."""
        return {"input_size": list(self.key.input_size), **(self.network_identity or {})}

    def expected_latency(self, config, exit_fractions, stat="median"):
        """Expected latency per image (ms) of a DeploymentConfig for a distribution over
        config.exit_ids (fractions [len(config.exit_ids)] summing to 1)."""
        return self.cost_table(stat).expected(config, exit_fractions)

    def worst_latency(self, config, stat="median"):
        """Latency (ms) of an image that runs to the deepest exit of a DeploymentConfig."""
        return self.cost_table(stat).worst(config)

    # ---- files ------------------------------------------------------------------------------

    def to_dict(self):
        entry = dataclasses.asdict
        return {
            "version": TABLE_VERSION,
            "key": {**dataclasses.asdict(self.key), "input_size": list(self.key.input_size)},
            "positions": list(self.positions),
            "segments": {p: entry(self.segments[p]) for p in self.positions if p in self.segments},
            "heads": {h: entry(e) for h, e in self.heads.items()},
            "class_maps": {p: entry(self.class_maps[p]) for p in self.positions if p in self.class_maps},
            "final_head": None if self.final_head is None else entry(self.final_head),
            "metadata": self.metadata,
            "policy": self.policy.to_dict(),
            "network_identity": self.network_identity,
        }

    def save(self, path):
        """Writes the table as JSON, atomically."""
        io_utils.write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d, source="latency table"):
        """Builds a table from its JSON dict; ValueError naming `source` and the bad field."""
        try:
            return _table_from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{source}: {detail}") from None

    @classmethod
    def load(cls, path):
        return cls.from_dict(io_utils.read_json(path, "latency table"), f"latency table {path}")


def _entry_from_dict(name, d):
    if not isinstance(d, dict):
        raise ValueError(f"entry {name!r} must be an object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in dataclasses.fields(PartLatency)}
    if unknown:
        raise ValueError(f"entry {name!r} has unknown keys {sorted(unknown)}")
    for field in ("median_ms", "p90_ms"):
        value = d[field]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"entry {name!r}: {field} must be a non-negative number, got {value!r}")
    if not _is_int(d["runs"]) or d["runs"] < 1:
        raise ValueError(f"entry {name!r}: runs must be a positive integer, got {d['runs']!r}")
    if d.get("macs") is not None and (not _is_int(d["macs"]) or d["macs"] < 0):
        raise ValueError(f"entry {name!r}: macs must be a non-negative integer or null, got {d['macs']!r}")
    if d.get("p90_method", "exact") not in P90_METHODS:
        raise ValueError(f"entry {name!r}: p90_method must be one of {P90_METHODS}, got {d['p90_method']!r}")
    return PartLatency(**d)


def _table_from_dict(d):
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if d.get("version") != TABLE_VERSION:
        raise ValueError(f"version {d.get('version')!r} is not supported (expected {TABLE_VERSION}; a version 1 "
                         f"table timed heads with their full-resolution logits: profile the network again)")
    key = d["key"]
    if not isinstance(key, dict):
        raise ValueError(f"key must be an object, got {type(key).__name__}")
    for name in ("positions",):
        if not isinstance(d[name], list) or not all(isinstance(p, str) for p in d[name]):
            raise ValueError(f"{name} must be a list of position names")
    for name in ("segments", "heads", "class_maps", "metadata"):
        if not isinstance(d[name], dict):
            raise ValueError(f"{name} must be an object, got {type(d[name]).__name__}")
    final = d["final_head"]
    # Tables written before the policy was recorded were all timed with the default policy.
    timed_with = d.get("policy", {})
    if not isinstance(timed_with, dict):
        raise ValueError(f"policy must be an object (a PolicyConfig), got {type(timed_with).__name__}")
    identity = d.get("network_identity")
    if identity is not None and not isinstance(identity, dict):
        raise ValueError(f"network_identity must be an object or null, got {type(identity).__name__}")
    return LatencyTable(
        key=TableKey(key["device"], key["precision"], key["threads"], tuple(key["input_size"])),
        positions=tuple(d["positions"]),
        segments={p: _entry_from_dict(f"segment:{p}", e) for p, e in d["segments"].items()},
        heads={h: _entry_from_dict(f"head:{h}", e) for h, e in d["heads"].items()},
        final_head=None if final is None else _entry_from_dict(FINAL_HEAD, final),
        metadata=dict(d["metadata"]),
        class_maps={p: _entry_from_dict(f"class_map:{p}", e) for p, e in d["class_maps"].items()},
        policy=PolicyConfig.from_dict(timed_with), network_identity=identity)


def resume(path, table):
    """The table saved at `path` if there is one (it must have `table`'s key and positions),
    with `table`'s metadata added; otherwise `table`."""
    if not os.path.exists(path):
        return table
    try:
        saved = LatencyTable.load(path)
        table._check_compatible(saved, "resume")  # pylint: disable=protected-access
    except ValueError as e:
        raise ValueError(f"cannot resume from {path}: {e}; move it away or pick another output") from None
    return saved.merge(LatencyTable(table.key, table.positions, metadata=dict(table.metadata), policy=table.policy,
                                    network_identity=table.network_identity))


def fill_table(path, table, parts, measure, macs=None):
    """Measures the parts that the table at `path` lacks, saving it after each part.

    Resumable: parts already in the file at `path` (from an interrupted run) are skipped; when
    `measure` raises, every part measured before stays saved and the error propagates.

    Args:
      path: JSON file of the table (read if it exists, rewritten atomically after each part).
      table: an empty (or partial) LatencyTable giving key, positions and metadata.
      parts: part keys to measure (measured in depth order, see LatencyTable.depth_order).
      measure: part key -> Timing.
      macs: optional part key -> MACs per image.

    Returns:
      The filled LatencyTable.
    """
    table = resume(path, table)
    table.save(path)  # fails early on an unwritable path; marks the run as started
    todo = sorted(table.missing(parts), key=table.depth_order)
    logging.info("%s: %d of %d parts already measured", path, len(parts) - len(todo), len(parts))
    for i, key in enumerate(todo, 1):
        timing = measure(key)
        table.set(key, PartLatency.from_timing(timing, (macs or {}).get(key)))
        table.save(path)
        logging.info("%s [%d/%d] %s: median %.3f ms, p90 %.3f ms", table.key.device, i, len(todo), key,
                     timing.median_ms, timing.p90_ms)
    return table


# ---- part manifests: a folder of part models and what they are -----------------------------

MANIFEST_NAME = "parts.json"


@dataclasses.dataclass(frozen=True)
class PartModel:
    """A model to time for one part.

    Attributes:
      model: path of a .tflite file, or its flatbuffer bytes.
      signature: signature to run in a multi-signature file (None: the model's only one).
      macs: MACs per image of the part, recorded in the table.
    """

    model: object
    signature: Optional[str] = None
    macs: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class PartManifest:
    """A folder of part models and what they are, so another machine (a phone driver) can time them.

    Attributes:
      positions: candidate position names in depth order.
      parts: part key -> PartModel whose `model` is a .tflite path.
      precision: one of PRECISIONS.
      input_size: (H, W) in pixels the parts were built for.
      policy: the PolicyConfig of the heads' image confidences (recorded in the tables).
      network_identity: cost_model.network_identity of their network (recorded in the tables).
    """

    positions: tuple
    parts: dict
    precision: str
    input_size: tuple
    policy: PolicyConfig = PolicyConfig()
    network_identity: Optional[dict] = None

    def __post_init__(self):
        object.__setattr__(self, "positions", tuple(self.positions))
        object.__setattr__(self, "input_size", tuple(self.input_size))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if len(self.input_size) != 2 or not all(_is_int(v) and v > 0 for v in self.input_size):
            raise ValueError(f"input_size must be two positive integers (H, W), got {self.input_size!r}")

    @classmethod
    def write(cls, folder, models, positions, precision, input_size, policy=PolicyConfig(), network_identity=None):
        """Writes each part's model to `folder`/<part key>.tflite and the parts.json beside them.

        Args:
          models: part key -> PartModel whose `model` is the .tflite bytes.
          positions, precision, input_size, policy, network_identity: as the attributes.

        Returns:
          The PartManifest, its models the written paths.
        """
        parts = {}
        for key, part in models.items():
            parse_part_key(key)
            path = os.path.join(folder, key.replace(":", "__").replace("/", "_") + ".tflite")  # names hold "/"
            io_utils.write_bytes(path, part.model)
            parts[key] = dataclasses.replace(part, model=path)
        manifest = cls(positions, parts, precision, input_size, policy, network_identity)
        manifest.save(folder)
        return manifest

    def save(self, folder):
        """Writes `folder`/parts.json, model paths stored relative to `folder`."""
        entries = {}
        for key, part in self.parts.items():
            parse_part_key(key)
            entries[key] = {"model": os.path.relpath(os.fspath(part.model), folder), "signature": part.signature,
                            "macs": part.macs}
        io_utils.write_json(os.path.join(folder, MANIFEST_NAME),
                            {"positions": list(self.positions), "parts": entries, "precision": self.precision,
                             "input_size": list(self.input_size), "policy": self.policy.to_dict(),
                             "network_identity": self.network_identity})

    @classmethod
    def load(cls, path):
        """Reads a parts.json (or the one in folder `path`), model paths made absolute.

        ValueError for a malformed manifest, FileNotFoundError naming a missing model file.
        """
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        d = io_utils.read_json(path, "part manifest")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            parts = {}
            for key, entry in d["parts"].items():
                parse_part_key(key)
                parts[key] = PartModel(os.path.join(folder, entry["model"]), entry.get("signature"), entry.get("macs"))
            manifest = cls(tuple(d["positions"]), parts, d["precision"], tuple(d["input_size"]),
                           PolicyConfig.from_dict(d.get("policy", {})), d.get("network_identity"))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"part manifest {path} is malformed ({e}); expected {{'positions': [...], "
                             "'precision': ..., 'input_size': [H, W], 'parts': {part key: {'model': file, "
                             "'signature': ..., 'macs': ...}}, 'policy': {PolicyConfig}}") from None
        for key, part in parts.items():
            if not os.path.isfile(part.model):
                raise FileNotFoundError(f"part manifest {path}: model file for {key} not found: {part.model}")
        return manifest
