"""Benchmarks record when, where and how they measured (mess_tf.provenance)."""
import datetime
import json

from mess_tf import provenance


def test_measured_on_records_date_machine_and_command_as_json():
    measured = provenance.measured_on(["bench/x.py", "--rounds=3"])
    assert json.loads(json.dumps(measured)) == measured
    assert set(measured) == {"date", "cpu", "cpus", "machine", "platform", "command"}
    assert datetime.datetime.strptime(measured["date"], "%Y-%m-%dT%H:%M:%SZ")
    assert measured["command"] == "python bench/x.py --rounds=3"
    assert measured["cpus"] >= 1
