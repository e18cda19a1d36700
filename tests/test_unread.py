"""Cells whose regions leave a value unread: a state its step never reads
(`next h = x @ W`), a state that is an input as it is, states read only by
each other, inputs, contexts and params no region reads. Both backends run
them under every policy and a memory budget, with lengths and NaN in the
padding, against finite differences (NumPy, float64) and the NumPy
reference (CUDA on the emulation); what they hold is what the plan says."""
from __future__ import annotations

import numpy as np
import pytest

from rnnc.gradcheck import gradcheck, random_arguments

import cuda_cases as cases
import cuda_emulator
import new_cells
from new_cells import LENGTHS, LENGTHS_B, LENGTHS_T, UNREAD_CELLS

POLICIES = ("none", "auto", "all", "budget")
# what no region of each cell reads, by kind
UNREAD_ARGUMENTS = {"unused_declarations": {"inputs": ("z",), "contexts": ("unused",), "params": ("spare",)}}


def compile_cell(name: str, policy: str, dtype: str = "float64"):
    return new_cells.compile_cell(UNREAD_CELLS[name], policy, dtype)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(UNREAD_CELLS))
def test_numpy_gradients_match_finite_differences(name, policy):
    program = compile_cell(name, policy)
    module = program.load(dtype="float64")
    report = gradcheck(module, T=4, B=3, seed=2, with_lengths=True)
    assert report.worst < 1e-6, report.format()
    args = {**random_arguments(module, LENGTHS_T, LENGTHS_B, seed=1), "lengths": LENGTHS}
    res = module.forward(**args)
    grads = module.backward(res, {k: np.ones_like(v) for k, v in res.outputs.items()})
    plan = program.plan
    assert (res.stored_bytes, grads.peak_bytes) == (plan.stored_bytes(LENGTHS_T, LENGTHS_B, "float64"),
                                                    plan.peak_bytes(LENGTHS_T, LENGTHS_B, "float64"))
    # every argument gets a gradient of its own shape; what no region reads, a zero one
    for kind in ("inputs", "contexts", "params"):
        got = getattr(grads, kind)
        assert {k: np.shape(v) for k, v in got.items()} == {k: np.shape(v) for k, v in args[kind].items()}
        for name_ in UNREAD_ARGUMENTS.get(name, {}).get(kind, ()):
            assert not got[name_].any(), f"{kind} {name_}"


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
@pytest.mark.parametrize("policy", ["auto", "budget"])
@pytest.mark.parametrize("name", list(UNREAD_CELLS))
def test_cuda_equals_numpy_reference(name, policy, workdir):
    program = compile_cell(name, policy, "float32")
    module, _ = cuda_emulator.emulated(program, workdir)
    args = cases.arguments(program, steps=LENGTHS_T, batch=LENGTHS_B)
    for lengths in (None, LENGTHS):
        given = args if lengths is None else new_cells.fill_padding(args, lengths, np.nan)
        bad = cases.mismatches(cases.run(module, given, lengths), cases.reference(program, given, lengths))
        assert not bad, f"lengths={lengths}: relative errors {bad}"
    plan = program.plan
    assert cases.held_bytes(module, args, LENGTHS) == (plan.stored_bytes(LENGTHS_T, LENGTHS_B),
                                                       plan.peak_bytes(LENGTHS_T, LENGTHS_B))
    forward = {k: args[k] for k in ("inputs", "states", "contexts", "params")}
    inferred, trained = module.forward(**forward, train=False), module.forward(**forward)
    for name_, array in trained.outputs.items():
        np.testing.assert_array_equal(inferred.outputs[name_], array)
