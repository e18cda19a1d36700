"""Every op of the registry, in every form the checker accepts, through the
CUDA backend on the emulation, against the float64 NumPy reference, forward
and backward, with and without lengths; products at every precision.

The cells come from the registry (tests/op_cases.py), so a new op is run as
soon as it is declared, and an op no cell runs fails here. What one planted
mistake in a CUDA lowering does to these tests, `python tests/mutations.py`
shows, one mistake at a time.
"""
from __future__ import annotations

import pytest

import rnnc
from rnnc.ops import OPS

import cuda_cases as cases
import cuda_emulator
import op_cases

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")

CELLS = op_cases.cells()
# every value recomputed by the backward: each op is lowered in the forward and inlined in the backward too
POLICY = "all"


def program(key: str):
    return rnnc.compile(CELLS[key][0], dims=op_cases.SIZES, recompute=POLICY)


def precisions(key: str) -> tuple:
    """Cells of products run at every precision, the others at the default."""
    return cases.PRECISIONS_RUN if any(OPS[op].rounds_inputs for op in CELLS[key][1]) else ("fp32",)


RUNS = [(key, precision) for key in CELLS for precision in precisions(key)]


def test_every_op_is_run_by_a_cell():
    """Every op a cell writes has forms, and every op, those only the compiler
    makes included, is run by one of the cells, forward or backward."""
    for name in op_cases.language_ops():
        assert op_cases.forms(OPS[name]), f"no form of {name}"
    run = set().union(*(op_cases.ops_run(program(key)) for key in CELLS))
    assert not set(OPS) - run, f"no cell runs {sorted(set(OPS) - run)}"


def test_the_forms_reach_every_argument_kind():
    """Broadcasts, every axis either way, keepdims, each number of parts,
    several arguments of concat, shared and scalar operands and ties."""
    text = "\n".join(text for text, _ in CELLS.values())
    for written in ("sum(h_m, axis=0, keepdims=1)", "softmax(", "axis=-2", "split(", ", 3)", "concat(",
                    "transpose(", " @ ", "max(h_v, h_v)", "relu((", " * 0)", "p_s", "0.5", "* 30)",
                    "dropout(p_", "dropout(e_", "dropout(h_", "variational=1", "zoneout(h_v, x_"):
        assert written in text, written


@pytest.fixture(scope="module")
def built(workdir):
    cuda_emulator.build_all([(program(key), precision) for key, precision in RUNS], workdir)


@pytest.mark.parametrize("key, precision", RUNS, ids=[f"{k}-{p}" for k, p in RUNS])
def test_ops_equal_numpy_reference(key, precision, workdir, built):
    prog = program(key)
    module, _ = cuda_emulator.emulated(prog, workdir, precision)
    args = cases.arguments(prog)
    cases.assert_equals_reference(module, prog, args, precision)
