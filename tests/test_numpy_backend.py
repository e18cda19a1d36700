"""The NumPy reference backend: gradients, semantics, argument checking."""
import numpy as np
import pytest

import new_cells
import rnnc
from rnnc.gradcheck import gradcheck, random_arguments
from rnnc.passes.hoist import classify

from conftest import EXAMPLES, compile_sized, example

SMALL = {"D": 3, "H": 2, "E": 3, "S": 4, "P": 2}


def compile_small(path, **kw):
    return compile_sized(path, SMALL, **kw)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_gradients_match_finite_differences(path, lengths):
    module = compile_small(path, recompute="none").load(dtype="float64")
    report = gradcheck(module, T=3, B=3, seed=7, with_lengths=lengths)
    assert report.worst < 1e-6, report.format()
    # every kind of argument was checked
    kinds = {k.split("[")[0] for k in report.errors}
    assert {"params", "inputs", "states"} <= kinds


def lstm(dims=None, **kw):
    return rnnc.compile(example("lstm"), dims=dims or {"D": 3, "H": 4}, **kw)


def test_hoisting_splits_the_step():
    cell = lstm().cell
    region = classify(cell)
    dots = {n.args: region[n.out] for n in cell.nodes if n.op == "dot"}
    assert dots == {("x", "W"): "pre", ("h", "U"): "step"}
    att = compile_small(example("attention_lstm")).cell
    assert classify(att)["keys"] == "seq"


def test_attention_is_per_example():
    """alpha[S] @ enc[S, E] is a vector-matrix product for each batch element;
    compared with the cell's equations written out per element by hand."""
    prog = compile_small(example("attention_lstm"))
    mod = prog.load()
    args = random_arguments(mod, T=2, B=3, seed=1)
    res = mod.forward(**args)
    p = args["params"]
    sig = lambda z: 1 / (1 + np.exp(-z))
    for b in range(3):
        h, c, ctx = (args["states"][k][b] for k in ("h", "c", "ctx"))
        enc = args["contexts"]["enc"][b]
        keys = enc @ p["We"]
        for t in range(2):
            gates = args["inputs"]["x"][t, b] @ p["W"] + np.concatenate([h, ctx]) @ p["U"] + p["b"]
            i, f, g, o = np.split(gates, 4)
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            score = (np.tanh(keys + h @ p["Wd"]) * p["v"]).sum(-1)
            alpha = np.exp(score - score.max())
            alpha /= alpha.sum()
            ctx = alpha @ enc
            np.testing.assert_allclose(res.outputs["y"][t, b], h, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(res.states["ctx"][b], ctx, rtol=1e-12, atol=1e-12)


def test_lengths_carry_states_and_zero_outputs():
    mod = lstm().load()
    args = random_arguments(mod, T=5, B=3, seed=2)
    lengths = args["lengths"] = np.array([5, 2, 0])
    res = mod.forward(**args)
    for b, n in enumerate(lengths):
        alone = {**args, "lengths": None, "inputs": {"x": args["inputs"]["x"][:n, b:b + 1]},
                 "states": {k: v[b:b + 1] for k, v in args["states"].items()}}
        if n:
            ref = mod.forward(**alone)
            np.testing.assert_allclose(res.outputs["y"][:n, b], ref.outputs["y"][:, 0], atol=1e-13)
            for k in ("h", "c"):
                np.testing.assert_allclose(res.states[k][b], ref.states[k][0], atol=1e-13)
        else:
            for k in ("h", "c"):
                np.testing.assert_array_equal(res.states[k][b], args["states"][k][b])
        assert np.all(res.outputs["y"][n:, b] == 0)


def test_defaults_mean_zeros():
    mod = lstm().load()
    args = random_arguments(mod, T=3, B=2, seed=3)
    zeros = {k: np.zeros_like(v) for k, v in args["states"].items()}
    a = mod.forward(args["inputs"], args["params"])
    b = mod.forward(args["inputs"], args["params"], states=zeros)
    np.testing.assert_array_equal(a.outputs["y"], b.outputs["y"])
    ga = mod.backward(a, d_states={"h": np.ones((2, 4))})
    gb = mod.backward(b, d_outputs={"y": np.zeros((3, 2, 4))},
                      d_states={"h": np.ones((2, 4)), "c": None})
    for k in ga.params:
        np.testing.assert_array_equal(ga.params[k], gb.params[k])


def test_float32_module_agrees_with_float64():
    prog = lstm()
    m64, m32 = prog.load(dtype="float64"), prog.load(dtype="float32")
    args = random_arguments(m64, T=4, B=2, seed=4)
    args32 = {k: ({n: a.astype(np.float32) for n, a in v.items()} if isinstance(v, dict) else v)
              for k, v in args.items()}
    r64, r32 = m64.forward(**args), m32.forward(**args32)
    assert r32.outputs["y"].dtype == np.float32
    np.testing.assert_allclose(r32.outputs["y"], r64.outputs["y"], atol=1e-5)
    g32 = m32.backward(r32, {"y": np.ones((4, 2, 4), np.float32)})
    g64 = m64.backward(r64, {"y": np.ones((4, 2, 4))})
    assert g32.params["W"].dtype == np.float32
    np.testing.assert_allclose(g32.params["U"], g64.params["U"], atol=1e-4)


def test_init_params():
    text = "cell c {\n dim D, H\n input x[D]\n state h[H]\n param W[D, H], b[H] = -0.5, v[H]\n" \
           " next h = tanh(x @ W + b + v * h)\n}"
    mod = rnnc.compile(text, dims={"D": 16, "H": 3}).load(dtype="float32")
    p = mod.init_params(seed=0)
    assert all(a.dtype == np.float32 for a in p.values())
    assert np.all(p["b"] == -0.5)
    assert np.abs(p["W"]).max() <= 1 / np.sqrt(16) and np.abs(p["W"]).std() > 0.05
    assert np.abs(p["v"]).max() <= 1 / np.sqrt(3)
    np.testing.assert_array_equal(mod.init_params(seed=0)["W"], p["W"])
    assert not np.array_equal(mod.init_params(seed=1)["W"], p["W"])


# --- argument checking ----------------------------------------------------------
def bad_calls():
    T, B, D, H = 3, 2, 3, 4
    x = np.zeros((T, B, D))
    yield "missing input", dict(inputs={}), ["inputs", "'x'"]
    yield "unknown input", dict(inputs={"x": x, "q": x}), ["inputs", "'q'", "x"]
    yield "wrong input shape", dict(inputs={"x": np.zeros((T, B, D + 1))}), ["inputs['x']", "[3, 2, 3]", "[3, 2, 4]"]
    yield "input of rank 2", dict(inputs={"x": np.zeros((T, D))}), ["inputs['x']", "[T, B, 3]", "[3, 3]"]
    yield "wrong dtype", dict(inputs={"x": x.astype(np.float32)}), ["inputs['x']", "float32", "float64"]
    yield "not an array", dict(inputs={"x": x.tolist()}), ["inputs['x']", "list"]
    yield "state batch differs", dict(states={"h": np.zeros((B + 1, H))}), ["states['h']", "[2, 4]", "[3, 4]", "batch"]
    yield "unknown state", dict(states={"z": np.zeros((B, H))}), ["states", "'z'", "h, c"]
    yield "missing param", dict(params={"W": np.zeros((D, 4 * H))}), ["params", "'U'"]
    yield "param shape", dict(params="W_wrong"), ["params['W']", "[3, 16]", "[16, 3]"]
    yield "unknown context", dict(contexts={"enc": x}), ["contexts", "'enc'"]
    yield "length above T", dict(lengths=np.array([1, 4])), ["lengths", "0..3"]
    yield "negative length", dict(lengths=np.array([-1, 2])), ["lengths", "0..3"]
    yield "lengths shape", dict(lengths=np.array([1, 2, 3])), ["lengths", "[2]", "[3]"]
    yield "float lengths", dict(lengths=np.array([1.0, 2.0])), ["lengths", "integer"]
    yield "float lengths list", dict(lengths=[1.0, 2]), ["lengths", "integer"]
    yield "ragged lengths", dict(lengths=[1, [2]]), ["lengths", "2 integers"]
    yield "inputs a list", dict(inputs=[x]), ["inputs", "expected a dict of arrays by name (x)", "list"]
    yield "params an array", dict(params=np.zeros((3, 16))), ["params", "a dict", "(W, U, b)", "ndarray"]
    yield "states a list", dict(states=[np.zeros((B, H))]), ["states", "a dict", "(h, c)", "list"]
    # [B, T, D] by mistake: the other arguments know B, and the error names both shapes and the layout
    batch_first = np.zeros((B, T, D))
    yield "batch-first input, states", dict(inputs={"x": batch_first}, states={"h": np.zeros((B, H))}), \
        ["states['h']", "[3, 4]", "[2, 4]", "inputs['x'] of shape [2, 3, 3]", "time first, [T, B, ...]"]
    yield "batch-first input, lengths", dict(inputs={"x": batch_first}, lengths=np.array([3, 1])), \
        ["lengths", "[3]", "[2]", "inputs['x'] of shape [2, 3, 3]", "time first, [T, B, ...]"]


@pytest.mark.parametrize("case,override,words", list(bad_calls()), ids=[c[0] for c in bad_calls()])
def test_bad_forward_arguments(case, override, words):
    mod = lstm().load()
    params = mod.init_params()
    if isinstance(override.get("params"), str):  # "W_wrong"
        override = dict(params={**params, "W": params["W"].T.copy()})
    call = dict(inputs={"x": np.zeros((3, 2, 3))}, params=params)
    call.update(override)
    with pytest.raises(ValueError) as err:
        mod.forward(**call)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_bad_backward_arguments():
    mod = lstm().load()
    res = mod.forward({"x": np.zeros((3, 2, 3))}, mod.init_params())
    with pytest.raises(ValueError, match=r"d_outputs.*'z'.*y"):
        mod.backward(res, {"z": np.zeros((3, 2, 4))})
    with pytest.raises(ValueError, match=r"d_outputs\['y'\].*\[3, 2, 4\].*\[3, 2, 5\]"):
        mod.backward(res, {"y": np.zeros((3, 2, 5))})
    with pytest.raises(ValueError, match=r"d_states\['c'\].*\[2, 4\].*\[2, 3\]"):
        mod.backward(res, d_states={"c": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"d_outputs\['y'\].*\[3, 2, 4\].*\[2, 3, 4\].*\[3, 2, \.\.\.\].*time first"):
        mod.backward(res, {"y": np.zeros((2, 3, 4))})
    inference = mod.forward({"x": np.zeros((3, 2, 3))}, mod.init_params(), train=False)
    with pytest.raises(ValueError, match="train=False"):
        mod.backward(inference, {"y": np.zeros((3, 2, 4))})
    with pytest.raises(TypeError, match=r"d_outputs: expected a dict of arrays by name \(y\), got ndarray"):
        mod.backward(res, np.zeros((3, 2, 4)))
    with pytest.raises(TypeError, match="backward: expected the result of this module's forward, got NoneType"):
        mod.backward(None)


def test_wrong_kinds_of_argument_are_both_type_and_value_errors():
    mod = lstm().load()
    for error in (TypeError, ValueError):
        with pytest.raises(error, match="inputs: expected a dict"):
            mod.forward([np.zeros((3, 2, 3))], mod.init_params())


def test_lengths_may_be_any_integer_array_like():
    mod = lstm().load()
    call = dict(inputs={"x": np.random.default_rng(0).normal(size=(3, 2, 3))}, params=mod.init_params())
    want = mod.forward(**call, lengths=np.array([3, 1])).outputs["y"]
    for lengths in ([3, 1], (3, 1), np.array([3, 1], np.int8), [np.int64(3), 1]):
        np.testing.assert_array_equal(mod.forward(**call, lengths=lengths).outputs["y"], want)
    assert not want[2, 1].any() and want[2, 0].any()  # the lengths took effect


def test_numpy_integer_dims_are_ints():
    prog = lstm(dims={"D": np.int64(3), "H": np.int32(4)})
    assert prog.cell.dims == (("D", 3), ("H", 4))
    assert all(type(v) is int for _, v in prog.cell.dims)
    with pytest.raises(ValueError, match="dims: expected a dict of dim name -> positive integer, got list"):
        lstm(dims=[3, 4])


@pytest.mark.parametrize("T,B", [(0, 2), (3, 0), (-1, 2), (2.5, 2)])
def test_gradcheck_needs_positive_sizes(T, B):
    with pytest.raises(ValueError, match=r"[TB]: expected a positive integer"):
        gradcheck(lstm().load(dtype="float64"), T=T, B=B)


def test_bad_program_arguments():
    prog = lstm()
    with pytest.raises(ValueError, match="'float32', 'float64', 'bfloat16', 'float16', got 'int32'"):
        prog.load(dtype="int32")
    for backend in ("numpy", "cuda"):  # a name NumPy does not know is the same error
        with pytest.raises(ValueError, match="dtype: expected one of 'float32'.*'float16', got 'flot'"):
            prog.load(backend, dtype="flot")
    with pytest.raises(ValueError, match="backend.*numpy"):
        prog.load(backend="tpu")
    with pytest.raises(ValueError, match="none, all, auto"):
        lstm(recompute="sometimes")
    with pytest.raises(rnnc.CellError, match="D, H"):
        rnnc.compile(example("lstm"))
    with pytest.raises(ValueError, match="no dim 'K'"):
        lstm(dims={"D": 3, "H": 4, "K": 2})


# a cell of these tests' own with every kind of argument the backward reads again
CONTEXT_GATE = """
cell context_gate {
    dim D, H, C
    input x[D]
    context k[C]
    state h[H]
    param W[D, H], U[H, H], V[C, H]

    h_new = tanh(x @ W + h @ U) * sigmoid(k @ V)
    next h = h_new
    output y = h_new
}
"""


def the_array(args: dict, label: str) -> np.ndarray:
    """The array `label` names ("inputs['x']" or "lengths")."""
    if label == "lengths":
        return args["lengths"]
    group, name = label.split("[")
    return args[group][name.strip("[]'")]


@pytest.mark.parametrize("label", ["inputs['x']", "params['U']", "states['h']", "contexts['k']", "lengths"])
@pytest.mark.parametrize("budget", [None, "1500"], ids=["one segment", "checkpointed"])
def test_an_argument_changed_in_place_before_the_backward_is_refused(label, budget):
    """Without the check the backward would read the changed arrays (the
    checkpointed plan replays segments from them), giving wrong gradients."""
    program = rnnc.compile(CONTEXT_GATE, dims={"D": 3, "H": 4, "C": 2}, memory_budget=budget,
                           seq_len=12, batch=3, dtype="float64")
    assert (program.plan.segments is not None and len(program.plan.segments) > 1) == (budget is not None)
    module = program.load(dtype="float64")
    args = random_arguments(module, T=12, B=3, seed=2, with_lengths=True)
    args["lengths"][1] = 8
    d_y = {"y": np.ones((12, 3, 4))}
    expected = module.backward(module.forward(**args), d_y)
    result = module.forward(**args)
    array = the_array(args, label)
    kept = array.copy()
    array[1] += 1
    pattern = label.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=rf"backward: {pattern} was changed in place after the forward"):
        module.backward(result, d_y)
    with pytest.raises(ValueError, match=pattern):
        module.backward(result, d_y)  # still refused: nothing was used up
    array[...] = kept  # as it was: the backward gives the gradients of the forward that ran
    got = module.backward(result, d_y)
    for group in ("params", "inputs", "states", "contexts"):
        for name, g in getattr(expected, group).items():
            np.testing.assert_array_equal(getattr(got, group)[name], g, err_msg=f"{group} {name}")


def test_scalar_params_are_0d_arrays_or_numpy_scalars():
    """`param a[]` takes a 0-d array or a NumPy scalar of the module's dtype, and
    its gradient is a 0-d array that matches finite differences."""
    module = rnnc.compile(new_cells.SCALAR_PARAMS, dims=new_cells.DIMS).load(dtype="float64")
    args = random_arguments(module, T=3, B=2, seed=3)
    p = args["params"]
    assert isinstance(p["a"], np.ndarray) and p["a"].shape == ()
    scalars = {**p, "a": p["a"][()], "b": p["b"][()]}
    assert isinstance(scalars["a"], np.float64)
    by_array = module.forward(**args)
    by_scalar = module.forward(**{**args, "params": scalars})
    np.testing.assert_array_equal(by_scalar.outputs["y"], by_array.outputs["y"])
    h = args["states"]["h"]  # the cell written out by hand
    for t in range(3):
        h = np.tanh(p["a"] * (args["inputs"]["x"][t] @ p["W"]) + p["b"] * h) / (1 + np.exp(-p["a"]))
        np.testing.assert_allclose(by_scalar.outputs["y"][t], h, rtol=1e-12)
    grads = module.backward(by_scalar, {"y": np.ones_like(by_scalar.outputs["y"])})
    assert grads.params["a"].shape == () == grads.params["b"].shape
    with pytest.raises(ValueError, match=r"params\['a'\]: dtype float32"):
        module.forward(**{**args, "params": {**p, "a": np.float32(0.5)}})
    report = gradcheck(module, T=3, B=2, seed=3, with_lengths=True)
    assert report.worst < 1e-6 and "params['a']" in report.errors, report.format()


@pytest.mark.parametrize("name", list(new_cells.CELLS))
def test_new_cells_gradients_match_finite_differences(name):
    module = rnnc.compile(new_cells.CELLS[name], dims=new_cells.DIMS, recompute="none").load(dtype="float64")
    report = gradcheck(module, T=3, B=2, seed=5, with_lengths=True)
    assert report.worst < 1e-6, report.format()


@pytest.mark.parametrize("name", list(new_cells.CELLS))
def test_new_cells_in_float32_stay_float32(name):
    """Literals, scalar params and once-per-sequence values never widen a
    float32 module's arrays to float64."""
    program = rnnc.compile(new_cells.CELLS[name], dims=new_cells.DIMS)
    wide, narrow = program.load(dtype="float64"), program.load(dtype="float32")
    args = random_arguments(wide, T=3, B=2, seed=4, with_lengths=True)
    args32 = {k: v if k == "lengths" else {n: np.asarray(a, np.float32) for n, a in v.items()}
              for k, v in args.items()}
    res, res32 = wide.forward(**args), narrow.forward(**args32)
    grads = wide.backward(res, {"y": np.ones_like(res.outputs["y"])})
    grads32 = narrow.backward(res32, {"y": np.ones_like(res32.outputs["y"])})
    pairs = [(res.outputs["y"], res32.outputs["y"])] + [(g, grads32.params[k]) for k, g in grads.params.items()]
    for want, got in pairs:
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_literal_only_subexpressions_fold_into_literals():
    program = rnnc.compile(new_cells.LITERALS, dims=new_cells.DIMS)
    consts = {n.out: n.attr("value") for n in program.cell.nodes if n.op == "const"}
    left = [n.out for n in program.cell.nodes if n.args and all(a in consts for a in n.args)]
    assert not left, f"nodes of literals only: {left}"
    # sqrt(4.0) * half is 1.0: a named literal folds into what uses it, and counts as used
    assert {-3.0, 3.0, -1.0, -2.0, 0.0, 0.5, 1.0, 2.0, float(np.exp(-1))} <= set(consts.values())
    assert not program.warnings
    module = program.load(dtype="float64")
    args = random_arguments(module, T=3, B=2, seed=2)
    args["states"]["h"] *= 4  # past the clips at -3 and 3
    res = module.forward(**args)
    h = args["states"]["h"]
    for t in range(3):
        h = new_cells.literal_math_step(args["inputs"]["x"][t], h, args["params"]["W"])
        np.testing.assert_allclose(res.outputs["y"][t], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_region_of_literals_and_scalars_gives_arrays(dtype):
    """What a region gives is an array of the module's dtype even where a rule
    gives a Python float (a literal) or a NumPy scalar (0-d arithmetic): the
    ledger counts arrays, and a float64 0-d array would widen float32 work.
    (The checker folds literal-only work away, so the region is built here.)"""
    from rnnc.backends.numpy import Runner
    from rnnc.ir import Value
    from rnnc.ops import Builder
    from rnnc.precision import precision
    b = Builder({"a": Value("a", (), False)})
    three = b.const(3.0)
    outs = [three, b.neg(three), b.add(b.const(1.0), b.const(0.5)), b.emit("sigmoid", "a"),
            b.mul("a", three)]
    env = Runner(b.nodes, b.values, precision(None), dtype).run({"a": np.asarray(0.25, dtype)})
    for name, want in zip(outs, [3.0, -3.0, 1.5, 1 / (1 + np.exp(-0.25)), 0.75]):
        assert isinstance(env[name], np.ndarray) and env[name].dtype == dtype, (name, type(env[name]))
        assert env[name].shape == () and np.isclose(env[name], want)


@pytest.mark.parametrize("name", list(new_cells.deep_pairs()))
def test_deep_cells_run_as_their_shallow_twins(name):
    """10,000 terms or statements, 1,000 levels of nesting: checked, hoisted,
    differentiated, planned (auto: the min-cut) and run on NumPy, with the
    outputs and gradients of a shallow cell computing the same function."""
    deep, shallow = new_cells.deep_pairs()[name]
    results = []
    for text in (deep, shallow):
        module = rnnc.compile(text, dims={"D": 3, "H": 2}).load(dtype="float64")
        args = random_arguments(module, T=3, B=2, seed=6, with_lengths=True)
        res = module.forward(**args)
        grads = module.backward(res, {"y": np.ones_like(res.outputs["y"])})
        results.append([res.outputs["y"], res.states["h"], grads.inputs["x"], grads.states["h"],
                        *grads.params.values()])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
