"""The worker process's memory behaviour: freed activation buffers are kept for the next batch."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from scorecam_stream.workers import keep_freed_memory

def faults():  # page faults of ten 100 MiB allocate-and-free rounds, like a batch's buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        buffer = torch.ones(100 * 2**20 // 4)
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(), keep_freed_memory(), faults(), faults(), keep_freed_memory())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_buffers_are_reused_not_faulted_in_again():
    # A fresh process: every Worker made by other tests has already tuned this one.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, tuned, first, again, twice = out.stdout.split()
    pages = 100 * 2**20 // 4096
    assert int(default) >= 10 * pages * 0.9  # by default every round faults its pages in again
    assert tuned == twice == "True"
    assert int(first) <= 2 * pages  # once, for the first round
    assert int(again) < pages // 10  # then the memory is reused
