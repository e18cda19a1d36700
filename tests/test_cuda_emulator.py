"""The CUDA emulation itself: small hand-written kernels, each wrong in a way a
GPU would punish (by chance or undefined behaviour), are caught, and their
correct twins pass (tests/cuda_emulator.py says how)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from rnnc.backends.cuda.executor import packed
from rnnc.backends.cuda.kernels import intrinsics
from rnnc.backends.cuda.launches import Extent, Generated, Launch, Launches, Persistent

import cuda_emulator
from cuda_emulator import EmulationError

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")

HEAD = 'extern "C" __global__ void __launch_bounds__({bound}) {name}(const int rows, float* out, float* four)'
KERNELS = {
    # each thread reads its left neighbour's shared slot, with and without a barrier between
    "neighbour_synced": (64, """{
    __shared__ float s[64];
    s[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = threadIdx.x > 0 ? s[threadIdx.x - 1] : 0.0f;
}"""),
    "neighbour_unsynced": (64, """{
    __shared__ float s[64];
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = threadIdx.x > 0 ? s[threadIdx.x - 1] : 0.0f;
}"""),
    # each block adds one to what the block before it wrote: a race between blocks
    "prefix_across_blocks": (1, """{
    out[blockIdx.x] = 1.0f + (blockIdx.x > 0 ? out[blockIdx.x - 1] : 0.0f);
}"""),
    # block 0 fills shared memory; the other blocks read it without writing it
    "shared_left_by_another_block": (32, """{
    __shared__ float s[32];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}"""),
    "writes_one_past_the_end": (32, """{
    out[threadIdx.x + 1] = 1.0f;
}"""),
    "reads_one_before_the_start": (32, """{
    out[threadIdx.x] = out[(int)threadIdx.x - 1];
}"""),
    "reads_past_a_small_buffer": (32, """{
    out[threadIdx.x] = four[threadIdx.x];
}"""),
    # half the block returns before the barrier the other half waits at
    "barrier_after_an_early_return": (64, """{
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}"""),
    "barriers_in_both_branches": (64, """{
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}"""),
    "bounded_to_128": (128, """{
    out[threadIdx.x] = 1.0f;
}"""),
}
SOURCE = "\n".join(HEAD.format(bound=bound, name=name) + " " + body for name, (bound, body) in KERNELS.items())


@pytest.fixture(scope="module")
def device(workdir):
    """The runtime's emulated device, each kernel launched with two buffers, `out` and `four`."""
    launches = [Launch(name, (Extent(1),) * 3, bound, "B", (("out", "base"), ("four", "base")))
                for name, (bound, _) in KERNELS.items()]
    return cuda_emulator.EmulatedDevice(Generated(SOURCE, Launches(step=launches)), workdir)


def launch(device, name, blocks, threads, n, seed):
    """`out` (n floats, NaN) after the kernel ran over `blocks` blocks of `threads`
    (`four` holds 4 zeros), ordered by `seed`."""
    device.random = random.Random(seed)
    out, out_pool = device.alloc(4 * n)
    four, four_pool = device.alloc(4 * 4)
    device.htod(four, np.zeros(4, np.float32))
    device.launch(name, (blocks, 1, 1), threads, packed(1, [out, four]))
    got = np.empty(n, np.float32)
    device.dtoh(got, out)
    return got


SEEDS = range(6)


def test_a_read_of_another_threads_write_needs_a_barrier(device):
    """In index order the left neighbour always ran first; in random orders it
    has not, and its slot is still NaN."""
    want = np.maximum(np.arange(64) - 1, 0).astype(np.float32)
    for seed in SEEDS:
        np.testing.assert_array_equal(launch(device, "neighbour_synced", 1, 64, 64, seed), want)
    assert all(np.isnan(launch(device, "neighbour_unsynced", 1, 64, 64, seed)).any() for seed in SEEDS)


def test_blocks_run_in_a_random_order(device):
    """In order the blocks would count 1, 2, 3, ...; a race between blocks shows."""
    results = {tuple(launch(device, "prefix_across_blocks", 16, 1, 16, seed)) for seed in SEEDS}
    assert len(results) > 1
    assert tuple(np.arange(1, 17, dtype=np.float32)) not in results


def test_shared_memory_is_nan_at_every_block_start(device):
    """Shared memory is the block's own: what block 0 wrote is gone for the others."""
    for seed in SEEDS:
        out = launch(device, "shared_left_by_another_block", 4, 32, 128, seed)
        assert (out[:32] == 1).all() and np.isnan(out[32:]).all()


def test_a_write_outside_a_buffer_is_an_error(device):
    with pytest.raises(EmulationError, match=r"writes_one_past_the_end: wrote byte 128 of an allocation of "
                                             r"128 bytes \(buffer out\): out of bounds"):
        launch(device, "writes_one_past_the_end", 1, 32, 32, 0)


def test_a_read_outside_a_buffer_reads_nan(device):
    """The guard zones are NaN, like memory nobody wrote: what a read outside
    a buffer computes shows."""
    got = launch(device, "reads_one_before_the_start", 1, 32, 32, 0)
    assert np.isnan(got).any()
    past = launch(device, "reads_past_a_small_buffer", 1, 32, 32, 0)
    assert (past[:4] == 0).all() and np.isnan(past[4:]).all()


@pytest.mark.parametrize("name, words", [
    ("barrier_after_an_early_return", r"32 threads exited while 32 wait at the __syncthreads of line \d+"),
    ("barriers_in_both_branches", r"threads wait at the __syncthreads of lines \d+ and \d+ at once"),
])
def test_a_barrier_in_divergent_code_is_an_error(device, name, words):
    with pytest.raises(EmulationError, match=rf"{name}: block \(0, 0, 0\): {words}"):
        launch(device, name, 1, 64, 64, 0)


def test_a_block_larger_than_the_launch_bounds_is_an_error(device):
    assert (launch(device, "bounded_to_128", 1, 128, 128, 0) == 1).all()
    with pytest.raises(EmulationError, match=r"bounded_to_128: a block of 256 threads.*at most 128"):
        launch(device, "bounded_to_128", 1, 256, 256, 0)


# persistent kernels: their blocks run together and meet at grid barriers (templates/intrinsics.cu)
# three rounds: each block's value is one more than the sum of all blocks' values of the round
# before, which a grid barrier between rounds makes sure are written (G blocks: 1, G + 1, G^2 + G + 1)
ROUNDS = """{
    for (int r = 0; r < 3; ++r) {
        if (threadIdx.x == 0) {
            float sum = 0.0f;
            for (unsigned b = 0; r > 0 && b < gridDim.x; ++b) sum += out[(r - 1) * gridDim.x + b];
            out[r * gridDim.x + blockIdx.x] = sum + 1.0f;
        }
        BARRIER;
    }
}"""
GRID_KERNELS = {
    "rounds_with_barriers": ROUNDS.replace("BARRIER", "rnnc_grid_barrier(reinterpret_cast<unsigned*>(four))"),
    "rounds_without_barriers": ROUNDS.replace("BARRIER", "__syncthreads()"),
    # block 0 leaves before the barrier the others wait at
    "barrier_one_block_skips": """{
    if (blockIdx.x == 0) return;
    rnnc_grid_barrier(reinterpret_cast<unsigned*>(four));
    out[blockIdx.x] = 1.0f;
}""",
}


@pytest.fixture(scope="module")
def grid_device(workdir):
    """The emulated device with GRID_KERNELS as persistent kernels (their blocks run together)."""
    launches = Launches(step=[Launch(name, (Extent(1),) * 3, 64, "B", (("out", "base"), ("four", "base")))
                              for name in GRID_KERNELS],
                        persistent={name: Persistent(name, 64, 0) for name in GRID_KERNELS})
    source = intrinsics() + "\n".join(HEAD.format(bound=64, name=name) + " " + body
                                      for name, body in GRID_KERNELS.items())
    return cuda_emulator.EmulatedDevice(Generated(source, launches), workdir)


def test_a_grid_barrier_makes_every_blocks_writes_visible_to_all(grid_device):
    """The barrier's counters (`four` as two zeroed words) serve all three rounds: a
    block already at the next barrier is not taken for one still at this one."""
    G = 5
    want = np.repeat(np.array([1, G + 1, G * (G + 1) + 1], np.float32), G)
    for seed in SEEDS:
        np.testing.assert_array_equal(launch(grid_device, "rounds_with_barriers", G, 64, 3 * G, seed), want)
    assert all(np.isnan(launch(grid_device, "rounds_without_barriers", G, 64, 3 * G, seed)).any() for seed in SEEDS)


def test_a_grid_barrier_some_block_never_reaches_is_a_deadlock(grid_device):
    with pytest.raises(EmulationError, match=r"barrier_one_block_skips: .*spin at a grid barrier that the other "
                                             r"blocks never reach \(a deadlock\)"):
        launch(grid_device, "barrier_one_block_skips", 3, 64, 3, 0)
