"""Timing TFLite models on this machine with the LiteRT interpreter.

The interpreter runs on CPU with XNNPACK (LiteRT's default delegate) and `num_threads` threads.
Each measurement does warm-up runs (caches, XNNPACK packing, CPU frequency ramp-up), then
timed runs with time.perf_counter, and reports median and p90 from the per-run times. Inputs are
random with a fixed seed, of the model's dtype (float32, or int8/uint8 quantised with the input's
own scale and zero point). The process can be pinned to chosen CPUs (Linux), so that threads do
not migrate between cores mid-measurement.

The parts of a latency table are timed taking turns (`alternate`): a short block of runs of each
part, then the next part's, round after round. A shared machine drifts (other processes, clocks)
over the minutes a table takes; timed one after another, each part would see another moment of it,
and the parts' relative costs, which are what the search compares, would carry that drift.
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

from mess_tf import io_utils
from mess_tf.latency import table as table_lib
from mess_tf.latency.table import Timing
from mess_tf.policy import PolicyConfig
from mess_tf.progress import throttled


@dataclasses.dataclass(frozen=True)
class HostTimingConfig:
    """How to time a model on the host.

    Attributes:
      num_threads: interpreter threads.
      warmup_runs: untimed runs before timing.
      num_runs: timed runs.
      block_runs: timed runs in a row per model and turn when models take turns (`alternate`);
        each block follows one untimed run, since the models timed in between may have evicted
        its weights from the caches. num_runs or more: each model is timed in one go.
      seed: seed of the random inputs.
      cpus: CPU ids to pin the process to while timing (None: no pinning).
    """

    num_threads: int = 1
    warmup_runs: int = 5
    num_runs: int = 50
    block_runs: int = 5
    seed: int = 0
    cpus: tuple = None

    def __post_init__(self):
        for name in ("num_threads", "num_runs", "block_runs"):
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


def alternate(calls, config=HostTimingConfig(), samples=None, after_turn=None):
    """Times callables taking turns, so that the machine's drift hits them alike.

    Each callable first runs config.warmup_runs untimed calls. Then, turn after turn, each one
    still short of config.num_runs timed calls runs one untimed call (if there are others) and a
    block of up to config.block_runs timed ones. The process is pinned to config.cpus meanwhile.

    Args:
      calls: name -> callable taking no arguments.
      config: HostTimingConfig (its warmup_runs, num_runs, block_runs and cpus are used).
      samples: name -> ms already timed (a resumed run): timing goes on from there.
      after_turn: optional callable(turn, turns, samples) after each turn, e.g. to save them.

    Returns:
      name -> list of config.num_runs times in ms.
    """
    samples = {name: list((samples or {}).get(name, [])) for name in calls}
    turns = max((-(-(config.num_runs - len(t)) // config.block_runs) for t in samples.values()), default=0)
    if turns <= 0:
        return samples
    with pinned(config.cpus):
        for call in calls.values():
            for _ in range(config.warmup_runs):
                call()
        for turn in range(1, turns + 1):
            for name, call in calls.items():
                block = min(config.block_runs, config.num_runs - len(samples[name]))
                if block <= 0:
                    continue
                if len(calls) > 1:  # the others may have evicted its weights from the caches
                    call()
                for _ in range(block):
                    start = time.perf_counter()
                    call()
                    samples[name].append((time.perf_counter() - start) * 1e3)
            if after_turn:
                after_turn(turn, turns, samples)
    return samples


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
    samples = alternate({"run": signature_calls(model, signatures, config.num_threads, config.seed)}, config)
    return Timing.from_samples(samples["run"])


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


SAVE_RUNS_S = 2.0  # how often measure_parts saves its runs: rewriting them costs time as they grow


def measure_parts(parts, path, key, positions, config=HostTimingConfig(), notes="", policy_config=PolicyConfig(),
                  progress=None, network_identity=None):
    """Fills the latency table at `path` by timing the parts' models on the host, taking turns
    (`alternate`).

    Resumable: parts already in the table are skipped, and the runs timed so far are saved in
    `<path>.runs.json` (after a turn, at most every SAVE_RUNS_S seconds), which a rerun with the
    same parts and settings goes on from; it is removed once the table is written.

    Args:
      parts: part key (table.part_key) -> table.PartModel, or a .tflite path / bytes.
      path: output JSON file.
      key: table.TableKey (its threads must equal config.num_threads).
      positions: candidate position names in depth order.
      config: HostTimingConfig.
      notes: free text stored in the table's metadata.
      policy_config: the PolicyConfig the head models compute their confidence with (recorded
        in the table; export.convert_parts's default is PolicyConfig() too).
      progress: optional callable(turn, turns, parts) whenever the runs are saved (turns counts
        from the saved runs on when resuming).
      network_identity: cost_model.network_identity of the parts' network (recorded in the table,
        which the search checks against the calibration cache's).

    Returns:
      The LatencyTable.
    """
    if key.threads != config.num_threads:
        raise ValueError(f"table key says {key.threads} threads but timing uses num_threads={config.num_threads}")
    parts = {k: p if isinstance(p, table_lib.PartModel) else table_lib.PartModel(p) for k, p in parts.items()}
    metadata = {"tool": "mess_tf.latency.host", "runtime": runtime_version(), "delegate": "XNNPACK",
                "warmup_runs": config.warmup_runs, "num_runs": config.num_runs, "block_runs": config.block_runs,
                "pinned_cpus": None if config.cpus is None else sorted(config.cpus), "notes": notes}
    table = table_lib.resume(path, table_lib.LatencyTable(key, positions, metadata=metadata, policy=policy_config,
                                                          network_identity=network_identity))
    table.save(path)  # fails early on an unwritable path; marks the run as started
    todo = sorted(table.missing(list(parts)), key=table.depth_order)
    runs_path = f"{path}.runs.json"
    settings = {"parts": todo, "num_threads": config.num_threads, "warmup_runs": config.warmup_runs,
                "num_runs": config.num_runs, "block_runs": config.block_runs, "seed": config.seed}
    samples = _saved_runs(runs_path, settings)
    logging.info("%s: %d of %d parts already measured, %d to time in turns%s", path, len(parts) - len(todo),
                 len(parts), len(todo), f", going on from the runs saved in {runs_path}" if samples else "")
    calls = {k: signature_calls(parts[k].model, None if parts[k].signature is None else [parts[k].signature],
                                config.num_threads, config.seed) for k in todo}

    def save_runs(turn, turns, samples):
        io_utils.write_json(runs_path, dict(settings, samples=samples))
        logging.info("%s: turn %d/%d of %d parts", key.device, turn, turns, len(todo))
        if progress:
            progress(turn, turns, len(todo))

    samples = alternate(calls, config, samples, throttled(save_runs, SAVE_RUNS_S))
    for k in todo:
        table.set(k, table_lib.PartLatency.from_timing(Timing.from_samples(samples[k]), parts[k].macs))
    table.save(path)
    if os.path.exists(runs_path):
        os.remove(runs_path)
    return table


def _saved_runs(path, settings):
    """Part key -> ms timed by an interrupted measure_parts with the same `settings`, else {}:
    runs saved with other parts or settings are not comparable, and cost only time to redo."""
    if not os.path.exists(path):
        return {}
    try:
        saved = io_utils.read_json(path, "saved timing runs")
    except ValueError as e:
        logging.warning("%s; timing from scratch", e)
        return {}
    if {k: saved.get(k) for k in settings} != settings or not isinstance(saved.get("samples"), dict):
        logging.warning("%s holds runs of other parts or settings; timing from scratch", path)
        return {}
    return saved["samples"]


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
