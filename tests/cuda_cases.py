"""What the CUDA tests share: the cases (every example under every policy)
and the comparison with the float64 NumPy reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import rnnc
from rnnc.backends.args import concrete_shape
from rnnc.dtypes import storage
from rnnc.precision import OF_NARROW, PRECISIONS

from conftest import compile_sized, declared_dims, example

POLICIES = ("none", "auto", "all")
# small dims, all different, so a transposed or swapped index cannot pass by accident
DIMS = {"D": 3, "H": 5, "E": 4, "S": 6, "P": 2}
T, B = 4, 3
LENGTHS = np.array([4, 2, 0])  # full, partial and empty sequences
SEED = 2**40 + 7  # of random draws: both words of the key in use
TOLERANCE = 1e-4  # float32 kernels against the float64 reference, times its largest magnitude, per array
PRECISIONS_RUN = tuple(PRECISIONS)  # fp32 and tf32
DTYPES_RUN = tuple(OF_NARROW)  # bfloat16 and float16


def tolerance(precision: str) -> float:
    """How far the kernels may be from the reference at `precision` (relative
    to the reference's largest magnitude). The reference rounds every product's
    inputs as the kernels do (rnnc.precision), so what is left is float32
    arithmetic (TOLERANCE) and, under a rounding precision, an input that
    float32 and float64 compute a hair apart landing on neighbouring rounded
    values: one unit roundoff of the precision (half an ulp of one input, of
    a term no larger than the output), allowed once."""
    return TOLERANCE + PRECISIONS[precision].unit_roundoff


def dtype_tolerance(dtype: str) -> float:
    """How far the kernels of a 16-bit dtype may be from the NumPy module of
    the same dtype (relative to its largest magnitude). Both round at the
    same points (products' inputs, values kept in 16-bit buffers, results)
    and compute in float32 between them, so what is left is float32
    arithmetic in another order (TOLERANCE) and, where such a difference
    lands a value on the other side of a 16-bit rounding, that value one ulp
    apart: two unit roundoffs of the type (2^-8 for bfloat16, 2^-11 for
    float16), allowed once. (examples/projected_lstm.cell in float16, policy
    all, arguments of seed 1: one element of the gates' gradient apart, in
    g's last unit, moves the gradient of U by 1.4 unit roundoffs of its
    largest magnitude.)"""
    return TOLERANCE + 2 * OF_NARROW[dtype].unit_roundoff


def in_dtype(args: dict, dtype: str) -> dict:
    """The arguments rounded to `dtype` (what a module of it takes)."""
    return {k: {n: np.asarray(a).astype(storage(dtype)) for n, a in v.items()} for k, v in args.items()}


def as_float64(arrays: dict) -> dict:
    return {k: np.asarray(a, np.float64) for k, a in arrays.items()}


def dims_of(path: Path) -> dict:
    return declared_dims(path, DIMS)


def compile_example(path: Path, policy: str):
    return compile_sized(path, DIMS, recompute=policy)


def arguments(program, seed: int = 1, steps: int = T, batch: int = B) -> dict:
    """float32 arguments of forward and backward (params perturbed away from their initial zeros and ones)."""
    rng = np.random.default_rng(seed)
    cell = program.cell

    def draw(lead, d):
        return rng.normal(size=lead + concrete_shape(d.shape)).astype(np.float32)
    params = program.load("numpy", "float32").init_params(0)
    params = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in params.items()}
    outputs = {o: concrete_shape(cell.graph.values()[v].shape) for o, v in cell.outputs}
    return dict(
        inputs={d.name: draw((steps, batch), d) for d in cell.of_kind("input")},
        states={d.name: draw((batch,), d) for d in cell.of_kind("state")},
        contexts={d.name: draw((batch,), d) for d in cell.of_kind("context")},
        params=params,
        d_outputs={o: rng.normal(size=(steps, batch) + s).astype(np.float32) for o, s in outputs.items()},
        d_states={d.name: draw((batch,), d) for d in cell.of_kind("state")})


def run(module, args: dict, lengths, to_array=lambda a: a, to_numpy=np.asarray) -> dict:
    """Every array forward and backward give, by a name like 'grad params W'."""
    forward = {k: {n: to_array(a) for n, a in args[k].items()}
               for k in ("inputs", "states", "contexts", "params")}
    res = module.forward(**forward, lengths=lengths, seed=SEED)
    grads = module.backward(res, {n: to_array(a) for n, a in args["d_outputs"].items()},
                            {n: to_array(a) for n, a in args["d_states"].items()})
    arrays = {f"output {n}": a for n, a in res.outputs.items()}
    arrays.update((f"final state {n}", a) for n, a in res.states.items())
    for kind in ("params", "inputs", "states", "contexts"):
        arrays.update((f"grad {kind} {n}", a) for n, a in getattr(grads, kind).items())
    return {k: to_numpy(a) for k, a in arrays.items()}


def held_bytes(module, args, lengths) -> tuple:
    """(stored, peak) bytes the runtime counts as it makes and frees the schedule's buffers."""
    res = module.forward(**{k: args[k] for k in ("inputs", "states", "contexts", "params")}, lengths=lengths)
    return res.stored_bytes, module.backward(res, args["d_outputs"], args["d_states"]).peak_bytes


def reference(program, args: dict, lengths, precision: str = "fp32") -> dict:
    """The float64 NumPy backend's arrays, products rounded as `precision` says."""
    f64 = {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in args.items()}
    return run(program.load("numpy", "float64", precision), f64, lengths)


def mismatches(got: dict, want: dict, tolerance: float = TOLERANCE) -> dict:
    """Arrays whose max abs error exceeds `tolerance` times the reference's max magnitude."""
    assert got.keys() == want.keys()
    bad = {}
    for name, ref in want.items():
        scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
        err = float(np.abs(np.asarray(got[name], np.float64) - ref).max(initial=0.0))
        if not err <= tolerance * scale:  # NaN fails too
            bad[name] = err / scale
    return bad


def assert_equals_reference(module, program, args: dict, precision: str = "fp32"):
    """Every array `module` gives equals the float64 reference's at the
    tolerance of `precision`, without lengths and with LENGTHS."""
    for lengths in (None, LENGTHS):
        bad = mismatches(run(module, args, lengths), reference(program, args, lengths, precision), tolerance(precision))
        assert not bad, f"lengths={lengths}: relative errors {bad}"


def large_lstm_mismatches(load, precision: str = "fp32") -> dict:
    """An LSTM with sizes past one product tile and one 256-thread block, a
    batch past one tile and a per-step product split along k, run by
    `load(program)`'s module, against the reference at `precision`."""
    program = rnnc.compile(example("lstm"), dims={"D": 70, "H": 97}, recompute="auto")
    steps, batch = 3, 37
    args = arguments(program, steps=steps, batch=batch)
    lengths = np.random.default_rng(2).integers(0, steps + 1, size=batch)
    return mismatches(run(load(program), args, lengths), reference(program, args, lengths, precision),
                      tolerance(precision))
