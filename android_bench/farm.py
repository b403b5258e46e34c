"""Benchmarking several phones at once: one worker thread and one job queue per phone.

Phones are independent machines, so they are timed in parallel; on each phone the jobs
(latency tables, e.g. one per thread count) run one after another, so two models never
compete for the same phone. A phone that fails (lost connection, bad binary) stops its own
queue only; its finished parts stay in its table files and the other phones go on.
"""
import dataclasses
import logging
import queue
import threading
from typing import Optional

from android_bench import benchmark


@dataclasses.dataclass
class DeviceResult:
    """What one phone produced.

    Attributes:
      serial: the phone.
      tables: output path -> completed LatencyTable, in job order.
      error: the exception that stopped this phone's queue, or None.
      failed_job: the TableJob that was running when it failed (its file keeps the parts measured).
    """

    serial: str
    tables: dict = dataclasses.field(default_factory=dict)
    error: Optional[Exception] = None
    failed_job: Optional[benchmark.TableJob] = None


def _worker(phone, jobs, result, notes):
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        try:
            result.tables[job.path] = benchmark.run_job(phone, job, notes)
        except Exception as e:  # pylint: disable=broad-except  # reported per phone, other phones go on
            logging.error("%s: %s", phone.serial, e)
            result.error, result.failed_job = e, job
            return


def benchmark_phones(work, notes=""):
    """Runs each phone's jobs on its own thread.

    Args:
      work: list of (benchmark.Phone, [benchmark.TableJob]) pairs, one per phone.
      notes: free text stored in every table.

    Returns:
      {serial: DeviceResult}, in the order of `work`.
    """
    results, threads = {}, []
    for phone, jobs in work:
        job_queue = queue.Queue()
        for job in jobs:
            job_queue.put(job)
        results[phone.serial] = DeviceResult(phone.serial)
        thread = threading.Thread(target=_worker, args=(phone, job_queue, results[phone.serial], notes),
                                  name=f"bench-{phone.serial}", daemon=True)
        threads.append(thread)
        thread.start()
    for thread in threads:
        thread.join()
    return results
