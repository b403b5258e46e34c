"""Timing TFLite part models on a phone with the user's `benchmark_model` binary.

No registry ships `benchmark_model`; users build it (TensorFlow/LiteRT source tree) or download
it from the TFLite performance page, and pass its path. It is pushed to /data/local/tmp with the
models, run pinned to the big cores with `taskset`, after a cool-down, and its output parsed.

Two output formats are understood:
  * classic `benchmark_model` (microseconds): stats lines
      `count=50 first=.. curr=.. min=.. max=.. avg=.. std=.. [p5=.. median=.. p95=..]`
    (the first for warm-up, the last before the summary for the timed runs) and the summary
      `Inference timings in us: Init: .., First inference: .., Warmup (avg): .., Inference (avg): ..`;
  * LiteRT's benchmark tool (milliseconds): a `BENCHMARK RESULTS` block with
      `Inference (avg|min|max|median|std|p5|p95): X ms`.
Neither prints a p90 or per-run times. The table's p90_ms is then the tool's p95 (an upper bound
of the p90; p90_method "p95"); old classic binaries print no percentiles at all, and then median_ms
is the mean and p90_ms is mean + 1.2816 std (p90_method "normal").
"""
import dataclasses
import logging
import os
import re
import shlex
import time
from typing import Optional

from android_bench import adb as adb_lib
from mess_tf.latency import table as table_lib
from mess_tf.latency.table import Timing
from mess_tf.policy import PolicyConfig


class BenchmarkError(adb_lib.AdbError):
    """benchmark_model ran but printed no timings (bad model, unsupported op, wrong flags...)."""


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """benchmark_model flags, with the names users know.

    Attributes:
      num_threads, num_runs, warmup_runs: as the flags of the same name.
      use_xnnpack, use_gpu, use_nnapi: delegates.
      enable_op_profiling: per-op timing table in the output (kept in the logs, not parsed).
      pin_big_cores: run under `taskset` on the big cores.
    """

    num_threads: int = 4
    num_runs: int = 50
    warmup_runs: int = 5
    use_xnnpack: bool = True
    use_gpu: bool = False
    use_nnapi: bool = False
    enable_op_profiling: bool = False
    pin_big_cores: bool = True

    def __post_init__(self):
        for name in ("num_threads", "num_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_runs < 0:
            raise ValueError(f"warmup_runs must be >= 0, got {self.warmup_runs}")


def _flag(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def benchmark_command(binary, model, options, signature=None, cpus=None):
    """The shell command line that times `model` on the phone (remote paths).

    Args:
      binary: remote path of benchmark_model.
      model: remote path of the .tflite.
      options: BenchmarkOptions.
      signature: signature to run in a multi-signature model (--signature_to_run_for).
      cpus: CPU ids to pin to with taskset (None: no pinning).
    """
    flags = {"graph": model, "num_threads": options.num_threads, "num_runs": options.num_runs,
             "warmup_runs": options.warmup_runs, "use_xnnpack": options.use_xnnpack,
             "use_gpu": options.use_gpu, "use_nnapi": options.use_nnapi,
             "enable_op_profiling": options.enable_op_profiling}
    if signature:
        flags["signature_to_run_for"] = signature
    argv = [binary] + [f"--{name}={_flag(value)}" for name, value in flags.items()]
    if cpus:
        argv = ["taskset", adb_lib.cpu_mask(cpus)] + argv
    return shlex.join(argv)


_NUMBER = r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
_STATS = re.compile(rf"\bcount=\d+(?:\s+\w+={_NUMBER})+")
_SUMMARY = re.compile(r"Inference timings in us:")
_LITERT = re.compile(rf"^\s*Inference \((\w+)\):\s*({_NUMBER}) ms(?:\s*\((\d+) runs\))?", re.M)


def _parse_classic(text):
    lines = text.splitlines()
    summary = next((i for i, line in enumerate(lines) if _SUMMARY.search(line)), None)
    stats = [line for line in lines[:summary] if _STATS.search(line)]
    if not stats:
        raise BenchmarkError("benchmark_model printed 'Inference timings in us' but no `count=...` stats line")
    fields = dict(re.findall(rf"(\w+)=({_NUMBER})", _STATS.search(stats[-1]).group(0)))
    ms = {k: round(float(v) / 1000, 6) for k, v in fields.items() if k != "count"}  # printed in us
    mean, std = ms["avg"], ms["std"]
    percentiles = "median" in ms and "p95" in ms
    return Timing(median_ms=ms["median"] if percentiles else mean,
                  p90_ms=ms["p95"] if percentiles else Timing.normal_p90(mean, std),
                  mean_ms=mean, min_ms=ms["min"], max_ms=ms["max"], std_ms=std,
                  runs=int(fields["count"]), p90_method="p95" if percentiles else "normal")


def _parse_litert(text):
    block = text[text.index("BENCHMARK RESULTS"):]
    values, runs = {}, None
    for stat, value, count in _LITERT.findall(block):
        values[stat] = float(value)
        runs = int(count) if stat == "avg" and count else runs
    missing = {"avg", "min", "max", "median", "std", "p95"} - set(values)
    if missing or runs is None:
        raise BenchmarkError(f"the BENCHMARK RESULTS block lacks {sorted(missing) or 'the run count'}")
    return Timing(median_ms=values["median"], p90_ms=values["p95"], mean_ms=values["avg"], min_ms=values["min"],
                  max_ms=values["max"], std_ms=values["std"], runs=runs, p90_method="p95")


def parse_output(text):
    """benchmark_model output (either format) -> Timing in ms.

    Raises BenchmarkError, quoting the end of the output, when it holds no timings.
    """
    if "BENCHMARK RESULTS" in text:
        return _parse_litert(text)
    if _SUMMARY.search(text):
        return _parse_classic(text)
    tail = "\n".join(text.strip().splitlines()[-8:])
    raise BenchmarkError(f"benchmark_model printed no timings; its output ended with:\n{tail}")


@dataclasses.dataclass(frozen=True)
class Cooldown:
    """Letting the phone cool down before each timed model, so throttling does not skew a part.

    Attributes:
      seconds: fixed pause before each run.
      max_temp_c: if set, then wait until every thermal zone reads at most this (deg C)...
      poll_s: ...checking this often...
      max_wait_s: ...for at most this long (then go on, with a warning).
    """

    seconds: float = 5.0
    max_temp_c: float = None
    poll_s: float = 5.0
    max_wait_s: float = 300.0


class Phone:
    """One phone set up for timing models with benchmark_model.

    Args:
      adb: adb_lib.Adb.
      device: adb_lib.DeviceInfo (usable state).
      binary: local path of the user's benchmark_model for this phone's ABI.
      cooldown: Cooldown.
      remote_dir: folder on the phone for the binary and models.
      sleep: time.sleep (tests pass a fake).
    """

    def __init__(self, adb, device, binary, cooldown=Cooldown(), remote_dir=adb_lib.REMOTE_DIR + "/mess_tf",
                 sleep=time.sleep):
        if not os.path.isfile(binary):
            raise FileNotFoundError(f"--benchmark_binary {binary} not found; build or download the TFLite "
                                    "benchmark_model for the phone's ABI (e.g. android_aarch64)")
        self.adb, self.device, self.binary = adb, device, binary
        self.cooldown, self.remote_dir, self.sleep = cooldown, remote_dir, sleep
        self.remote_binary = f"{remote_dir}/{os.path.basename(binary)}"
        self._pushed = set()
        self._big_cores = None

    @property
    def serial(self):
        return self.device.serial

    def prepare(self):
        """Pushes benchmark_model, makes it executable and finds the big cores."""
        self.adb.shell(self.serial, f"mkdir -p {shlex.quote(self.remote_dir)}")
        self.adb.push(self.serial, self.binary, self.remote_binary)
        self.adb.shell(self.serial, f"chmod +x {shlex.quote(self.remote_binary)}")
        self._big_cores = adb_lib.big_cores(self.adb, self.serial)
        logging.info("%s: big cores %s", self.serial, self._big_cores)

    def _remote_model(self, local):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"model file not found: {local}")
        remote = f"{self.remote_dir}/{os.path.basename(local)}"
        if remote not in self._pushed:
            self.adb.push(self.serial, local, remote)
            self._pushed.add(remote)
        return remote

    def cool_down(self):
        """Sleeps cooldown.seconds, then waits for the thermal bound (if any)."""
        self.sleep(self.cooldown.seconds)
        if self.cooldown.max_temp_c is None:
            return
        waited = 0.0
        while True:
            hottest = max(adb_lib.temperatures_c(self.adb, self.serial).values(), default=None)
            if hottest is None or hottest <= self.cooldown.max_temp_c:
                return
            if waited >= self.cooldown.max_wait_s:
                logging.warning("%s: still %.1f C after %.0f s of cool-down (bound %.1f C); timing anyway",
                                self.serial, hottest, waited, self.cooldown.max_temp_c)
                return
            self.sleep(self.cooldown.poll_s)
            waited += self.cooldown.poll_s

    def time_model(self, model, options, signature=None):
        """Times one local .tflite (optionally one signature) on the phone -> Timing (ms)."""
        if self._big_cores is None:
            self.prepare()
        remote = self._remote_model(model)
        self.cool_down()
        cpus = self._big_cores if options.pin_big_cores else None
        output = self.adb.shell(self.serial, benchmark_command(self.remote_binary, remote, options, signature, cpus))
        try:
            return parse_output(output)
        except BenchmarkError as e:
            raise BenchmarkError(f"device {self.serial}, model {os.path.basename(model)}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TableJob:
    """One latency table to fill on a phone.

    Attributes:
      path: output JSON of the table.
      positions: candidate position names in depth order.
      parts: part key -> table.PartModel (model = local .tflite path).
      precision: the models' precision ("float32" | "float16" | "int8").
      input_size: (H, W) the models were built for.
      options: BenchmarkOptions.
      policy: the PolicyConfig the head models compute their confidence with.
      network_identity: cost_model.network_identity of the models' network (PartManifest's).
    """

    path: str
    positions: tuple
    parts: dict
    precision: str
    input_size: tuple
    options: BenchmarkOptions = BenchmarkOptions()
    policy: PolicyConfig = PolicyConfig()
    network_identity: Optional[dict] = None


def run_job(phone, job, notes=""):
    """Fills job.path with the latency of each part timed on `phone` (resumable, saved after
    each part; parts measured before a failure stay in the file). Returns the LatencyTable."""
    key = table_lib.TableKey(phone.device.table_device, job.precision, job.options.num_threads, job.input_size)
    device = phone.device
    metadata = {"tool": "benchmark_model", "runtime": os.path.basename(phone.binary),
                "device": {"serial": device.serial, "model": device.model, "soc": device.soc,
                           "android": device.android},
                "options": dataclasses.asdict(job.options), "cooldown": dataclasses.asdict(phone.cooldown),
                "notes": notes}
    empty = table_lib.LatencyTable(key, job.positions, metadata=metadata, policy=job.policy,
                                   network_identity=job.network_identity)

    def measure(part):
        model = job.parts[part]
        return phone.time_model(model.model, job.options, model.signature)

    return table_lib.fill_table(job.path, empty, list(job.parts), measure,
                                macs={k: p.macs for k, p in job.parts.items() if p.macs is not None})
