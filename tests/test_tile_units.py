"""The elementwise work that reads a product, run in the product's launch by
the block that made what it reads (`kernels.column_groups`,
`products.ProductKernel.owning`, templates/contract_units.cu.j2).

An LSTM's gates z = x W + h U + b are four groups of H columns, and hidden
unit j reads columns j, j + H, j + 2H and j + 3H of its row: a 32-column tile
of h U that holds those four columns for 8 units (8 of each group) has all
its units need, so its block runs their gates with no other block's results
and nothing to count. Work that reads a row's columns otherwise (the GRU's
three gates, which do not split a 32-column tile evenly; a concatenation
that swaps halves) is run for a tile of rows by the last block to finish
one, counted with tickets (a `rows:` scratch buffer).
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


@pytest.mark.parametrize("name", ["lstm", "peephole_lstm", "zoneout_lstm", "elman"])
def test_gates_run_in_the_block_that_holds_their_columns(name):
    assert step_tickets(rnnc.compile(example(name), dims=DIMS)) == []


def test_three_gates_in_a_tile_of_32_wait_for_the_whole_row():
    assert len(step_tickets(rnnc.compile(example("gru"), dims=DIMS))) == 1


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
def test_swapped_halves_wait_for_the_whole_row_and_equal_the_reference(workdir):
    program = rnnc.compile(SWAPPED_HALVES, dims={"D": 5, "H": 20})
    assert len(step_tickets(program)) == 1
    module, _ = cuda_emulator.emulated(program, workdir)
    cases.assert_equals_reference(module, program, cases.arguments(program))
