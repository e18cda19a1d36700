"""The elementwise work that reads a product, run in the product's launch by
the block that made what it reads (`kernels.column_groups`,
`products.ProductKernel.owning`, templates/contract_units.cu.j2).

An LSTM's gates z = x W + h U + b are four groups of H columns, and hidden
unit j reads columns j, j + H, j + 2H and j + 3H of its row: a 32-column tile
of h U that holds those four columns for 8 units (8 of each group) has all
its units need, so its block runs their gates with no other block's results
and nothing to count. The GRU's three gates of 8 units fill 24 columns of a
32-column tile (the other 8 idle: a unit's gates would straddle tiles), so
its tiles number H / 8 where 3H / 32 would do. Work that reads a row's
columns otherwise (a concatenation that swaps halves) is run for a tile of
rows by the last block to finish one, counted with tickets (a `rows:`
scratch buffer).
"""
from __future__ import annotations

import pytest

import rnnc
from rnnc.backends.cuda.lowering import generate

import cuda_cases as cases
import cuda_emulator
from conftest import example

DIMS = {"D": 6, "H": 8}

# the product's two halves swapped before the work reads them: element j < H reads column j + H,
# element j >= H column j - H, which no tile's own columns give it
SWAPPED_HALVES = """
cell swapped_halves {
    dim D, H
    input x[D]
    state h[2*H]
    param W[D, 2*H], U[2*H, 2*H]
    z = x @ W + h @ U
    a, b = split(z, 2)
    n = tanh(concat(b, a))
    next h = n
    output y = n
}
"""


def step_tickets(program) -> list:
    """The tickets buffers of the step's products that run work row by row (`rows:` + kernel)."""
    launches = generate(program).launches
    return [name for name in launches.buffers
            if name.startswith("rows:") and name[len("rows:"):] in {launch.kernel for launch in launches.step}]


@pytest.mark.parametrize("name", ["lstm", "peephole_lstm", "zoneout_lstm", "elman", "milstm", "gru"])
def test_gates_run_in_the_block_that_holds_their_columns(name):
    assert step_tickets(rnnc.compile(example(name), dims=DIMS)) == []


def test_three_gates_of_8_units_a_tile():
    launches = generate(rnnc.compile(example("gru"), dims={"D": 6, "H": 40})).launches
    (product,) = launches.step
    assert product.grid[0].n // product.grid[0].div == 40 // 8  # not 120 / 32 rounded up (4)


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
def test_tiles_with_idle_columns_equal_the_reference(precision, workdir):
    """The GRU at H=37: 5 tiles of 8 units, the last holding 5, each 8 columns idle."""
    program = rnnc.compile(example("gru"), dims={"D": 5, "H": 37})
    module, _ = cuda_emulator.emulated(program, workdir, precision)
    cases.assert_equals_reference(module, program, cases.arguments(program), precision)


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
def test_swapped_halves_wait_for_the_whole_row_and_equal_the_reference(workdir):
    program = rnnc.compile(SWAPPED_HALVES, dims={"D": 5, "H": 20})
    assert len(step_tickets(program)) == 1
    module, _ = cuda_emulator.emulated(program, workdir)
    cases.assert_equals_reference(module, program, cases.arguments(program))
