"""Talking to Android phones through the `adb` executable.

Every adb call goes through one `Runner` (argv, timeout) -> CommandResult, so tests replace the
real subprocess with a fake that replays recorded phone output. On top of it: device discovery
(`adb devices -l` + `getprop`), pushing files, shell commands, the phone's big CPU cores and its
thermal-zone temperatures.
"""
import dataclasses
import re
import shlex
import subprocess
from typing import Callable

REMOTE_DIR = "/data/local/tmp"
# What adb prints when the phone went away (unplugged, rebooted, adbd died) mid-command.
_LOST_DEVICE = re.compile(r"device '.*' not found|device (offline|unauthorized)|no devices/emulators found|"
                          r"error: closed|protocol fault|device still connecting", re.I)


class AdbError(RuntimeError):
    """An adb command failed."""


class DeviceLostError(AdbError):
    """The phone disconnected or went offline during a command."""


class AdbNotFoundError(FileNotFoundError):
    """The adb executable does not exist."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str = ""


def subprocess_runner(argv, timeout):
    """Runs argv, returning a CommandResult; AdbNotFoundError when argv[0] does not exist."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise AdbNotFoundError(f"adb executable {argv[0]!r} not found; install Android platform-tools "
                               "(Debian: apt-get install adb) or pass its path with --adb") from None
    except subprocess.TimeoutExpired:
        raise AdbError(f"`{shlex.join(argv)}` did not finish within {timeout} s") from None
    return CommandResult(done.returncode, done.stdout, done.stderr)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """A connected phone.

    Attributes:
      serial: adb serial.
      state: adb state ("device" when usable; "offline", "unauthorized"...).
      model, soc, android: ro.product.model, ro.soc.model (or ro.board.platform),
        ro.build.version.release; "" until read with getprop.
    """

    serial: str
    state: str
    model: str = ""
    soc: str = ""
    android: str = ""

    @property
    def table_device(self):
        """The device name in latency-table keys: "adb:<serial>:<model>"."""
        return f"adb:{self.serial}:{self.model}"


class Adb:
    """The adb executable, called through a runner.

    Args:
      executable: adb path or name on PATH.
      runner: (argv list, timeout seconds) -> CommandResult; default runs a subprocess.
      timeout: seconds before a command counts as hung.
    """

    def __init__(self, executable="adb", runner: Callable = subprocess_runner, timeout=600.0):
        self.executable = executable
        self.runner = runner
        self.timeout = timeout

    def run(self, *args, serial=None, timeout=None):
        """Runs `adb [-s serial] args...` and returns its stdout.

        Raises DeviceLostError when adb reports the device gone, AdbError on any other failure.
        """
        argv = [self.executable] + (["-s", serial] if serial else []) + list(args)
        result = self.runner(argv, timeout or self.timeout)
        if result.returncode != 0:
            # The tool's last lines say what went wrong; its banner before them does not.
            message = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
            where = f"device {serial}: " if serial else ""
            if _LOST_DEVICE.search(message):
                raise DeviceLostError(f"{where}lost the connection during `{shlex.join(args)}`: {message}")
            raise AdbError(f"{where}`{shlex.join(args)}` failed (exit {result.returncode}): {message}")
        return result.stdout

    def shell(self, serial, command, timeout=None):
        """Runs a shell command line on the phone; returns its stdout."""
        return self.run("shell", command, serial=serial, timeout=timeout)

    def push(self, serial, local, remote):
        self.run("push", local, remote, serial=serial)


def parse_devices(text):
    """`adb devices -l` output -> [DeviceInfo] (serial and state; model from the listing)."""
    devices = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        extras = dict(f.split(":", 1) for f in fields[2:] if ":" in f)
        devices.append(DeviceInfo(fields[0], fields[1], model=extras.get("model", "")))
    return devices


def parse_getprop(text):
    """`getprop` output (`[name]: [value]` lines) -> {name: value}."""
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, re.M))


def list_devices(adb):
    """The attached phones with model, SoC and Android version (read with getprop for usable ones)."""
    devices = []
    for device in parse_devices(adb.run("devices", "-l")):
        if device.state == "device":
            props = parse_getprop(adb.shell(device.serial, "getprop"))
            device = dataclasses.replace(
                device, model=props.get("ro.product.model", device.model),
                soc=props.get("ro.soc.model") or props.get("ro.board.platform", ""),
                android=props.get("ro.build.version.release", ""))
        devices.append(device)
    return devices


def select_devices(devices, serials):
    """The usable devices with the given serials (all usable ones if `serials` is empty).

    Raises ValueError naming the connected serials when one is missing or not usable.
    """
    connected = ", ".join(f"{d.serial} ({d.state})" for d in devices) or "none"
    if not devices:
        raise ValueError("no Android device is connected (adb devices -l lists none); "
                         "plug one in and allow USB debugging")
    by_serial = {d.serial: d for d in devices}
    chosen = []
    for serial in serials or [d.serial for d in devices if d.state == "device"]:
        device = by_serial.get(serial)
        if device is None:
            raise ValueError(f"no device with serial {serial!r}; connected: {connected}")
        if device.state != "device":
            raise ValueError(f"device {serial} is {device.state}, not ready; connected: {connected}")
        chosen.append(device)
    if not chosen:
        raise ValueError(f"no connected device is ready; connected: {connected}")
    return chosen


def _per_file_values(text, pattern):
    """`grep . FILES` output (`path:value` lines) -> {number in path: int value} for `pattern`."""
    values = {}
    for path, value in re.findall(r"^(\S+?):(-?\d+)\s*$", text, re.M):
        match = re.search(pattern, path)
        if match:
            values[int(match.group(1))] = int(value)
    return values


def big_cores(adb, serial):
    """CPU ids of the phone's big cores: all but the lowest-frequency cluster (all cores if
    every core has the same maximum frequency). Read from cpuinfo_max_freq."""
    text = adb.shell(serial, "grep . /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq 2>/dev/null; true")
    freqs = _per_file_values(text, r"/cpu(\d+)/cpufreq/")
    if not freqs:
        raise AdbError(f"device {serial}: could not read CPU frequencies from cpuinfo_max_freq: {text.strip()!r}")
    slowest = min(freqs.values())
    big = sorted(cpu for cpu, f in freqs.items() if f > slowest)
    return big or sorted(freqs)


def cpu_mask(cpus):
    """CPU ids -> the hex affinity mask taskset takes, e.g. [4, 5, 6, 7] -> "f0"."""
    return format(sum(1 << c for c in cpus), "x")


def temperatures_c(adb, serial):
    """Thermal-zone temperatures of the phone in degrees C ({zone id: temperature}).

    Zones report millidegrees (most) or degrees (some); values above 1000 are taken as millidegrees.
    Unreadable zones (some return EINVAL while their sensor is off) are skipped.
    """
    text = adb.shell(serial, "grep . /sys/class/thermal/thermal_zone*/temp 2>/dev/null; true")
    raw = _per_file_values(text, r"thermal_zone(\d+)/")
    return {zone: v / 1000.0 if abs(v) > 1000 else float(v) for zone, v in raw.items()}

