"""bfloat16 and float16 modules (rnnc/dtypes.py) on the NumPy backend, the
planner's bytes in them, and the options that choose them. The CUDA kernels in
16 bits against this backend: test_cuda_emulated.py; their SASS: test_cuda_build.py.

The NumPy backend is the kernels' reference, so its rounding points are
checked here against arithmetic written out by hand with ml_dtypes and
NumPy's float16, independent of rnnc's code.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnc
from rnnc.cli import main
from rnnc.dtypes import storage
from rnnc.precision import OF_NARROW
from rnnc.shapes import concrete_shape

from conftest import EXAMPLES, compile_sized, example
from test_precision import PROJECTION

NARROW = ("bfloat16", "float16")


COUNTER = """
cell counter {
    dim H
    input x[H]
    state h[H]
    next h = h + x
    output y = h * 1
}
"""


@pytest.mark.parametrize("dtype", NARROW)
def test_rounding_points_are_products_inputs_stored_values_and_results(dtype):
    """y = x @ W: its inputs in the type, the products exact and summed in
    float32, y an output (rounded where made); the state h sums the rounded
    y's in float32 and is rounded once, when returned."""
    t = storage(dtype)
    program = rnnc.compile(PROJECTION, dims={"D": 40, "H": 7})
    rng = np.random.default_rng(0)
    x, W, h0 = (rng.normal(size=s).astype(t) for s in ((6, 3, 40), (40, 7), (3, 7)))
    res = program.load("numpy", dtype).forward(inputs={"x": x}, params={"W": W}, states={"h": h0})
    y = np.einsum("tbk,kn->tbn", x.astype(np.float32), W.astype(np.float32)).astype(t)
    h = h0.astype(np.float32)
    for step in y:
        h = h + step.astype(np.float32)
    assert res.outputs["y"].dtype == res.states["h"].dtype == t
    np.testing.assert_allclose(res.outputs["y"].astype(np.float32), y.astype(np.float32),
                               rtol=OF_NARROW[dtype].unit_roundoff * 2, atol=0)
    # where a sum order changes y, it moves by one ulp of the type at most; h is that sum, rounded once
    np.testing.assert_allclose(res.states["h"].astype(np.float32), h.astype(t).astype(np.float32),
                               rtol=OF_NARROW[dtype].unit_roundoff * 4, atol=1e-3)


@pytest.mark.parametrize("dtype", NARROW)
def test_states_carried_in_float32_do_not_drift(dtype):
    """1000 steps of h + 0.0002 from 1: in float32 they reach about 1.2; a state
    rounded to 16 bits each step would stay at 1 (1.0002 rounds to 1)."""
    t = storage(dtype)
    program = rnnc.compile(COUNTER, dims={"H": 2})
    x = np.full((1000, 1, 2), 0.0002).astype(t)
    res = program.load("numpy", dtype).forward(inputs={"x": x}, params={}, states={"h": np.ones((1, 2), t)})
    want = 1 + 1000 * float(x[0, 0, 0])
    assert abs(float(res.states["h"][0, 0]) - want) <= 2 * OF_NARROW[dtype].unit_roundoff * want
    assert np.asarray(1 + float(x[0, 0, 0]), t) == 1  # the drift this avoids


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_16_bit_modules_are_close_to_float64_and_hold_what_the_plan_says(path, dtype):
    """Every example's outputs and gradients within a few roundings of the type
    of the float64 answer on the same (rounded) arguments; the bytes measured
    are the plan's for the dtype."""
    program = compile_sized(path, {"D": 3, "H": 5, "E": 4, "S": 6, "P": 2}, recompute="none")
    module = program.load("numpy", dtype)
    args = rnnc_arguments(module)
    lengths = np.array([4, 2, 0])
    res = module.forward(**args, lengths=lengths, seed=1)  # the same masks as the reference's
    grads = module.backward(res, {k: np.ones_like(v) for k, v in res.outputs.items()})
    ref64 = program.load("numpy", "float64")
    wide = {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in args.items()}
    res64 = ref64.forward(**wide, lengths=lengths, seed=1)
    grads64 = ref64.backward(res64, {k: np.ones_like(v) for k, v in res64.outputs.items()})
    for label, got, want in [("outputs", res.outputs, res64.outputs), ("params", grads.params, grads64.params),
                             ("inputs", grads.inputs, grads64.inputs)]:
        for name in want:
            assert got[name].dtype == module.dtype
            scale = max(float(np.abs(want[name]).max()), 1e-30)
            err = float(np.abs(got[name].astype(np.float64) - want[name]).max()) / scale
            # a product of n terms: ~sqrt(n) roundings of the inputs; T=4 steps of elementwise chains on top
            assert err <= 40 * OF_NARROW[dtype].unit_roundoff, (label, name, err)
    T, B = 4, 3
    assert (res.stored_bytes, grads.peak_bytes) == (program.plan.stored_bytes(T, B, dtype),
                                                    program.plan.peak_bytes(T, B, dtype))


def rnnc_arguments(module, T: int = 4, B: int = 3) -> dict:
    from rnnc.gradcheck import random_arguments
    args = random_arguments(module, T=T, B=B, seed=1)
    args.pop("lengths", None)
    return args


def test_planner_bytes_follow_the_dtype():
    """The schedule's bytes by hand: under a 16-bit dtype the hoisted rows, the
    tape's stored values and the rows' cotangents take 2 bytes an element, the
    states (in the tape and the checkpoints) 4; float64 takes 8 throughout."""
    program = compile_sized(example("lstm"), {"D": 3, "H": 5}, recompute="none")
    plan, T, B = program.plan, 7, 2
    values = program.hoisted.values()
    states = {"h", "c"}

    def elements(names):
        return sum(int(np.prod(concrete_shape(values[n].shape))) * B for n in names)
    tape = plan.held["tape"]
    narrow = elements(plan.held["rows"]) + elements([v for v in tape if v not in states])
    wide = elements([v for v in tape if v in states])
    for dtype, size, state_size in (("float32", 4, 4), ("float64", 8, 8), ("bfloat16", 2, 4), ("float16", 2, 4)):
        assert plan.stored_bytes(T, B, dtype) == T * (narrow * size + wide * state_size), dtype
    budget = compile_sized(example("lstm"), {"D": 3, "H": 5}, memory_budget=plan.peak_bytes(T, B, "bfloat16"),
                           seq_len=T, batch=B, dtype="bfloat16").plan
    assert budget.peak_bytes(T, B, "bfloat16") <= plan.peak_bytes(T, B, "bfloat16") < plan.peak_bytes(T, B)


def test_precision_and_dtype_combinations():
    program = rnnc.compile(PROJECTION, dims={"D": 4, "H": 2})
    assert program.load("numpy", "bfloat16").precision is OF_NARROW["bfloat16"]
    assert program.load("numpy", "float16", precision="fp32").precision is OF_NARROW["float16"]
    with pytest.raises(ValueError, match="'tf32' rounds the products of float32 data; bfloat16"):
        program.load("numpy", "bfloat16", precision="tf32")
    with pytest.raises(ValueError, match="'tf32' rounds the products of float32 data; float16"):
        rnnc.compile(PROJECTION, dims={"D": 4, "H": 2}, precision="tf32", dtype="float16")
    with pytest.raises(ValueError, match="dtype: expected one of .* got 'bf16'"):
        rnnc.compile(PROJECTION, dims={"D": 4, "H": 2}, dtype="bf16")
    compiled = rnnc.compile(PROJECTION, dims={"D": 4, "H": 2}, dtype="bfloat16")
    assert compiled.load("numpy").dtype == storage("bfloat16")  # its dtype by default
    module = program.load("numpy", "bfloat16")
    x = np.zeros((2, 1, 4), np.float32)
    with pytest.raises(ValueError, match=r"inputs\['x'\]: dtype float32 but the module's dtype is bfloat16"):
        module.forward(inputs={"x": x}, params=module.init_params())


def test_cli_takes_16_bit_dtypes(capsys):
    assert main(["run", str(example("gru")), "-D", "D=3", "-D", "H=4", "--dtype", "bfloat16"]) == 0
    assert "numpy, bfloat16, bf16" in capsys.readouterr().out
    args = ["plan", str(example("lstm")), "-D", "D=3", "-D", "H=5", "--seq-len", "10", "--batch", "2"]
    assert main(args + ["--dtype", "float16"]) == 0
    assert "float16" in capsys.readouterr().out
    assert main(["run", str(example("gru")), "-D", "D=3", "-D", "H=4", "--dtype", "float16",
                 "--precision", "tf32"]) == 1
    assert "leave precision at 'fp32'" in capsys.readouterr().err
