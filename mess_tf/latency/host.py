"""Timing TFLite models on this machine with the LiteRT interpreter.

The interpreter runs on CPU with XNNPACK (LiteRT's default delegate) and `num_threads` threads.
Each measurement does warm-up runs (caches, XNNPACK packing, CPU frequency ramp-up), then
timed runs with time.perf_counter, and reports median and p90 from the per-run times. Inputs are
random with a fixed seed, of the model's dtype (float32, or int8/uint8 quantised with the input's
own scale and zero point). The process can be pinned to chosen CPUs (Linux), so that threads do
not migrate between cores mid-measurement.
"""
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import platform
import time

import numpy as np
from ai_edge_litert import interpreter as litert

from mess_tf.latency import table as table_lib
from mess_tf.latency.table import Timing
from mess_tf.policy import PolicyConfig


@dataclasses.dataclass(frozen=True)
class HostTimingConfig:
    """How to time a model on the host.

    Attributes:
      num_threads: interpreter threads.
      warmup_runs: untimed runs before timing.
      num_runs: timed runs.
      seed: seed of the random inputs.
      cpus: CPU ids to pin the process to while timing (None: no pinning).
    """

    num_threads: int = 1
    warmup_runs: int = 5
    num_runs: int = 50
    seed: int = 0
    cpus: tuple = None

    def __post_init__(self):
        for name in ("num_threads", "num_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_runs < 0:
            raise ValueError(f"warmup_runs must be >= 0, got {self.warmup_runs}")


def host_device():
    """The device name of this machine in latency-table keys, e.g. "host:x86_64"."""
    return f"host:{platform.machine() or 'unknown'}"


def runtime_version():
    return f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')}"


@contextlib.contextmanager
def pinned(cpus):
    """Pins this process to `cpus` (iterable of CPU ids) inside the block, then restores the
    previous affinity. A no-op (logged) where os.sched_setaffinity does not exist, or for None."""
    if cpus is None:
        yield
        return
    if not hasattr(os, "sched_setaffinity"):
        logging.warning("CPU pinning is not available on %s; timing unpinned", platform.system())
        yield
        return
    cpus = set(cpus)
    available = os.sched_getaffinity(0)
    if not cpus or not cpus <= available:
        raise ValueError(f"cannot pin to CPUs {sorted(cpus)}: this process may use CPUs {sorted(available)}")
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, available)


def _interpreter(model, num_threads):
    if isinstance(model, (bytes, bytearray)):
        return litert.Interpreter(model_content=bytes(model), num_threads=num_threads)
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TFLite model not found: {path}")
    try:
        return litert.Interpreter(model_path=path, num_threads=num_threads)
    except ValueError as e:
        raise ValueError(f"{path} is not a loadable TFLite model: {e}") from None


def _signature_runner(interp, signature, model):
    signatures = list(interp.get_signature_list())
    name = model if not isinstance(model, (bytes, bytearray)) else "the model"
    if signature is None:
        if len(signatures) != 1:
            raise ValueError(f"{name} has signatures {signatures}; choose one (signature=...)")
        signature = signatures[0]
    if signature not in signatures:
        raise ValueError(f"{name} has no signature {signature!r}; it has {signatures}")
    return interp.get_signature_runner(signature)


def random_inputs(input_details, seed=0):
    """Fixed-seed random inputs for a signature: input name -> array of its shape and dtype.

    Float inputs are uniform in [0, 1); int8/uint8 inputs are standard-normal values quantised
    with the input's scale and zero point, so they look like real quantised activations.
    """
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, detail in sorted(input_details.items()):
        shape, dtype = tuple(detail["shape"]), np.dtype(detail["dtype"])
        if dtype.kind == "f":
            inputs[name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype in (np.int8, np.uint8):
            scale, zero_point = detail["quantization"]
            values = rng.standard_normal(shape) / (scale or 1.0) + zero_point
            info = np.iinfo(dtype)
            inputs[name] = np.clip(np.round(values), info.min, info.max).astype(dtype)
        else:
            raise ValueError(f"input {name!r} has dtype {dtype}; expected float or int8/uint8")
    return inputs


def _time_runs(run_once, config):
    for _ in range(config.warmup_runs):
        run_once()
    times_ms = []
    for _ in range(config.num_runs):
        start = time.perf_counter()
        run_once()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return Timing.from_samples(times_ms)


def measure_end_to_end(model, signatures=None, config=HostTimingConfig()):
    """Times running `signatures` of one model one after another, as one run.

    With several signatures (e.g. the stages of a staged model) one timed run invokes each in
    order, each on its own fixed random inputs (latency does not depend on the values).

    Args:
      model: .tflite path or flatbuffer bytes.
      signatures: signature keys to run in order (None: the model's only signature).
      config: HostTimingConfig.

    Returns:
      Timing (ms) of one run of all the signatures.
    """
    with pinned(config.cpus):
        return _time_runs(signature_calls(model, signatures, config.num_threads, config.seed), config)


def signature_calls(model, signatures=None, num_threads=1, seed=0):
    """A callable running `signatures` of one model one after another (None: its only signature),
    each on its own fixed random inputs (seeds seed, seed + 1, ...): what measure_end_to_end
    times, for callers that time it their own way.

    Args:
      model: .tflite path or flatbuffer bytes.
      signatures: signature keys to run in order.
      num_threads: interpreter threads.
      seed: seed of the first signature's random inputs.
    """
    interp = _interpreter(model, num_threads)
    calls = []
    for i, key in enumerate([None] if signatures is None else list(signatures)):
        runner = _signature_runner(interp, key, model)
        calls.append((runner, random_inputs(runner.get_input_details(), seed + i)))

    def run_once():
        for runner, inputs in calls:
            runner(**inputs)
    return run_once


def measure(model, signature=None, config=HostTimingConfig()):
    """Times one signature of a .tflite (path or bytes) on the host -> Timing (ms)."""
    return measure_end_to_end(model, None if signature is None else [signature], config)


def measure_parts(parts, path, key, positions, config=HostTimingConfig(), notes="", policy_config=PolicyConfig()):
    """Fills the latency table at `path` by timing each part's model on the host.

    Resumable: parts already in the file are skipped, the table is saved after each part.

    Args:
      parts: part key (table.part_key) -> table.PartModel, or a .tflite path / bytes.
      path: output JSON file.
      key: table.TableKey (its threads must equal config.num_threads).
      positions: candidate position names in depth order.
      config: HostTimingConfig.
      notes: free text stored in the table's metadata.
      policy_config: the PolicyConfig the head models compute their confidence with (recorded
        in the table; export.convert_parts's default is PolicyConfig() too).

    Returns:
      The LatencyTable.
    """
    if key.threads != config.num_threads:
        raise ValueError(f"table key says {key.threads} threads but timing uses num_threads={config.num_threads}")
    parts = {k: p if isinstance(p, table_lib.PartModel) else table_lib.PartModel(p) for k, p in parts.items()}
    metadata = {"tool": "mess_tf.latency.host", "runtime": runtime_version(), "delegate": "XNNPACK",
                "warmup_runs": config.warmup_runs, "num_runs": config.num_runs,
                "pinned_cpus": None if config.cpus is None else sorted(config.cpus), "notes": notes}
    empty = table_lib.LatencyTable(key, positions, metadata=metadata, policy=policy_config)
    return table_lib.fill_table(path, empty, list(parts), lambda k: measure(parts[k].model, parts[k].signature, config),
                                macs={k: p.macs for k, p in parts.items() if p.macs is not None})


@dataclasses.dataclass(frozen=True)
class CompositionCheck:
    """Composed vs measured end-to-end latency of one configuration (ms).

    `error` is |composed - measured| / measured.
    """

    name: str
    composed_ms: float
    measured_ms: float

    @property
    def error(self):
        return abs(self.composed_ms - self.measured_ms) / self.measured_ms


def composition_errors(table, measured, stat="median"):
    """Checks the table's composition against end-to-end measurements.

    Args:
      table: LatencyTable.
      measured: iterable of (name, DeploymentConfig, measured Timing of the configuration
        run to its deepest exit).
      stat: "median" or "p90", the statistic compared on both sides.

    Returns:
      (list of CompositionCheck, median error as a fraction).
    """
    costs = table.cost_table(stat)
    checks = [CompositionCheck(name, costs.worst(config), getattr(timing, f"{stat}_ms"))
              for name, config, timing in measured]
    if not checks:
        raise ValueError("composition_errors needs at least one measured configuration")
    return checks, float(np.median([c.error for c in checks]))
