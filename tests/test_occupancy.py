"""The co-resident capacity a persistent kernel's grid is sized by
(rnnc/backends/cuda/occupancy.py), against cases worked by hand from the
rules of NVIDIA's occupancy calculator: registers go to warps in units of
256, shared memory to blocks in units of 128 bytes plus 1 KB the driver
keeps per block, and a multiprocessor holds at most 2048 threads and 32
blocks."""
from __future__ import annotations

import pytest

from rnnc.backends.cuda.occupancy import GPUS, blocks_per_sm, co_resident, persistent_grid

H100, A100 = GPUS["H100"], GPUS["A100"]


@pytest.mark.parametrize("threads, registers, shared, want", [
    (256, 32, 0, 8),  # 8 warps of 1024 registers: 64 warps fit, and 2048 threads: 8 blocks
    (256, 64, 0, 4),  # 2048 registers a warp: 32 warps, 4 blocks
    (256, 72, 0, 3),  # 2304 a warp: 28 warps, 3 blocks of 8
    (256, 255, 0, 1),  # 8160, given 8192: 8 warps, one block
    (128, 40, 40 * 1024, 5),  # 41 KB a block of 228 KB: 5 (registers would allow 12)
    (64, 16, 0, 32),  # 32 blocks of 2 warps: the block limit
    (1024, 64, 0, 1),  # 64K registers: the whole register file
    (1024, 72, 0, 0),  # more registers than a block may have: it cannot run
])
def test_blocks_per_multiprocessor_of_an_h100(threads, registers, shared, want):
    assert blocks_per_sm(H100, threads, registers, shared) == want


def test_an_a100_holds_less_shared_memory():
    # 49 KB a block (48 KB and the driver's 1 KB): 228 KB hold 4, 164 KB hold 3
    assert blocks_per_sm(H100, 128, 40, 48 * 1024) == 4
    assert blocks_per_sm(A100, 128, 40, 48 * 1024) == 3
    assert co_resident(A100, 128, 40, 48 * 1024) == 3 * 108


def test_shared_memory_past_48_kb_counts_up_to_what_one_block_may_have():
    # 100 KB and the driver's 1 KB a block: 2 fit in 228 KB, 1 in 164 KB; 170 KB: past the
    # A100's 163 KB a block (it cannot run there), one block on an H100
    assert blocks_per_sm(H100, 256, 64, 100 * 1024) == 2
    assert blocks_per_sm(A100, 256, 64, 100 * 1024) == 1
    assert blocks_per_sm(A100, 256, 64, 170 * 1024) == 0
    assert blocks_per_sm(H100, 256, 64, 170 * 1024) == 1


def test_every_gpu_says_where_its_numbers_come_from():
    for gpu in GPUS.values():
        assert gpu.sms > 0 and gpu.shared_per_sm > 0 and "SMs" in gpu.source


def test_the_grid_is_no_larger_than_the_gpu_holds_nor_the_work():
    assert persistent_grid(264, 1000) == 264
    assert persistent_grid(264, 10) == 10
