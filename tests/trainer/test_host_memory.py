"""run.host_mmap_threshold_kib (trainer/host_memory.py): freed tensors leave the resident set."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.host_memory import set_mmap_threshold

REPO = Path(__file__).resolve().parents[2]

# Frees a 16 MiB mmapped block (which raises glibc's threshold above 4 MiB), then allocates 200
# tensors of 4 MiB, keeps every other one and frees the rest: the growth of the resident set
# that stays, in MiB.
PROBE = """
import sys, torch
from trainer.host_memory import set_mmap_threshold
if sys.argv[1] == "fixed":
    assert set_mmap_threshold(256)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
base = rss()
block = torch.ones(4 << 20)  # 16 MiB, mmapped
del block
tensors = [torch.ones(1 << 20) for _ in range(200)]
kept = tensors[1::2]
del tensors
print(rss() - base)
"""


def resident_growth(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_fixed_mmap_threshold_returns_freed_tensors_to_the_system():
    assert set_mmap_threshold(256)
    kept = 100 * 4  # MiB alive at the end
    default, fixed = resident_growth("default"), resident_growth("fixed")
    assert fixed < kept + 100, fixed  # the freed half is gone
    assert default > fixed + 250, (default, fixed)  # glibc's own policy keeps it


def test_zero_leaves_the_c_librarys_policy():
    assert not set_mmap_threshold(0)
