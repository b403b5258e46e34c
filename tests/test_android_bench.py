"""android_bench against recorded phone output: discovery, command sequence, parsing, failures, farm, CLI.

No phone is attached: adb is replaced by a fake that replays files in android_bench/testdata/
(an injected runner for most tests, a fake `adb` executable on PATH for the subprocess path and the CLI).
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from android_bench import adb as adb_lib
from android_bench import benchmark, farm
from mess_tf.deployment import DeploymentConfig
from mess_tf.latency import table as table_lib
from mess_tf.latency.table import LatencyTable, PartModel
from mess_tf.policy import PolicyConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTDATA = ROOT / "android_bench" / "testdata"
PIXEL, GALAXY = "28121FDH2000QY", "R5CT3265ZKX"
POSITIONS = ("block_3_add", "out_relu")


def recorded(name):
    return (TESTDATA / name).read_text()


def ok(text=""):
    return adb_lib.CommandResult(0, text)


def lost(serial):
    return adb_lib.CommandResult(1, "", f"error: device '{serial}' not found\n")


class FakeAdb:
    """A runner replaying recorded output: rules are (regex on the joined command, result or
    callable returning one); every argv is recorded."""

    def __init__(self, rules):
        self.rules, self.calls = rules, []

    def __call__(self, argv, timeout):
        self.calls.append(argv)
        line = shlex.join(argv[1:])
        for pattern, reply in self.rules:
            if re.search(pattern, line):
                return reply() if callable(reply) else reply
        raise AssertionError(f"unexpected adb call: {line}")

    def commands(self, serial):
        """The calls for one phone, without `adb -s SERIAL`."""
        return [shlex.join(a[3:]) for a in self.calls if a[1:3] == ["-s", serial]]


def phone_rules(serial=PIXEL, name="pixel7", bench="benchmark_model_classic.txt"):
    return [
        (rf"-s {serial} shell getprop$", ok(recorded(f"getprop_{name}.txt"))),
        (rf"-s {serial} shell 'mkdir -p", ok()),
        (rf"-s {serial} push ", ok("1 file pushed, 0 skipped.\n")),
        (rf"-s {serial} shell 'chmod \+x", ok()),
        (rf"-s {serial} shell .*cpuinfo_max_freq", ok(recorded(f"cpuinfo_max_freq_{name}.txt"))),
        (rf"-s {serial} shell .*thermal_zone", ok(recorded("thermal_cool.txt"))),
        (rf"-s {serial} shell .*benchmark_model --graph", ok(recorded(bench))),
    ]


@pytest.fixture
def parts(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    models = {}
    for key in ("segment:block_3_add", "segment:out_relu", "head:block_3_add:fcn_w64_b1", "final_head"):
        path = folder / f"{key}.tflite"
        path.write_bytes(b"tflite")
        models[key] = PartModel(str(path), macs=1000)
    return models


@pytest.fixture
def binary(tmp_path):
    path = tmp_path / "benchmark_model"
    path.write_bytes(b"\x7fELF")
    return str(path)


def _device(serial=PIXEL, model="Pixel 7"):
    return adb_lib.DeviceInfo(serial, "device", model, "GS201", "14")


def _job(path, parts, **options):
    return benchmark.TableJob(str(path), POSITIONS, parts, "int8", (64, 64), benchmark.BenchmarkOptions(**options))


# ---- discovery -----------------------------------------------------------------------------

def test_list_devices_reads_model_soc_and_android():
    fake = FakeAdb([(r"^devices -l$", ok(recorded("adb_devices_l.txt")))] + phone_rules()
                   + phone_rules(GALAXY, "galaxy_s22"))
    devices = adb_lib.list_devices(adb_lib.Adb(runner=fake))
    assert devices == [
        adb_lib.DeviceInfo(PIXEL, "device", "Pixel 7", "GS201", "14"),
        adb_lib.DeviceInfo(GALAXY, "device", "SM-S901B", "s5e9925", "13"),  # no ro.soc.model: board platform
        adb_lib.DeviceInfo("0A151JEC201193", "unauthorized"),
    ]
    assert len(fake.calls) == 3  # getprop is not asked of the unauthorized phone
    assert devices[0].table_device == "adb:28121FDH2000QY:Pixel 7"


def test_select_devices_errors_list_the_connected_serials():
    devices = adb_lib.parse_devices(recorded("adb_devices_l.txt"))
    assert [d.serial for d in adb_lib.select_devices(devices, [])] == [PIXEL, GALAXY]
    assert [d.serial for d in adb_lib.select_devices(devices, [GALAXY])] == [GALAXY]
    with pytest.raises(ValueError, match=rf"no device with serial 'NOPE'; connected: {PIXEL} \(device\), "):
        adb_lib.select_devices(devices, ["NOPE"])
    with pytest.raises(ValueError, match="0A151JEC201193 is unauthorized"):
        adb_lib.select_devices(devices, ["0A151JEC201193"])
    with pytest.raises(ValueError, match="no Android device is connected"):
        adb_lib.select_devices(adb_lib.parse_devices(recorded("adb_devices_none.txt")), [])


def test_big_cores_and_temperatures_from_recordings():
    fake = FakeAdb(phone_rules() + phone_rules(GALAXY, "galaxy_s22"))
    adb = adb_lib.Adb(runner=fake)
    assert adb_lib.big_cores(adb, PIXEL) == [4, 5, 6, 7]
    assert adb_lib.big_cores(adb, GALAXY) == [4, 5, 6, 7]
    assert adb_lib.cpu_mask([4, 5, 6, 7]) == "f0" and adb_lib.cpu_mask([0, 1, 2]) == "7"
    assert adb_lib.temperatures_c(adb, PIXEL) == {0: 36.25, 1: 35.781, 2: 37.968, 3: 34.0, 4: 31.0}
    same = FakeAdb([(r"cpuinfo_max_freq", ok("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq:2000000\n"
                                            "/sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq:2000000\n"))])
    assert adb_lib.big_cores(adb_lib.Adb(runner=same), PIXEL) == [0, 1]


# ---- command line and output parsing ---------------------------------------------------------

def test_benchmark_command_has_the_flags_users_know():
    options = benchmark.BenchmarkOptions(num_threads=2, num_runs=30, warmup_runs=3, use_nnapi=True,
                                         enable_op_profiling=True)
    command = benchmark.benchmark_command("/data/local/tmp/mess_tf/benchmark_model",
                                          "/data/local/tmp/mess_tf/staged.tflite", options, "stage_2", [4, 5, 6, 7])
    assert shlex.split(command) == [
        "taskset", "f0", "/data/local/tmp/mess_tf/benchmark_model", "--graph=/data/local/tmp/mess_tf/staged.tflite",
        "--num_threads=2", "--num_runs=30", "--warmup_runs=3", "--use_xnnpack=true", "--use_gpu=false",
        "--use_nnapi=true", "--enable_op_profiling=true", "--signature_to_run_for=stage_2"]
    assert not benchmark.benchmark_command("b", "m", options).startswith("taskset")


@pytest.mark.parametrize("name, median, p90, mean, runs, method", [
    # classic with percentiles: the timed-runs stats line, not the warm-up one; p90 holds p95.
    ("benchmark_model_classic.txt", 3.574, 3.842, 3.60212, 277, "p95"),
    # op profiling adds `count=` lines after the summary; they are not the model's timings.
    ("benchmark_model_classic_op_profiling.txt", 1.401, 1.497, 1.4148, 705, "p95"),
    # old binaries: no percentiles, avg in scientific notation.
    ("benchmark_model_classic_old.txt", 20.9121, 20.9121 + 1.2816 * 0.455, 20.9121, 50, "normal"),
    # LiteRT benchmark (recorded on this host from ai_edge_litert.tools.benchmark_litert_model).
    ("litert_benchmark_mobilenetv2.txt", 0.63, 0.71, 0.66, 50, "p95"),
])
def test_parse_recorded_outputs(name, median, p90, mean, runs, method):
    t = benchmark.parse_output(recorded(name))
    assert (t.median_ms, t.p90_ms, t.mean_ms) == pytest.approx((median, p90, mean))
    assert (t.runs, t.p90_method) == (runs, method)
    assert t.min_ms <= t.median_ms <= t.max_ms


def test_parse_output_without_timings_quotes_the_tool():
    with pytest.raises(benchmark.BenchmarkError, match="(?s)ended with:.*RESIZE_BILINEAR.*Benchmarking failed"):
        benchmark.parse_output(recorded("benchmark_model_unsupported_op.txt"))


# ---- one phone: command sequence, cool-down, table ---------------------------------------------

def test_run_job_command_sequence_and_table(tmp_path, parts, binary):
    fake, sleeps = FakeAdb(phone_rules()), []
    phone = benchmark.Phone(adb_lib.Adb(runner=fake), _device(), binary, benchmark.Cooldown(seconds=7),
                            sleep=sleeps.append)
    table = benchmark.run_job(phone, _job(tmp_path / "t.json", parts, num_threads=4))
    remote = "/data/local/tmp/mess_tf"
    run = (f"shell 'taskset f0 {remote}/benchmark_model --graph={remote}/{{}}.tflite --num_threads=4 "
           "--num_runs=50 --warmup_runs=5 --use_xnnpack=true --use_gpu=false --use_nnapi=false "
           "--enable_op_profiling=false'")
    expected = [f"shell 'mkdir -p {remote}'", f"push {binary} {remote}/benchmark_model",
                f"shell 'chmod +x {remote}/benchmark_model'",
                "shell 'grep . /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq 2>/dev/null; true'"]
    for key in parts:
        expected += [f"push {parts[key].model} {remote}/{key}.tflite", run.format(key)]
    assert fake.commands(PIXEL) == expected
    assert sleeps == [7] * 4
    assert table.key == table_lib.TableKey("adb:28121FDH2000QY:Pixel 7", "int8", 4, (64, 64))
    assert table.segments["out_relu"].median_ms == pytest.approx(3.574)
    assert table.final_head.p90_method == "p95" and table.final_head.macs == 1000
    assert table.metadata["device"]["soc"] == "GS201"
    assert LatencyTable.load(tmp_path / "t.json") == table
    assert table.worst_latency(DeploymentConfig("budgeted")) == pytest.approx(3 * 3.574)


def test_cooldown_waits_for_the_thermal_bound(binary):
    readings = iter(["thermal_hot.txt", "thermal_hot.txt", "thermal_cool.txt"])
    fake = FakeAdb([(r"thermal_zone", lambda: ok(recorded(next(readings))))])
    sleeps = []
    phone = benchmark.Phone(adb_lib.Adb(runner=fake), _device(), binary,
                            benchmark.Cooldown(seconds=5, max_temp_c=40, poll_s=2), sleep=sleeps.append)
    phone.cool_down()
    assert sleeps == [5, 2, 2]  # 51.25 C, 51.25 C, then 37.97 C <= 40 C
    always_hot = FakeAdb([(r"thermal_zone", ok(recorded("thermal_hot.txt")))])
    phone = benchmark.Phone(adb_lib.Adb(runner=always_hot), _device(), binary,
                            benchmark.Cooldown(seconds=0, max_temp_c=40, poll_s=10, max_wait_s=30), sleep=sleeps.append)
    sleeps.clear()
    phone.cool_down()  # gives up after max_wait_s and times anyway
    assert sleeps == [0, 10, 10, 10]


# ---- failures ------------------------------------------------------------------------------------

def test_adb_missing_is_a_clear_error(tmp_path):
    adb = adb_lib.Adb(str(tmp_path / "no-adb"))
    with pytest.raises(FileNotFoundError, match="adb executable .*no-adb' not found; install Android platform-tools"):
        adb_lib.list_devices(adb)


def test_benchmark_binary_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--benchmark_binary .*benchmark_model not found"):
        benchmark.Phone(adb_lib.Adb(runner=FakeAdb([])), _device(), str(tmp_path / "benchmark_model"))


def test_failing_benchmark_run_names_device_and_tool_message(tmp_path, parts, binary):
    rules = [(r"benchmark_model --graph", adb_lib.CommandResult(1, recorded("benchmark_model_unsupported_op.txt")))]
    phone = benchmark.Phone(adb_lib.Adb(runner=FakeAdb(rules + phone_rules())), _device(), binary,
                            benchmark.Cooldown(0), sleep=lambda s: None)
    with pytest.raises(adb_lib.AdbError, match=rf"(?s)device {PIXEL}: .* failed \(exit 1\).*RESIZE_BILINEAR"):
        benchmark.run_job(phone, _job(tmp_path / "t.json", parts))
    # An old adb that does not forward the exit status: the output itself shows the failure.
    rules = [(r"benchmark_model --graph", ok(recorded("benchmark_model_unsupported_op.txt")))]
    phone = benchmark.Phone(adb_lib.Adb(runner=FakeAdb(rules + phone_rules())), _device(), binary,
                            benchmark.Cooldown(0), sleep=lambda s: None)
    with pytest.raises(benchmark.BenchmarkError, match="block_3_add.tflite: benchmark_model printed no timings"):
        benchmark.run_job(phone, _job(tmp_path / "t2.json", parts))


def _dies_after(runs, serial=PIXEL, name="pixel7"):
    """Phone rules whose benchmark runs succeed `runs` times, then the phone is gone."""
    count = iter(range(1000))
    good = ok(recorded("benchmark_model_classic.txt"))
    return [(rf"-s {serial} shell .*benchmark_model --graph", lambda: good if next(count) < runs else lost(serial))] \
        + phone_rules(serial, name)


def test_device_lost_mid_run_keeps_measured_parts_and_resumes(tmp_path, parts, binary):
    path = tmp_path / "t.json"
    phone = benchmark.Phone(adb_lib.Adb(runner=FakeAdb(_dies_after(2))), _device(), binary, benchmark.Cooldown(0),
                            sleep=lambda s: None)
    with pytest.raises(adb_lib.DeviceLostError, match=rf"device {PIXEL}: lost the connection .*not found"):
        benchmark.run_job(phone, _job(path, parts))
    assert LatencyTable.load(path).part_keys() == ["segment:block_3_add", "segment:out_relu"]

    fake = FakeAdb(phone_rules())
    phone = benchmark.Phone(adb_lib.Adb(runner=fake), _device(), binary, benchmark.Cooldown(0), sleep=lambda s: None)
    table = benchmark.run_job(phone, _job(path, parts))
    runs = [c for c in fake.commands(PIXEL) if "--graph" in c]
    assert len(runs) == 2 and "head:block_3_add:fcn_w64_b1.tflite" in runs[0] and "final_head.tflite" in runs[1]
    assert len(table.part_keys()) == 4


# ---- several phones --------------------------------------------------------------------------------

def test_farm_runs_each_phone_queue_and_isolates_failures(tmp_path, parts, binary):
    fake = FakeAdb(phone_rules() + _dies_after(1, GALAXY, "galaxy_s22"))
    adb = adb_lib.Adb(runner=fake)
    phones = [benchmark.Phone(adb, d, binary, benchmark.Cooldown(0), sleep=lambda s: None)
              for d in (_device(), _device(GALAXY, "SM-S901B"))]
    work = [(p, [_job(tmp_path / f"{p.serial}_t{t}.json", parts, num_threads=t) for t in (1, 4)]) for p in phones]
    results = farm.benchmark_phones(work, notes="farm test")
    pixel, galaxy = results[PIXEL], results[GALAXY]
    assert pixel.error is None and list(pixel.tables) == [str(tmp_path / f"{PIXEL}_t{t}.json") for t in (1, 4)]
    assert [t.key.threads for t in pixel.tables.values()] == [1, 4]
    assert pixel.tables[str(tmp_path / f"{PIXEL}_t4.json")].metadata["notes"] == "farm test"
    assert isinstance(galaxy.error, adb_lib.DeviceLostError) and galaxy.tables == {}
    assert LatencyTable.load(galaxy.failed_job.path).part_keys() == ["segment:block_3_add"]
    assert not os.path.exists(tmp_path / f"{GALAXY}_t4.json")  # its queue stopped at the failure


# ---- the real subprocess path and the CLI, with a fake `adb` executable on PATH -----------------

FAKE_ADB = textwrap.dedent("""\
    #!{python}
    import pathlib, sys
    data = pathlib.Path({testdata!r})
    args = sys.argv[1:]
    phone = {{"-s {serial}": "pixel7", "-s {galaxy}": "galaxy_s22"}}.get(" ".join(args[:2]))
    line = " ".join(args)
    if phone == "galaxy_s22" and "--graph=" in line:
        sys.stderr.write("error: device '{galaxy}' not found\\n")
        sys.exit(1)
    replies = [("devices -l", "adb_devices_l.txt"), ("shell getprop", f"getprop_{{phone}}.txt"),
               ("cpuinfo_max_freq", f"cpuinfo_max_freq_{{phone}}.txt"), ("thermal_zone", "thermal_cool.txt"),
               ("--graph=", "benchmark_model_classic.txt")]
    for pattern, name in replies:
        if pattern in line:
            sys.stdout.write((data / name).read_text())
            break
    """)


@pytest.fixture
def fake_adb_on_path(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "adb"
    script.write_text(FAKE_ADB.format(python=sys.executable, testdata=str(TESTDATA), serial=PIXEL, galaxy=GALAXY))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return script


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "android_bench", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def test_subprocess_runner_with_fake_adb(fake_adb_on_path):
    adb = adb_lib.Adb()
    assert [d.model for d in adb_lib.list_devices(adb)][0] == "Pixel 7"
    with pytest.raises(adb_lib.DeviceLostError, match=f"{GALAXY}: lost the connection.*not found"):
        adb.shell(GALAXY, "/data/local/tmp/benchmark_model --graph=m.tflite")


def test_cli_lists_devices_and_writes_a_table(tmp_path, fake_adb_on_path, parts, binary):
    listing = _cli("--list_devices")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"{PIXEL}\s+device\s+Pixel 7\s+GS201\s+14", listing.stdout)

    stride8 = PolicyConfig(confidence_stride=8)  # the heads' confidence: the table must say so
    table_lib.PartManifest(POSITIONS, parts, "int8", (64, 64), stride8).save(tmp_path / "parts")
    output = tmp_path / "tables" / "{serial}.json"
    done = _cli(f"--benchmark_binary={binary}", f"--models={tmp_path / 'parts'}", f"--devices={PIXEL}",
                f"--output={output}", "--cooldown_s=0", "--num_threads=2")
    assert done.returncode == 0, done.stderr
    table = LatencyTable.load(tmp_path / "tables" / f"{PIXEL}.json")
    assert table.key.threads == 2 and len(table.part_keys()) == 4 and table.policy == stride8
    assert f"{PIXEL}: 4 parts" in done.stdout

    missing = _cli("--benchmark_binary=/nowhere/benchmark_model", f"--models={tmp_path / 'parts'}",
                   f"--output={output}")
    assert missing.returncode == 2 and "error: --benchmark_binary /nowhere/benchmark_model not found" in missing.stderr
    several = _cli(f"--benchmark_binary={binary}", f"--models={tmp_path / 'parts'}", "--output=t.json")
    assert several.returncode == 2 and "must contain {serial}" in several.stderr
    assert json.loads((tmp_path / "parts" / "parts.json").read_text())["precision"] == "int8"
