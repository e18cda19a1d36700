"""Random ops (dropout, zoneout), their counter-based masks and the step index.

Philox4x32-10 is checked against the published known answers (Random123's
kat_vectors), in NumPy and in the C the kernels use; the masks of the NumPy
and the emulated CUDA backends against each other bit for bit; the rates
and the independence of the masks statistically (5 standard deviations);
the expectation forms against cells that write them out; the masks'
memory (none) against the same cell without them."""
from __future__ import annotations

import ctypes
import subprocess
from importlib import resources

import numpy as np
import pytest

import rnnc
from rnnc.gradcheck import gradcheck
from rnnc.ops.random import philox4x32

import cuda_cases as cases
import cuda_emulator
import emulated_intrinsics
from conftest import example

# Random123's kat_vectors, "philox4x32 10": counter (4 words), key (2 words), the output (4 words)
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, want", KNOWN_ANSWERS)
def test_philox_numpy_gives_the_known_answers(counter, key, want):
    got = philox4x32([np.uint32(c) for c in counter], [np.uint32(k) for k in key])
    assert tuple(int(w) for w in got) == want
    # vectorised: the same answers in every position of an array
    arrays = [np.full((3, 2), c, np.uint32) for c in counter]
    assert all((w == v).all() for w, v in zip(philox4x32(arrays, key), want))


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++")
def test_philox_of_the_kernels_gives_the_known_answers(tmp_path):
    """templates/intrinsics.cu's rnnc_philox, built as the emulator builds kernels.cu."""
    source = resources.files("rnnc.templates").joinpath("intrinsics.cu").read_text()
    text = (cuda_emulator.HEADER + emulated_intrinsics.HEADER + source +
            'extern "C" unsigned first_word(unsigned a, unsigned b, unsigned c, unsigned d, unsigned k0, '
            "unsigned k1) { return rnnc_philox(a, b, c, d, k0, k1); }\n")
    (tmp_path / "philox.cpp").write_text(text)
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(tmp_path / "philox.so"), str(tmp_path / "philox.cpp")],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(tmp_path / "philox.so"))
    lib.first_word.restype = ctypes.c_uint
    lib.first_word.argtypes = [ctypes.c_uint] * 6
    for counter, key, want in KNOWN_ANSWERS:
        assert lib.first_word(*counter, *key) == want[0]


# Every kind of draw, each as an output that shows its mask: 0 where dropped
# (else 1 / (1 - p)), and zoneout's choice (1 where it kept the old value).
MASKS = """
cell masks {
    dim H
    input x[H]
    context e[H]
    state h[H]
    param w[H]
    step t
    next h = zoneout(x * 0 + t + 2, h * 0 - 1, 0.3)
    output per_step = dropout(x * 0 + 1, 0.4)
    output variational = dropout(x * 0 + 1, 0.4, variational=1)
    output per_sequence = dropout(e * 0 + 1, 0.5) + x * 0
    output per_batch = dropout(w * 0 + 1, 0.25) + x * 0
    output kept_old = zoneout(x * 0, x * 0 + 1, 0.3)
    output second_site = dropout(x * 0 + 1, 0.4)
}
"""


def compile_with(cell, dims: dict, plan: str, T: int, B: int, dtype: str):
    """A program of `cell` under a per-step policy, or "budget": half of what
    `none` holds at most, for T steps of batch B (so some segment is replayed)."""
    if plan != "budget":
        return rnnc.compile(cell, dims=dims, recompute=plan)
    peak = rnnc.compile(cell, dims=dims, recompute="none").plan.peak_bytes(T, B, dtype)
    prog = rnnc.compile(cell, dims=dims, memory_budget=peak // 2, seq_len=T, batch=B, dtype=dtype)
    assert len(prog.plan.segments_for(T)) > 1
    return prog


def mask_outputs(module, T, B, H, seed, lengths=None, **options):
    rng = np.random.default_rng(0)
    dtype = module.dtype
    res = module.forward({"x": rng.normal(size=(T, B, H)).astype(dtype)}, {"w": np.ones(H, dtype)},
                         contexts={"e": rng.normal(size=(B, H)).astype(dtype)}, lengths=lengths, seed=seed,
                         **options)
    return res


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
@pytest.mark.parametrize("policy", ["none", "all", "budget"])
def test_masks_equal_bit_for_bit_on_both_backends(policy, workdir):
    """The emulated kernels draw exactly the NumPy backend's masks, forward and
    in the backward (whose cotangents are masked by them too), under every plan."""
    H, T, B = 5, 4, 3
    prog = compile_with(MASKS, {"H": H}, policy, T, B, "float32")
    module, _ = cuda_emulator.emulated(prog, workdir)
    reference = prog.load("numpy", "float32")
    for seed in (0, 2**63 + 5):
        got = mask_outputs(module, T, B, H, seed)
        want = mask_outputs(reference, T, B, H, seed)
        for name in want.outputs:
            assert np.array_equal(got.outputs[name] == 0, want.outputs[name] == 0), name
        assert np.array_equal(got.states["h"], want.states["h"])
        d_out = {k: np.ones_like(v) for k, v in want.outputs.items()}
        g_got, g_want = module.backward(got, d_out), reference.backward(want, d_out)
        assert np.array_equal(g_got.states["h"] == 0, g_want.states["h"] == 0)
    # a plain forward: every output of the cell on both backends, and its gradients
    args = cases.arguments(prog)
    bad = cases.mismatches(cases.run(module, args, cases.LENGTHS), cases.reference(prog, args, cases.LENGTHS))
    assert not bad


def test_what_each_mask_is_drawn_once_per():
    H, T, B = 64, 6, 5
    res = mask_outputs(rnnc.compile(MASKS, dims={"H": H}).load(), T, B, H, seed=7)
    kept = {name: a != 0 for name, a in res.outputs.items()}
    same_steps = [np.array_equal(kept[n][0], kept[n][t]) for n in kept for t in range(1, T)]
    assert not any(same_steps[k] for k, n in enumerate([n for n in kept for _ in range(1, T)])
                   if n in ("per_step", "second_site"))
    for name in ("variational", "per_sequence", "per_batch"):  # the same mask at every step
        assert all(np.array_equal(kept[name][0], kept[name][t]) for t in range(T)), name
    assert not np.array_equal(kept["variational"][0, 0], kept["variational"][0, 1])  # its own per example
    assert all(np.array_equal(kept["per_batch"][0, 0], kept["per_batch"][0, b]) for b in range(B))
    assert not np.array_equal(kept["per_step"], kept["second_site"])  # each call draws its own
    scale = res.outputs["per_step"][kept["per_step"]]
    assert np.allclose(scale, 1 / 0.6)  # inverted dropout: the kept units scaled


RATES = """
cell rates {
    dim H
    input x[H]
    state h[H]
    next h = h
    output d1 = dropout(x * 0 + 1, 0.1)
    output d5 = dropout(x * 0 + 1, 0.5)
    output d9 = dropout(x * 0 + 1, 0.9)
    output z3 = zoneout(x * 0, x * 0 + 1, 0.3)
}
"""


@pytest.fixture(scope="module")
def large_draw():
    """About 10^5 draws of each mask, [T, B, H]: 0 (dropped) or 1 (kept)."""
    H, T, B = 128, 40, 24
    mod = rnnc.compile(RATES, dims={"H": H}).load(dtype="float32")
    res = mod.forward({"x": np.zeros((T, B, H), np.float32)}, {}, seed=12345, train=False, stochastic=True)
    return {name: (a != 0).astype(np.float64) for name, a in res.outputs.items()}


@pytest.mark.parametrize("name, p", [("d1", 0.1), ("d5", 0.5), ("d9", 0.9), ("z3", 0.3)])
def test_rates_within_five_standard_deviations(large_draw, name, p):
    mask = large_draw[name]
    chance = 1 - p if name.startswith("d") else p  # dropout keeps with 1 - p, zoneout keeps the old with p
    n = mask.size
    assert abs(mask.sum() - n * chance) < 5 * np.sqrt(n * chance * (1 - chance))


@pytest.mark.parametrize("name", ["d5", "z3"])
@pytest.mark.parametrize("axis", [0, 1, 2], ids=["steps", "examples", "elements"])
def test_no_correlation_between_neighbours(large_draw, name, axis):
    """Neighbouring steps, examples and elements of a mask are independent: their
    correlation is within 5 standard deviations (1/sqrt(n)) of 0."""
    mask = large_draw[name]
    a, b = np.moveaxis(mask, axis, 0)[:-1].ravel(), np.moveaxis(mask, axis, 0)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_no_correlation_between_calls(large_draw):
    a, b = large_draw["d5"].ravel(), large_draw["d1"].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


# --- seeds and the expectation forms ---------------------------------------------------------
def test_a_seed_repeats_its_masks_and_another_draws_others():
    mod = rnnc.compile(MASKS, dims={"H": 6}).load()
    first, again, other = (mask_outputs(mod, 5, 3, 6, seed) for seed in (3, 3, 4))
    assert np.array_equal(first.outputs["per_step"], again.outputs["per_step"])
    assert not np.array_equal(first.outputs["per_step"], other.outputs["per_step"])
    fresh = mask_outputs(mod, 5, 3, 6, None)  # a fresh seed, which the result records
    assert isinstance(fresh.seed, int) and first.seed == 3
    assert np.array_equal(fresh.outputs["per_step"], mask_outputs(mod, 5, 3, 6, fresh.seed).outputs["per_step"])


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3", True])
def test_bad_seeds_are_refused_by_name(seed):
    mod = rnnc.compile(MASKS, dims={"H": 2}).load()
    with pytest.raises(ValueError, match="seed"):
        mask_outputs(mod, 2, 1, 2, seed)


# a cell with random ops, and the same with their expectation forms written out
EXPECTATIONS = """
cell {name} {{
    dim H
    input x[H]
    state h[H], c[H]
    param W[H, H]
    next h = {h}
    next c = {c}
    output y = {y}
}}
"""
EXPECTED = EXPECTATIONS.format(name="expected", h="tanh(dropout(x, 0.3) @ W + dropout(h, 0.5, variational=1))",
                               c="zoneout(tanh(x + c), c, 0.2)", y="dropout(h, 0.1) * 2")
WRITTEN_OUT = EXPECTATIONS.format(name="written_out", h="tanh(x @ W + h)", c="0.2 * c + 0.8 * tanh(x + c)",
                                  y="h * 2")


def test_without_training_the_expectation_forms():
    """train=False (and stochastic=False with training): dropout is the
    identity and zoneout p * old + (1 - p) * new, gradients too."""
    args = cases.arguments(rnnc.compile(EXPECTED, dims={"H": 4}), seed=3)
    f64 = {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in args.items()}
    forward = {k: f64[k] for k in ("inputs", "params", "states")}
    mod, plain = (rnnc.compile(t, dims={"H": 4}).load() for t in (EXPECTED, WRITTEN_OUT))
    want = plain.forward(**forward)
    got = mod.forward(**forward, train=False)
    for name in want.outputs:
        assert np.allclose(got.outputs[name], want.outputs[name], rtol=1e-12, atol=0)
    trained = mod.forward(**forward, stochastic=False)
    g, g_want = mod.backward(trained, f64["d_outputs"]), plain.backward(want, f64["d_outputs"])
    for name in g_want.params:
        assert np.allclose(g.params[name], g_want.params[name], rtol=1e-12, atol=1e-14)
    # and with training the masks make a difference
    assert not np.allclose(mod.forward(**forward, seed=1).outputs["y"], want.outputs["y"])


# --- gradients with the masks held fixed -----------------------------------------------------
@pytest.mark.parametrize("name", ["zoneout_lstm", "variational_gru"])
@pytest.mark.parametrize("plan", ["none", "auto", "budget"])
def test_examples_gradients_equal_finite_differences(name, plan):
    """With a fixed seed, through every plan: a checkpointed segment replayed
    in the backward draws its masks again."""
    T, B = 5, 2
    prog = compile_with(example(name), {"D": 3, "H": 4}, plan, T, B, "float64")
    report = gradcheck(prog.load(dtype="float64"), T=T, B=B, seed=11, with_lengths=True)
    assert report.worst < 1e-6, report.format()


# --- memory: a mask is never stored ---------------------------------------------------------
def test_masks_add_no_stored_bytes():
    """The zoneout LSTM stores what the LSTM stores, under every plan, as
    planned and as measured; and `rnnc plan` says the masks are drawn again."""
    T, B = 7, 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, B, 3))
    for policy in ("none", "auto", "all"):
        plans = [rnnc.compile(example(n), dims={"D": 3, "H": 4}, recompute=policy) for n in ("lstm", "zoneout_lstm")]
        assert plans[0].plan.stored_bytes(T, B) == plans[1].plan.stored_bytes(T, B)
        measured = [p.load().forward({"x": x}, p.load().init_params(), seed=1).stored_bytes for p in plans]
        assert measured[0] == measured[1] == plans[0].plan.stored_bytes(T, B, "float64")
    assert "masks drawn again in the backward, 0 bytes: c_new (zoneout, per step), h_new (zoneout, per step)" \
        in str(plans[1].plan)


# --- the step index -----------------------------------------------------------------------
STEP = """
cell clock {
    dim H
    input x[H]
    state h[H]
    param lam[H] = 0.3
    step t
    decay = exp(-lam * t)
    next h = h * decay + x
    output y = x * 0 + t
}
"""


def test_the_step_index_counts_steps_from_zero():
    T, B, H = 6, 3, 2
    mod = compile_with(STEP, {"H": H}, "budget", T, B, "float64").load()  # replayed segments count from their start
    lengths = np.array([6, 2, 0])
    res = mod.forward({"x": np.ones((T, B, H))}, mod.init_params(), lengths=lengths)
    steps = np.arange(T)[:, None, None] * np.ones((1, B, H))
    assert np.array_equal(res.outputs["y"], np.where(np.arange(T)[:, None, None] < lengths[None, :, None], steps, 0))
    report = gradcheck(mod, T=T, B=B, seed=2, with_lengths=True)  # a learned time decay
    assert report.worst < 1e-6, report.format()


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
def test_the_step_index_on_the_cuda_backend(workdir):
    prog = rnnc.compile(STEP, dims={"H": 2}, recompute="all")
    module, _ = cuda_emulator.emulated(prog, workdir)
    args = cases.arguments(prog)
    bad = cases.mismatches(cases.run(module, args, cases.LENGTHS), cases.reference(prog, args, cases.LENGTHS))
    assert not bad


def test_the_step_index_in_the_ir_and_its_errors():
    text = rnnc.driver.emit(rnnc.driver.read_source(STEP), "ir")
    assert "step    t[]" in text and "%example" not in text  # no counter where nothing is drawn
    with pytest.raises(rnnc.CellError, match="'step' is a reserved keyword"):
        rnnc.compile(STEP.replace("decay", "step"), dims={"H": 2})
