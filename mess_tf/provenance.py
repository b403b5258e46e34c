"""When, on what machine and by which command a result was measured.

Every benchmark stores this beside its figures (key `measured`), so that a table rendered from the
JSON (tools/make_docs.py) can say when and where its numbers come from. Host latencies depend on
the machine and the day (other load, clocks), so a figure without them cannot be compared.
"""
import datetime
import os
import platform
import sys


def _cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows, else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def measured_on(argv=None):
    """This run's provenance, JSON-ready.

    Args:
      argv: the command line to record (default sys.argv), as `python ARGV...`.

    Returns:
      dict with `date` (UTC, ISO 8601, to the second), `cpu` (model name or None), `cpus`
      (logical CPUs), `machine` (e.g. "x86_64"), `platform` (OS and kernel) and `command`.
    """
    argv = sys.argv if argv is None else argv
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "command": " ".join(["python", *argv])}
