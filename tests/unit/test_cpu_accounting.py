"""The benchmarks' CPU accounting from /proc: per process and per thread, and its split per request."""

from __future__ import annotations

import os
import threading
import time

from loadtest.bench_e2e import cpu_seconds
from loadtest.profile_server import per_thread_ms, thread_cpu_seconds


def test_thread_cpu_is_read_per_thread_and_adds_up_to_the_process() -> None:
    pid = os.getpid()
    spun, release = threading.Event(), threading.Event()

    def spin() -> None:  # busy for 0.3 s of its own CPU, then alive and idle until read
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            sum(range(1000))
        spun.set()
        release.wait(30)

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert spun.wait(60)
        threads = thread_cpu_seconds(pid)
    finally:
        release.set()
        worker.join()
    assert pid in threads and worker.native_id in threads
    assert threads[worker.native_id] >= 0.25  # its own CPU, whatever else the machine runs (10 ms ticks)
    # the process's utime + stime covers its threads'
    assert cpu_seconds([pid]) >= sum(threads.values()) - 0.02


def test_per_thread_ms_splits_the_event_loop_the_busiest_thread_and_the_rest() -> None:
    before = {1: 1.0, 2: 0.5, 3: 0.0}
    after = {1: 1.2, 2: 0.9, 3: 0.1, 4: 0.1}  # thread 4 started meanwhile
    got = per_thread_ms(before, after, pid=1, requests=100)
    assert got == {"event-loop thread": 2.0, "busiest other thread": 4.0, "other threads": 2.0}
