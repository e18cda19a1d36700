"""forward(..., reverse=True): every example runs backwards over its own valid steps.

The reference runs each example alone (batch 1, no lengths) on its valid steps
put in reverse order by hand, and puts its outputs and input gradients back
in order; parameter gradients are the sum over examples. The module under
test runs the whole batch at once with lengths, under every recompute policy
and a memory budget, on the NumPy backend and on the CUDA backend (emulated,
with host arrays and with device arrays).
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnc
from rnnc.backends.reverse import flip_copies, step_order

import cuda_cases as cases
import cuda_emulator

# two inputs, a context, two states, two outputs (one of another shape), hoisted products
BRAID = """
cell braid {
    dim D, H
    input x[D], u[H]
    context e[H]
    state h[H], c[H]
    param W[D, H], V[H, H], b[H] = 0.1

    a = tanh(x @ W + h @ V + b + u * e)
    c_new = c * sigmoid(a) + a * e
    h_new = tanh(c_new) * sigmoid(u)

    next h = h_new
    next c = c_new
    output y = h_new
    output s = sum(c_new * a, axis=-1, keepdims=1)
}
"""
# a matrix state and a softmax over it: the order of steps matters in every value
SWIRL = """
cell swirl {
    dim D, H, S
    input x[D]
    state m[S, H]
    param W[D, H], q[H]

    k = tanh(x @ W)
    alpha = softmax(m @ q)
    read = alpha @ m
    m_new = 0.5 * m + 0.5 * tanh(k + read)

    next m = m_new
    output y = read * k
}
"""
CELLS = {"braid": (BRAID, {"D": 3, "H": 4}), "swirl": (SWIRL, {"D": 2, "H": 3, "S": 2})}
T, B = 6, 4
LENGTHS = np.array([3, 6, 0, 1])  # unsorted, a full one, an empty one, a single step


def compiled(name: str, policy: str):
    text, dims = CELLS[name]
    if policy != "budget":
        return rnnc.compile(text, dims=dims, recompute=policy)
    roomy = rnnc.compile(text, dims=dims, recompute="none").plan.peak_bytes(T, B, "float64")
    program = rnnc.compile(text, dims=dims, recompute="auto", memory_budget=roomy // 2, seq_len=T,
                           batch=B, dtype="float64")
    assert len(program.plan.segments) > 1  # the backward replays checkpointed segments
    return program


def arguments(program, seed: int = 3) -> dict:
    args = cases.arguments(program, seed, steps=T, batch=B)
    return {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in args.items()}


def run(module, args, lengths, reverse: bool) -> dict:
    forward = {k: args[k] for k in ("inputs", "states", "contexts", "params")}
    res = module.forward(**forward, lengths=lengths, reverse=reverse)
    g = module.backward(res, args["d_outputs"], args["d_states"])
    return {"outputs": res.outputs, "states": res.states, "d params": g.params,
            "d inputs": g.inputs, "d states": g.states, "d contexts": g.contexts}


def hand_reversed(program, args, lengths) -> dict:
    """Each example alone, its valid steps reversed by hand, run forwards (plan 'none')."""
    module = rnnc.compile(program.source.text, dims=dict(program.cell.dims), recompute="none").load()
    want = run(module, args, None, False)  # for the shapes; every entry is overwritten below
    for key in ("outputs", "d inputs"):
        for a in want[key].values():
            a[:] = 0
    for a in want["d params"].values():
        a[:] = 0
    for b in range(B):
        n = T if lengths is None else int(lengths[b])

        def steps(a):  # example b's valid steps, last first
            return a[:n, b:b + 1][::-1]
        one = {"inputs": {k: steps(a) for k, a in args["inputs"].items()},
               "d_outputs": {k: steps(a) for k, a in args["d_outputs"].items()},
               **{k: {n_: a[b:b + 1] for n_, a in args[k].items()}
                  for k in ("states", "contexts", "d_states")},
               "params": args["params"]}
        got = run(module, one, None, False)
        for key in ("outputs", "d inputs"):
            for name, a in got[key].items():
                want[key][name][:n, b] = a[::-1, 0]
        for key in ("states", "d states", "d contexts"):
            for name, a in got[key].items():
                want[key][name][b] = a[0]
        for name, a in got["d params"].items():
            want["d params"][name] += a
    return want


def assert_equal_results(got: dict, want: dict, atol: float):
    for key, arrays in want.items():
        assert got[key].keys() == arrays.keys(), key
        for name, a in arrays.items():
            np.testing.assert_allclose(np.asarray(got[key][name], np.float64), a, rtol=0, atol=atol,
                                       err_msg=f"{key} {name}")


@pytest.mark.parametrize("policy", ["none", "auto", "all", "budget"])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "lengths"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_numpy_reverse_equals_hand_reversed_examples(name, lengths, policy):
    program = compiled(name, policy)
    args = arguments(program)
    got = run(program.load(backend="numpy", dtype="float64"), args, lengths, reverse=True)
    assert_equal_results(got, hand_reversed(program, args, lengths), atol=1e-12)


def test_reverse_is_not_forward():
    """The comparison above could not pass with reverse ignored."""
    program = compiled("braid", "auto")
    args = arguments(program)
    module = program.load(backend="numpy", dtype="float64")
    forward, backward = (run(module, args, LENGTHS, r) for r in (False, True))
    assert not np.allclose(forward["outputs"]["y"], backward["outputs"]["y"])
    for b, n in enumerate(LENGTHS):  # padding stays padding
        assert np.all(backward["outputs"]["y"][n:, b] == 0)
        assert np.all(backward["d inputs"]["x"][n:, b] == 0)


def test_second_backward_of_a_reversed_forward_is_the_same():
    """A backward after another replays the forward, reversed again."""
    program = compiled("braid", "budget")
    args = arguments(program)
    module = program.load(backend="numpy", dtype="float64")
    res = module.forward(**{k: args[k] for k in ("inputs", "states", "contexts", "params")},
                         lengths=LENGTHS, reverse=True)
    first, again = (module.backward(res, args["d_outputs"], args["d_states"]) for _ in range(2))
    for name in first.inputs:
        np.testing.assert_array_equal(again.inputs[name], first.inputs[name])


def test_flip_copies_move_rows_as_the_reversal_does():
    """The device path's copies give the hand reversal, in one copy per step for equal lengths."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, B, 2))
    for lengths in (None, LENGTHS, np.full(B, 4)):
        order = step_order(T, B, lengths)
        out = np.zeros_like(x)
        src, dst = x.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)
        for d, s, n in flip_copies(order, x.nbytes):
            dst[d:d + n] = src[s:s + n]
        for b in range(B):
            n = T if lengths is None else lengths[b]
            np.testing.assert_array_equal(out[:n, b], x[:n, b][::-1])
            np.testing.assert_array_equal(out[n:, b], x[n:, b])
    assert len(flip_copies(step_order(T, B, None), x.nbytes)) == T
    assert len(flip_copies(step_order(T, B, np.full(B, 4)), x.nbytes)) == 4 + 1  # the kept tail in one


# --- the CUDA backend, emulated on the CPU ---------------------------------------------------
@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
@pytest.mark.parametrize("policy", ["auto", "budget"])
def test_cuda_reverse_equals_numpy_with_host_and_device_arrays(policy, workdir):
    from rnnc.backends.cuda.lowering import generate
    from rnnc.backends.cuda.runtime import CudaModule
    program = compiled("braid", policy)
    generated = generate(program)
    module = CudaModule(program, generated.launches, cuda_emulator.EmulatedDevice(generated, workdir))
    args32 = cases.arguments(program, 3, steps=T, batch=B)
    want = run(program.load(backend="numpy", dtype="float64"), arguments(program), LENGTHS, True)

    def unwrap(array):
        assert isinstance(array, cuda_emulator.HostArray), type(array)
        return array.array
    for to_array, to_numpy in ((lambda a: a, np.asarray), (cuda_emulator.HostArray, unwrap)):
        on = {k: {n: to_array(a) for n, a in v.items()} for k, v in args32.items()}
        got = run(module, on, LENGTHS, True)
        got = {k: {n: to_numpy(a) for n, a in v.items()} for k, v in got.items()}
        assert_equal_results(got, want, atol=1e-4)


# the step index and a mask per step, each shown by an output
CLOCKED = """
cell clocked {
    dim H
    input x[H]
    state h[H]
    step t
    next h = zoneout(h + x, h, 0.3)
    output y = x * 0 + t
    output kept = dropout(x * 0 + 1, 0.5)
}
"""


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")
def test_step_index_and_masks_count_steps_as_they_run(workdir):
    """With reverse=True the step index is 0 at each example's last valid step (the order
    it runs in), and both backends draw the same masks at the same steps."""
    program = rnnc.compile(CLOCKED, dims={"H": 3}, recompute="all")
    module, _ = cuda_emulator.emulated(program, workdir)
    reference = program.load(backend="numpy", dtype="float32")
    x = np.random.default_rng(0).normal(size=(T, B, 3)).astype(np.float32)
    got, want = (m.forward({"x": x}, {}, lengths=LENGTHS, seed=7, reverse=True) for m in (module, reference))
    s = np.arange(T)[:, None]
    np.testing.assert_array_equal(want.outputs["y"][..., 0], np.where(s < LENGTHS, LENGTHS - 1 - s, 0))
    np.testing.assert_array_equal(got.outputs["y"], want.outputs["y"])
    np.testing.assert_array_equal(got.outputs["kept"] == 0, want.outputs["kept"] == 0)
    np.testing.assert_allclose(got.states["h"], want.states["h"], rtol=0, atol=1e-5)
    forward = reference.forward({"x": x}, {}, lengths=LENGTHS, seed=7)
    assert not np.array_equal(forward.outputs["kept"], want.outputs["kept"])


# --- the command line ------------------------------------------------------------------
@pytest.mark.parametrize("command, name, dims, expected", [
    # finite differences of the reversed forward, with random lengths
    (["gradcheck", "--seq-len", "4", "--batch", "3"], "braid", ["D=2", "H=3"],
     ["contexts['e']", "ok: tolerance"]),
    (["run", "--seq-len", "5", "--batch", "4"], "swirl", ["D=2", "H=3", "S=2"],
     ["output y: [5, 4, 3]", "random lengths, reversed)"]),
])
def test_command_line(command, name, dims, expected, tmp_path, capsys):
    from rnnc.cli import main
    path = tmp_path / f"{name}.cell"
    path.write_text(CELLS[name][0])
    assert main([command[0], str(path), *command[1:], *(a for d in dims for a in ("-D", d)),
                 "--lengths", "--reverse"]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out
