"""workers/allocator.py: freed memory stays in the process, so reusing it costs no page faults."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# 100 blocks of 2 MiB, written (bytearray zero-fills them), freed, then allocated again: the page faults of
# the second round are what a micro-batch pays for the memory the previous one freed.
CYCLE = """
import resource, sys
from workers import allocator
if sys.argv[1] == "retain":
    assert allocator.retain_freed_memory()
def cycle():
    blocks = [bytearray(2 * 2**20) for _ in range(100)]
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CYCLE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    pages = 100 * 2 * 2**20 // 4096
    assert second_round_faults("default") > pages // 2  # glibc gives the 200 MiB back and faults it in again
    assert second_round_faults("retain") < pages // 50  # kept: reused as it is
