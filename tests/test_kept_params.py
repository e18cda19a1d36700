"""Recurrent weights kept on chip: a persistent kernel's product whose B
operand is a param copies each block's slice of it into shared memory once,
at the first step, and multiplies it from there at every later step, for as
long as the block keeps the same tile (templates/contract.cu.j2, `kept`).

The emulator counts the bytes kernels copy from the param's device buffer
(`EmulatedDevice.watch`). The expected counts are worked from the tiles, not
read off the program: the LSTM at H=40 multiplies h [B, 40] by U [40, 160]
in 32x32 tiles, one tile of rows (B=3) and 5 of columns, each column tile
needing 32 of U's columns (the four gates of 8 hidden units), a fifth of
U; the backward multiplies its
gate cotangents [B, 160] by U's transpose, in 2 tiles of columns, each
needing the rows of U of its 32 (or 8) hidden units. So a tile's slice
comes from global memory once per call when every tile has a block of its
own, once per step launch by launch, and, on a grid of 3 blocks for the 5
forward tiles, once per step for the 4 tiles that share a block (blocks 0
and 1 take tiles 0, 3 and 1, 4, so they copy again at every step) and once
in all for tile 2.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnc
from rnnc.backends.cuda.kernels import KEPT_SHARED
from rnnc.backends.cuda.lowering import generate

import cuda_cases as cases
import cuda_emulator
from conftest import example

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")

DIMS = {"D": 8, "H": 40}
COLUMN_TILES = 5  # of the forward product: 160 columns of U, 32 a tile


def lstm(workdir, **options):
    """The emulated LSTM at DIMS storing everything (no replays) and its U, whose
    device buffer the device watches from the moment U is copied into it."""
    program = rnnc.compile(example("lstm"), dims=DIMS, recompute="none")
    module, device = cuda_emulator.emulated(program, workdir, **options)
    return program, module, device


def watch_param(device, param: np.ndarray) -> dict:
    """Watch the device buffer `param` is copied into; its address, once copied, in the result."""
    at, upload = {}, device.htod

    def htod(ptr, array):
        upload(ptr, array)
        if array.shape == param.shape and np.array_equal(array, param):
            at["ptr"] = ptr
            device.watch(ptr, array.nbytes)
    device.htod = htod
    return at


def bytes_read_from_u(workdir, steps: int, **options) -> tuple:
    """(bytes of U, bytes copied from U by the forward, by the backward) of one call of `steps` steps."""
    program, module, device = lstm(workdir, **options)
    args = cases.arguments(program, steps=steps)
    u = args["params"]["U"]
    at = watch_param(device, u)
    result = module.forward(inputs=args["inputs"], states=args["states"], params=args["params"])
    forward = device.watched()
    device.watch(at["ptr"], u.nbytes)
    module.backward(result, args["d_outputs"], args["d_states"])
    return u.nbytes, forward, device.watched()


@pytest.mark.parametrize("steps", [2, 5])
def test_a_grid_with_a_block_per_tile_reads_the_weights_once_a_call(steps, workdir):
    u, forward, backward = bytes_read_from_u(workdir, steps, co_resident=16)
    assert (forward, backward) == (u, u)


@pytest.mark.parametrize("steps", [2, 5])
def test_launch_by_launch_reads_the_weights_every_step(steps, workdir):
    u, forward, backward = bytes_read_from_u(workdir, steps, persistent=False)
    assert (forward, backward) == (steps * u, steps * u)


@pytest.mark.parametrize("steps", [2, 5])
def test_a_block_with_two_tiles_copies_its_slices_at_every_step(steps, workdir):
    u, forward, _ = bytes_read_from_u(workdir, steps, co_resident=3)
    tile = u // COLUMN_TILES
    assert forward == tile * ((COLUMN_TILES - 1) * steps + 1)


@pytest.mark.parametrize("co_resident", [3, 16])
def test_kept_weights_give_the_reference_results(co_resident, workdir):
    program, module, _ = lstm(workdir, co_resident=co_resident)
    cases.assert_equals_reference(module, program, cases.arguments(program))


def test_the_schedule_says_which_products_keep_their_weights():
    launches = generate(rnnc.compile(example("lstm"), dims=DIMS)).launches
    (product,) = launches.step  # h U and the gates' elementwise work
    assert launches.persistent["step"].kept == (product.kernel,)
    assert f"params kept in shared memory across steps by {product.kernel}" in launches.forms()


def test_weights_past_the_room_left_are_read_from_l2_and_the_schedule_says_so():
    """The attention LSTM at H=512, E=256: `concat(h, ctx) @ U` would keep a 768x32 slice
    of U a block (96 KB, with the kernels' pool past the 113 KB a block may keep), so it
    reads U from L2; the smaller attention product keeps its weights."""
    program = rnnc.compile(example("attention_lstm"), dims={"D": 512, "H": 512, "E": 256, "S": 32})
    launches = generate(program).launches
    step = launches.persistent["step"]
    assert len(step.unkept) == 1 and len(step.kept) == 1 and step.shared <= KEPT_SHARED
    assert f"params read from L2 every step by {step.unkept[0]} (no room left to keep them)" in launches.forms()


# the recurrent weights scaled by a learnt gain: the product's B is a value made of params once
# a sequence (not a param itself), the same at every step, so it is kept too
SCALED_WEIGHTS = """
cell scaled_weights {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H], U[H, H], gain[]
    n = tanh(x @ W + h @ (U * gain))
    next h = n
    output y = n
}
"""


@pytest.mark.parametrize("co_resident", [3, 16])
def test_a_value_made_of_params_is_kept_and_gives_the_reference_results(co_resident, workdir):
    program = rnnc.compile(SCALED_WEIGHTS, dims={"D": 5, "H": 40})
    launches = generate(program).launches
    assert launches.persistent["step"].kept == tuple(launch.kernel for launch in launches.step)
    module, _ = cuda_emulator.emulated(program, workdir, co_resident=co_resident)
    cases.assert_equals_reference(module, program, cases.arguments(program))
