"""Launches and device allocations of the CUDA runtime, counted: the real
runtime (rnnc/backends/cuda/runtime.py: schedule, buffers, host loop) drives
a device that runs no kernel but counts what it is asked to do.

Launches per step are measured, not read off the launch lists: the
difference between a call of 2T steps and one of T steps, divided by T, so
whatever the runtime launches once per call (the hoisted products, the
parameter gradients after the loop) cancels out. The targets are the ones
the runtime is built for (kernel launches cost the host several
microseconds each, more than most of these kernels take on the GPU): a
recurrent product and the elementwise work it feeds in one launch, so at
most 1 forward and 2 backward for the LSTM and the GRU, 3 and 5 for the
attention LSTM.
"""
from __future__ import annotations

import re
from contextlib import nullcontext

import numpy as np
import pytest

from rnnc.backends.cuda.executor import unpacked
from rnnc.backends.cuda.lowering import generate
from rnnc.backends.cuda.runtime import CudaModule

import cuda_cases as cases
from conftest import EXAMPLES, compile_sized, example

DIMS = {"D": 6, "H": 8, "E": 4, "S": 3, "P": 5}
B = 2
# (example, forward launches per step, backward launches per step), at most
TARGETS = [("lstm", 1, 2), ("gru", 1, 2), ("attention_lstm", 3, 5)]


class CountingDevice:
    """A device that counts launches and allocations; its memory is host memory
    nobody reads, its kernels do nothing."""

    def __init__(self):
        self.launched = []  # kernel names
        self.allocations = 0
        self.arities = {}

    def active(self):
        return nullcontext()

    def alloc(self, nbytes):
        self.allocations += 1
        memory = np.empty(max(nbytes, 1), np.uint8)
        return memory.ctypes.data, memory

    def htod(self, ptr, array):
        pass

    def dtoh(self, out, ptr):
        out[...] = 0

    def dtod(self, dst, src, nbytes):
        pass

    def memset0(self, ptr, nbytes):
        pass

    def empty(self, shape):
        return np.empty(shape, np.float32)

    def launch(self, kernel, grid, block, args, shared=0):
        rows, ptrs = unpacked(args)
        assert len(ptrs) == self.arities[kernel] and rows > 0, kernel
        self.launched.append(kernel)


class PersistentCountingDevice(CountingDevice):
    """A counting device that holds `CAPACITY` blocks of a persistent kernel at
    once (as a GPU of 132 multiprocessors holding 2 each), and checks that its
    grids are no larger."""

    CAPACITY = 264

    def co_resident(self, kernel, block, shared=0):
        return self.CAPACITY

    def launch(self, kernel, grid, block, args, shared=0):
        assert grid[0] <= self.CAPACITY or not kernel.endswith("_persistent"), (kernel, grid)
        super().launch(kernel, grid, block, args, shared)


def counting_module(name: str, precision="fp32", device=None, recompute="auto"):
    program = compile_sized(example(name), DIMS, recompute=recompute)
    generated = generate(program, precision)
    device = device or CountingDevice()
    device.arities = generated.launches.arities()
    return CudaModule(program, generated.launches, device, precision=precision), device


def launches(module, device, T: int) -> tuple:
    """(forward, backward) launches of one call of T steps."""
    args = cases.arguments(module.program, steps=T, batch=B)
    before = len(device.launched)
    res = module.forward(args["inputs"], args["params"], args["states"], args["contexts"])
    forward = len(device.launched) - before
    module.backward(res, args["d_outputs"], args["d_states"])
    return forward, len(device.launched) - before - forward


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("name, forward, backward", TARGETS)
def test_launches_per_step_meet_the_targets(name, forward, backward, precision):
    module, device = counting_module(name, precision)
    T = 100
    f1, b1 = launches(module, device, T)
    f2, b2 = launches(module, device, 2 * T)
    per_step = ((f2 - f1) / T, (b2 - b1) / T)
    assert per_step[0] <= forward and per_step[1] <= backward, \
        f"{name}: {per_step[0]:g} forward and {per_step[1]:g} backward launches per step"


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_a_persistent_lstm_launches_as_often_at_1000_steps_as_at_10(precision):
    """The persistent kernels run every step of a forward and of a backward in
    one launch each: at most 3 launches for a forward, 8 for forward and
    backward, whatever T."""
    module, device = counting_module("lstm", precision, PersistentCountingDevice())
    counts = {T: launches(module, device, T) for T in (10, 1000)}
    assert counts[10] == counts[1000], counts
    forward, backward = counts[10]
    assert forward <= 3 and forward + backward <= 8, counts
    assert {"rnnc_step_persistent", "rnnc_backward_step_persistent"} <= set(device.launched)


class TooSmallDevice(PersistentCountingDevice):
    """A GPU that cannot hold one block of a persistent kernel (a consumer GPU's 99 KB
    a block, say, for a kernel that keeps more weights than that)."""

    CAPACITY = 0


def test_a_gpu_that_cannot_hold_a_persistent_kernel_runs_its_steps_launch_by_launch():
    module, device = counting_module("lstm", device=TooSmallDevice())
    with pytest.warns(RuntimeWarning, match=r"cannot hold a block of rnnc_\w+_persistent .* launch by launch") as said:
        small = launches(module, device, 10)
    assert {"rnnc_step_persistent", "rnnc_backward_step_persistent"} <= {re.search(r"block of (\w+)", str(w.message)).group(1) for w in said}
    by_launch = launches(*counting_module("lstm"), 10)
    assert small == by_launch and not any(k.endswith("_persistent") for k in device.launched)


@pytest.mark.parametrize("policy", ["none", "auto", "all"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_launches_as_often_at_1000_steps_as_at_10(path, policy):
    """Every example, every policy (replays are persistent too): the launches
    of a call do not grow with T."""
    module, device = counting_module(path.stem, device=PersistentCountingDevice(), recompute=policy)
    assert launches(module, device, 10) == launches(module, device, 1000)


@pytest.mark.parametrize("name", [name for name, _, _ in TARGETS])
def test_a_call_like_the_last_allocates_nothing(name):
    """The caching pool: once a call has run and its result is gone, a call of
    the same sizes takes all its device memory from what that one gave back,
    and still holds the bytes the plan predicts."""
    module, device = counting_module(name)
    counted = []
    for T in (5, 5, 5):
        args = cases.arguments(module.program, steps=T, batch=B)
        made = device.allocations
        res = module.forward(args["inputs"], args["params"], args["states"], args["contexts"])
        peak = module.backward(res, args["d_outputs"], args["d_states"]).peak_bytes
        plan = module.program.plan
        assert (res.stored_bytes, peak) == (plan.stored_bytes(T, B, "float32"), plan.peak_bytes(T, B, "float32"))
        counted.append(device.allocations - made)
        del res
    assert counted[0] > 0 and counted[1:] == [0, 0]
