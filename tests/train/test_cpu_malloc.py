"""CPU training keeps freed memory for the next step (``device.tune_cpu_malloc``)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# The weight gradient of a grouped convolution (16 groups of 64 channels on 2x2 maps, as a
# lockstep group of 16 VGG models computes it), 10 times; print the minor page faults
# those calls cost (oneDNN's buffers, freed and made again each call).
LOOP = """
import resource, sys, torch
from porder.train.device import torch_settings
torch.set_num_threads(1)
x, w, g = torch.randn(1, 1024, 2, 2), torch.randn(1024, 64, 3, 3), torch.randn(1, 1024, 2, 2)
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 16, [False, True, False])
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
if sys.argv[1] == "tuned":
    with torch_settings("cpu", False, 1):
        faults()                       # the first calls grow the heap
        print(faults())
else:
    faults()
    print(faults())
"""


def _faults(mode: str, env=None) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True,
                         check=True, env=env)
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="module")
def plain():
    n = _faults("plain")
    if n < 10 * 200:
        pytest.skip(f"this torch's convolutions fault in {n} pages in 10 calls: nothing to keep")
    return n


def test_cpu_training_does_not_fault_freed_memory_in_again(plain):
    assert _faults("tuned") < plain / 20


def test_a_users_own_malloc_tunables_are_left_alone(plain):
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.check=0")
    assert _faults("tuned", env) > plain / 2
