"""The CUDA backend end to end without a GPU: the generated kernels, compiled
by g++ against a CPU emulation of CUDA (tests/cuda_emulator.py), run by the
real runtime's host loop, equal the float64 NumPy reference.

Every example runs under every policy, with and without lengths, its steps
in persistent kernels (a launch runs all the steps of a forward, a replay or
a backward; the emulation runs its blocks together, meeting at grid
barriers) and, under one policy, launch by launch, at both precisions: fp32 (exact products on CUDA cores) and tf32 (tensor-core `mma`,
emulated as a warp-wide instruction in the PTX ISA's fragment layout). The
reference rounds product inputs as the precision says and the tolerance is
derived from it (`cuda_cases.tolerance`): under tf32 the kernels agree with
the rounded reference as closely as fp32 kernels agree with the exact one,
give or take one TF32 rounding, while the unrounded reference is several
TF32 roundings away (test_tf32_is_not_exact).

The emulation runs blocks and threads in seeded random orders, with NaN in
memory nobody wrote and guard zones around every buffer (see cuda_emulator.py).
What it cannot check: PyCUDA itself, threads of a block interleaving between
two barriers (each runs alone from one to the next) and timing
(tests/test_cuda_gpu.py does, on a GPU).
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnc
from rnnc.backends.cuda.lowering import generate

import cuda_cases as cases
import cuda_emulator
import new_cells
from cuda_emulator import emulated
from conftest import EXAMPLES, example

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")

# names reserved in C, C++ and CUDA, and ones that look like our own C names
KEYWORD_CELL = """
cell kw {
    dim D, H
    input int[D]
    state float[H], threadIdx[H]
    param W[D, H], U[H, H], b[H] = 0
    blockIdx = int @ W + float @ U + b
    v_float = tanh(blockIdx) * sigmoid(threadIdx)
    next float = v_float
    next threadIdx = threadIdx + blockIdx
    output y = v_float
}
"""


@pytest.fixture(scope="module")
def every_example_built(workdir):
    """The emulation of every example under every policy and precision, built up front."""
    cuda_emulator.build_all([(cases.compile_example(path, policy), precision) for path in EXAMPLES
                             for policy in cases.POLICIES for precision in cases.PRECISIONS_RUN], workdir)


@pytest.mark.parametrize("seed", cuda_emulator.SEEDS)
@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
@pytest.mark.parametrize("policy", cases.POLICIES)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_equals_numpy_reference(path, policy, precision, seed, workdir, every_example_built):
    """Under every seed: blocks and threads in other orders, so a missing
    barrier or a race between blocks cannot pass by luck."""
    program = cases.compile_example(path, policy)
    module, device = emulated(program, workdir, precision, seed)
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args, precision)
    assert {"rnnc_step_persistent", "rnnc_backward_step_persistent"} <= set(device.launched)
    plan = program.plan
    assert cases.held_bytes(module, args, None) == (plan.stored_bytes(cases.T, cases.B), plan.peak_bytes(cases.T, cases.B))


@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_launch_by_launch_equal_numpy_reference(path, precision, workdir, every_example_built):
    """The per-step form, the persistent kernels' fallback: the same kernels,
    each step's launched one by one."""
    program = cases.compile_example(path, "auto")
    module, device = emulated(program, workdir, precision, persistent=False)
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args, precision)
    assert not any(kernel.endswith("_persistent") for kernel in device.launched)


@pytest.fixture(scope="module")
def every_example_built_in_16_bits(workdir):
    cuda_emulator.build_all([(cases.compile_example(path, policy), None, dtype) for path in EXAMPLES
                             for policy in cases.POLICIES for dtype in cases.DTYPES_RUN], workdir)


@pytest.mark.parametrize("dtype", cases.DTYPES_RUN)
@pytest.mark.parametrize("policy", cases.POLICIES)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_in_16_bits_equals_numpy_reference(path, policy, dtype, workdir, every_example_built_in_16_bits):
    """bfloat16 and float16 arrays: the kernels against the NumPy module of the
    same dtype, which rounds where they round (tolerance: cases.dtype_tolerance),
    and the bytes the runtime holds are the plan's for that dtype. One seed:
    the orders the seeds vary are the float32 test's above, the same kernels
    but for their element types."""
    program = cases.compile_example(path, policy)
    module, _ = emulated(program, workdir, dtype=dtype)
    args = cases.in_dtype(cases.arguments(program), dtype)
    reference = program.load("numpy", dtype)
    for lengths in (None, cases.LENGTHS):
        got, want = cases.run(module, args, lengths), cases.run(reference, args, lengths)
        assert {k: a.dtype for k, a in got.items()} == {k: a.dtype for k, a in want.items()}
        bad = cases.mismatches(cases.as_float64(got), cases.as_float64(want), cases.dtype_tolerance(dtype))
        assert not bad, f"lengths={lengths}: relative errors {bad}"
    plan = program.plan
    assert cases.held_bytes(module, args, None) == (plan.stored_bytes(cases.T, cases.B, dtype),
                                              plan.peak_bytes(cases.T, cases.B, dtype))


@pytest.mark.parametrize("dtype", cases.DTYPES_RUN)
def test_16_bits_are_not_float32(dtype, workdir):
    """16-bit kernels are far from the float64 reference on the same (rounded)
    arguments: the roundings the test above allows for are really done."""
    program = cases.compile_example(example("attention_lstm"), "auto")
    module, _ = emulated(program, workdir, dtype=dtype)
    args = cases.in_dtype(cases.arguments(program), dtype)
    got = cases.as_float64(cases.run(module, args, cases.LENGTHS))
    exact = cases.reference(program, cases.in_dtype(args, "float32"), cases.LENGTHS)
    assert cases.mismatches(got, exact, 3 * cases.dtype_tolerance(dtype))


def test_16_bit_modules_say_they_take_numpy_arrays(workdir):
    program = cases.compile_example(example("gru"), "none")
    module, _ = emulated(program, workdir, dtype="float16")
    args = cases.in_dtype(cases.arguments(program), "float16")
    with pytest.raises(ValueError, match=r"params\['U'\]: a device array, but .* float16 modules take NumPy"):
        module.forward(inputs=args["inputs"], params={**args["params"], "U": cuda_emulator.HostArray(args["params"]["U"])})


@pytest.mark.parametrize("path", [example("lstm"), example("attention_lstm")], ids=lambda p: p.stem)
def test_tf32_is_not_exact(path, workdir):
    """tf32 kernels are far from the exact reference: the rounding the test
    above allows for is really done."""
    program = cases.compile_example(path, "auto")
    module, _ = emulated(program, workdir, "tf32")
    args = cases.arguments(program)
    got, exact = cases.run(module, args, cases.LENGTHS), cases.reference(program, args, cases.LENGTHS)
    assert cases.mismatches(got, exact, 3 * cases.tolerance("fp32"))


@pytest.mark.parametrize("path, names", [("lstm", "c_new"), ("attention_lstm", "alpha,h_new")])
def test_manual_recompute_lists(path, names, workdir):
    program = cases.compile_example(example(path), names)
    assert {n.out for n in program.plan.recompute} >= set(names.split(","))
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)
    assert not cases.mismatches(cases.run(module, args, cases.LENGTHS), cases.reference(program, args, cases.LENGTHS))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_checkpointed_plans_equal_numpy_reference(path, workdir):
    """A memory budget: the forward keeps states at segment starts, the backward
    replays each segment; twice on one forward result gives the same gradients;
    the device buffers the runtime holds are the bytes the plan predicts, for
    the sequence the budget is for and a shorter one."""
    steps, batch = 9, 3
    roomy = cases.compile_example(path, "none").plan.peak_bytes(steps, batch)
    program = rnnc.compile(path, dims=cases.dims_of(path), memory_budget=roomy // 2, seq_len=steps, batch=batch)
    assert len(program.plan.segments) > 1
    module, _ = emulated(program, workdir)
    args = cases.arguments(program, steps=steps, batch=batch)
    lengths = np.array([9, 4, 0])
    got = cases.run(module, args, lengths)
    assert not cases.mismatches(got, cases.reference(program, args, lengths))
    res = module.forward(**{k: args[k] for k in ("inputs", "states", "contexts", "params")}, lengths=lengths)
    first, again = (module.backward(res, args["d_outputs"], args["d_states"]) for _ in range(2))
    for name, grad in first.params.items():
        np.testing.assert_array_equal(again.params[name], grad, err_msg=name)
    plan = program.plan
    assert (res.stored_bytes, first.peak_bytes) == (plan.stored_bytes(steps, batch), plan.peak_bytes(steps, batch))
    assert again.peak_bytes == first.peak_bytes <= plan.budget
    shorter = cases.arguments(program, steps=5, batch=batch)
    assert cases.held_bytes(module, shorter, lengths.clip(0, 5)) == (plan.stored_bytes(5, batch), plan.peak_bytes(5, batch))


def test_user_names_reserved_in_c_and_cuda(workdir):
    program = rnnc.compile(KEYWORD_CELL, dims={"D": 3, "H": 5}, recompute="none")
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)
    got = cases.run(module, args, cases.LENGTHS)
    assert not cases.mismatches(got, cases.reference(program, args, cases.LENGTHS))


# a scalar gain (its gradient: one sum over the batch and H), a layer norm
# (per-example means over H) and a bias (sums over the batch, side by side)
REDUCTIONS_CELL = """
cell normed {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H], U[H, H], b[H] = 0, s[1] = 0.5
    a = s * (x @ W + h @ U) + b
    centred = a - mean(a, axis=-1, keepdims=1)
    h_new = tanh(centred / sqrt(mean(centred * centred, axis=-1, keepdims=1) + 1e-3))
    next h = h_new
    output y = h_new
}
"""


WARP, SIDE_BY_SIDE, BLOCK = "a warp per output", "8 outputs side by side", "the whole block per output"


@pytest.mark.parametrize("dims, layouts", [({"D": 3, "H": 5}, {WARP, BLOCK}),  # db: 5 outputs, a block each
                                           ({"D": 9, "H": 300}, {WARP, SIDE_BY_SIDE, BLOCK})],
                         ids=["H5", "H300"])
def test_reductions_of_every_layout(dims, layouts, workdir):
    """Each of reduce.cu.j2's ways to share out a sum among threads, with sums
    shorter than a warp and longer than a block."""
    program = rnnc.compile(REDUCTIONS_CELL, dims=dims, recompute="none")
    source = generate(program).source
    assert {layout for layout in (WARP, SIDE_BY_SIDE, BLOCK) if layout in source} == layouts
    module, _ = emulated(program, workdir)
    args = cases.arguments(program, steps=3, batch=37)
    lengths = np.random.default_rng(3).integers(0, 4, size=37)
    assert not cases.mismatches(cases.run(module, args, lengths), cases.reference(program, args, lengths))


@pytest.mark.parametrize("seed", cuda_emulator.SEEDS)
@pytest.mark.parametrize("name", list(new_cells.CELLS))
def test_new_cells_equal_numpy_reference(name, seed, workdir):
    program = rnnc.compile(new_cells.CELLS[name], dims=new_cells.DIMS, recompute="auto")
    module, _ = emulated(program, workdir, seed=seed)
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args)


@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
@pytest.mark.parametrize("policy", cases.POLICIES)
def test_launches_of_several_kernels_equal_numpy_reference(policy, precision, workdir):
    """A cell whose kernels share launches every way the lowering shares them
    (a product going on with the phase that reads it, kernels side by side,
    runs of per-example work with a block per example, per-example products
    on tensor cores among them under tf32), with and without lengths."""
    program = rnnc.compile(new_cells.PER_EXAMPLE, dims=new_cells.PER_EXAMPLE_DIMS, recompute=policy)
    kinds = {launch.kernel.rsplit("_", 1)[1] for launch in generate(program, precision).launches.launches()}
    assert {"rows", "fused"} <= kinds  # the cell exercises what it is here for
    module, _ = emulated(program, workdir, precision)
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args, precision)


def test_scalar_params_as_numpy_scalars_and_device_arrays(workdir):
    program = rnnc.compile(new_cells.SCALAR_PARAMS, dims=new_cells.DIMS, recompute="none")
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)
    assert isinstance(args["params"]["a"], np.float32)  # what the helper's arithmetic gives
    want = cases.reference(program, args, None)
    assert not cases.mismatches(cases.run(module, args, None), want)
    got = cases.run(module, args, None, to_array=cuda_emulator.HostArray, to_numpy=lambda a: a.array)
    assert got["grad params a"].shape == ()
    assert not cases.mismatches(got, want)


def test_device_arrays_in_give_device_arrays_out(workdir):
    program = cases.compile_example(example("lstm"), "auto")
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)

    def unwrap(array):
        assert isinstance(array, cuda_emulator.HostArray), type(array)
        return array.array
    got = cases.run(module, args, None, to_array=cuda_emulator.HostArray, to_numpy=unwrap)
    assert not cases.mismatches(got, cases.run(module, args, None))


@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
def test_sizes_past_one_tile_and_one_block(precision, workdir):
    assert not cases.large_lstm_mismatches(lambda program: emulated(program, workdir, precision)[0], precision)


def test_inference_keeps_nothing_and_refuses_backward(workdir):
    program = cases.compile_example(example("gru"), "none")
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)
    forward = {k: args[k] for k in ("inputs", "states", "contexts", "params")}
    trained, inferred = module.forward(**forward), module.forward(**forward, train=False)
    assert inferred.stored_bytes == 0 < trained.stored_bytes
    np.testing.assert_array_equal(inferred.outputs["y"], trained.outputs["y"])
    np.testing.assert_array_equal(inferred.states["h"], trained.states["h"])
    with pytest.raises(ValueError, match="train=False"):
        module.backward(inferred)


def test_parameter_gradient_products_run_after_the_loop(workdir):
    """dU of the LSTM is one product over all T*B rows, not one per step, and
    db one sum, side by side in one launch (launched step by step, to count)."""
    program = cases.compile_example(example("lstm"), "auto")
    module, device = emulated(program, workdir, persistent=False)
    args = cases.arguments(program)
    cases.run(module, args, None)
    per_step = [k for k in device.launched if k.startswith("rnnc_bwd_")]
    after = [k for k in device.launched if k.startswith("rnnc_dgrad_")]
    assert len(after) == 1
    (launch,) = [launch for launch in module.executor.launches.param_grads if launch.kernel == after[0]]
    assert len(launch.parts) == 2  # dU and db
    assert per_step and len(per_step) % cases.T == 0


def test_wrong_arguments_are_value_errors_naming_them(workdir):
    program = cases.compile_example(example("lstm"), "auto")
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)
    with pytest.raises(ValueError, match=r"inputs\['x'\].*float64"):
        module.forward(inputs={"x": args["inputs"]["x"].astype(np.float64)}, params=args["params"])
    with pytest.raises(ValueError, match=r"params\['W'\]: expected shape"):
        module.forward(inputs=args["inputs"], params={**args["params"], "W": args["params"]["U"]})


@pytest.mark.parametrize("name", ["sum", "statements", "minus", "calls", "parens"])
def test_deep_cells_lower_to_cuda_and_the_nested_ones_run(name, workdir):
    """The code generator inlines a fused chain without recursion: 10,000 terms
    or statements and 1,000 levels of nesting lower to CUDA; the nested ones
    (small kernels) also run, and equal the NumPy reference."""
    deep, _ = new_cells.deep_pairs()[name]
    program = rnnc.compile(deep, dims={"D": 3, "H": 2})
    if name in ("sum", "statements"):
        assert "rnnc_step_" in generate(program).source
        return
    module, _ = emulated(program, workdir)
    args = cases.arguments(program)
    assert not cases.mismatches(cases.run(module, args, cases.LENGTHS), cases.reference(program, args, cases.LENGTHS))
@pytest.mark.parametrize("name, policy", [("norm", "auto"), ("norm", "budget"), ("shared", "auto"),
                                          ("chain", "none"), ("chain", "budget")])
def test_written_cells_with_nan_padding_equal_numpy_reference(name, policy, workdir):
    """A normalisation that is 0/0 on zero padding, step results of params alone
    (`output pb = b`, `next s = a`) and chains of once-per-sequence values, with
    NaN in the padding of the inputs and of the output cotangents."""
    program = new_cells.compile_cell(new_cells.LENGTHS_CELLS[name], policy, "float32")
    module, _ = emulated(program, workdir)
    T, B, lengths = new_cells.LENGTHS_T, new_cells.LENGTHS_B, new_cells.LENGTHS
    args = new_cells.fill_padding(cases.arguments(program, steps=T, batch=B), lengths, np.nan)
    got = cases.run(module, args, lengths)
    assert not cases.mismatches(got, cases.reference(program, args, lengths))
    assert cases.held_bytes(module, args, lengths) == (program.plan.stored_bytes(T, B), program.plan.peak_bytes(T, B))
