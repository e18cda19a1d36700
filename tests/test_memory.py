"""Plans on the NumPy backend: every plan gives the same gradients, and the
bytes the backend holds are the bytes the plan predicts (and, by tracemalloc,
the bytes the process really allocates)."""
import tracemalloc

import numpy as np
import pytest

from rnnc.gradcheck import random_arguments
from rnnc.ops import numel

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import EXAMPLES, compile_sized, example  # noqa: E402

SMALL = {"D": 3, "H": 4, "E": 3, "S": 2, "P": 2}
T, B = 7, 3
# Caffe2's recurrent_net in its memory mode: recompute the gate pre-activations
MANUAL = {"gru": ["hu"], "variational_gru": ["hu"], "indrnn": ["h_new"], "elman": ["pre"], "elman_relu": ["pre"]}
POLICIES = ["none", "auto", "all", "manual", "budget 60%", "budget 25%"]


def compile_example(path, dims=SMALL, **kw):
    return compile_sized(path, dims, **kw)


def compile_policy(path, policy, dtype="float64", T=T, B=B):
    """A program for one of POLICIES; budgets are fractions of `none`'s peak."""
    if policy.startswith("budget"):
        none = compile_example(path, recompute="none").plan
        budget = none.peak_bytes(T, B, dtype) * int(policy.split()[1].rstrip("%")) // 100
        return compile_example(path, memory_budget=budget, seq_len=T, batch=B, dtype=dtype)
    if policy == "manual":
        return compile_example(path, recompute=MANUAL.get(path.stem, ["gates"]))
    return compile_example(path, recompute=policy)


def run(prog, dtype="float64", lengths=False, seed=3, T=T, B=B):
    """Forward and backward on random arguments; (result, gradients, arguments)."""
    mod = prog.load(dtype=dtype)
    args = random_arguments(mod, T=T, B=B, seed=seed, with_lengths=lengths)
    res = mod.forward(**args, seed=seed)  # the same masks under every plan
    rng = np.random.default_rng(seed + 1)
    d_outputs = {k: rng.normal(size=v.shape).astype(mod.dtype) for k, v in res.outputs.items()}
    d_states = {k: rng.normal(size=v.shape).astype(mod.dtype) for k, v in res.states.items()}
    return res, mod.backward(res, d_outputs, d_states), args


def flat(g) -> dict:
    return {f"{kind}[{k}]": v for kind in ("params", "inputs", "states", "contexts")
            for k, v in getattr(g, kind).items()}


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_policy_gives_the_gradients_of_none(path, lengths):
    _, reference, _ = run(compile_example(path, recompute="none"), lengths=lengths)
    for policy in POLICIES[1:]:
        res, g, _ = run(compile_policy(path, policy), lengths=lengths)
        for name, want in flat(reference).items():
            np.testing.assert_allclose(flat(g)[name], want, rtol=0, atol=1e-12, err_msg=f"{policy}: {name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_measured_bytes_equal_the_predictions(path, dtype):
    for policy in POLICIES:
        prog = compile_policy(path, policy, dtype)
        res, g, _ = run(prog, dtype, lengths=True)
        assert res.stored_bytes == prog.plan.stored_bytes(T, B, dtype), policy
        assert g.peak_bytes == prog.plan.peak_bytes(T, B, dtype), policy
        if prog.plan.budget is not None:
            assert g.peak_bytes <= prog.plan.budget


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, names", [("lstm", ["c_new"]), ("peephole_lstm", ["i", "f", "g", "o"])])
def test_stored_slices_count_as_their_own_bytes(name, names, dtype):
    """These plans store slices of the gates (`i`, `a_i`); a slice would keep
    all the gates alive, so the backend stores a copy, and holds what the plan says."""
    prog = compile_example(example(name), recompute=names)
    step = prog.hoisted.step.producers()
    assert any(step[v].op == "slice" for v in prog.plan.stored if v in step)
    res, g, _ = run(prog, dtype)
    assert res.stored_bytes == prog.plan.stored_bytes(T, B, dtype)
    assert g.peak_bytes == prog.plan.peak_bytes(T, B, dtype)


@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0.05, 1.0), name=st.sampled_from(["lstm", "attention_lstm", "layernorm_lstm"]),
       length=st.integers(1, 12), seed=st.integers(0, 1000))
def test_a_budgeted_run_stays_within_its_budget(fraction, name, length, seed):
    path = example(name)
    none = compile_example(path, recompute="none")
    budget = int(fraction * none.plan.peak_bytes(length, B, "float64"))
    try:
        prog = compile_example(path, memory_budget=budget, seq_len=length, batch=B, dtype="float64")
    except ValueError as err:
        assert "smallest feasible budget" in str(err)
        return
    _, g, _ = run(prog, lengths=True, seed=seed, T=length)
    assert g.peak_bytes == prog.plan.peak_bytes(length, B, "float64") <= budget
    _, reference, _ = run(none, lengths=True, seed=seed, T=length)
    for key, want in flat(reference).items():
        np.testing.assert_allclose(flat(g)[key], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("policy", ["none", "budget 25%"])
@pytest.mark.parametrize("path", [example("lstm"), example("attention_lstm")], ids=lambda p: p.stem)
def test_inference_keeps_nothing_and_gives_the_same_outputs(path, policy):
    prog = compile_policy(path, policy)
    mod = prog.load(dtype="float64")
    args = random_arguments(mod, T=T, B=B, seed=5, with_lengths=True)
    train, infer = mod.forward(**args), mod.forward(**args, train=False)
    assert infer.stored_bytes == 0 < train.stored_bytes
    for kind in ("outputs", "states"):
        for k, v in getattr(train, kind).items():
            np.testing.assert_array_equal(getattr(infer, kind)[k], v)
    with pytest.raises(ValueError, match="train=False"):
        mod.backward(infer)


def test_a_second_backward_reruns_the_forward_and_agrees():
    mod = compile_policy(example("lstm"), "budget 25%").load()
    args = random_arguments(mod, T=T, B=B, seed=2)
    res = mod.forward(**args)
    dy = {"y": np.ones_like(res.outputs["y"])}
    first, second = mod.backward(res, dy), mod.backward(res, dy)
    for key, value in flat(first).items():
        np.testing.assert_array_equal(flat(second)[key], value)
    assert first.peak_bytes == second.peak_bytes


def region_bytes(graph, rows: int, itemsize: int) -> int:
    """Bytes of every value one run of a region makes over `rows` batch rows."""
    return itemsize * sum(numel(n.shape) * (rows if n.batched else 1) for n in graph.nodes if n.op != "const")


def scratch_bytes(prog, T, B, itemsize) -> int:
    """One region run's scratch: the most that any single run of a region (a
    step forward, its recompute and backward; the hoisted products of the
    longest segment, forward and backward) makes at once, twice over for the
    temporaries inside op rules (a sigmoid makes two)."""
    h, g = prog.hoisted, prog.grads
    rows = max(prog.plan.segments_for(T)) * B
    step = region_bytes(h.step, B, itemsize) + region_bytes(g["step"].graph, B, itemsize)
    pre = region_bytes(h.pre, rows, itemsize) + region_bytes(g["pre"].graph, rows, itemsize)
    seq = region_bytes(h.seq, B, itemsize) + region_bytes(g["seq"].graph, B, itemsize)
    return 2 * max(step, pre, seq)


@pytest.mark.parametrize("policy", ["none", "auto", "all", "c_new", "budget 25%", "budget 10%"])
@pytest.mark.parametrize("name", ["lstm", "attention_lstm"])
def test_real_allocations_match_the_plan(name, policy):
    """tracemalloc sees numpy's allocations: the real peak of forward plus
    backward is at least the plan's peak, and at most the plan's peak plus the
    returned arrays plus one region run's scratch."""
    dims, T, B = {"D": 32, "H": 64, "E": 32, "S": 8}, 24, 16
    path = example(name)
    none = compile_example(path, dims, recompute="none").plan
    if policy.startswith("budget"):
        budget = none.peak_bytes(T, B, "float64") * int(policy.split()[1].rstrip("%")) // 100
        prog = compile_example(path, dims, memory_budget=budget, seq_len=T, batch=B, dtype="float64")
    else:  # c_new: a manual list that stores slices of the gates
        prog = compile_example(path, dims, recompute=policy)
    mod = prog.load(dtype="float64")
    args = random_arguments(mod, T=T, B=B, seed=0)
    d_outputs = {"y": np.ones((T, B, dims["H"]))}
    tracemalloc.start()
    try:
        res = mod.forward(**args)
        g = mod.backward(res, d_outputs)
        _, real = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    returned = sum(a.nbytes for d in (res.outputs, res.states) for a in d.values())
    returned += sum(a.nbytes for a in flat(g).values())
    predicted = prog.plan.peak_bytes(T, B, "float64")
    assert g.peak_bytes == predicted
    assert predicted <= real <= predicted + returned + scratch_bytes(prog, T, B, 8), (
        real - predicted - returned, scratch_bytes(prog, T, B, 8))


def test_a_budgeted_plan_runs_shorter_sequences_within_its_budget():
    prog = compile_policy(example("gru"), "budget 25%")
    res, g, _ = run(prog, T=T - 3, lengths=True)
    assert g.peak_bytes == prog.plan.peak_bytes(T - 3, B, "float64") <= prog.plan.budget
    mod = prog.load()
    with pytest.raises(ValueError, match=f"seq_len={T + 1}"):
        mod.forward(**random_arguments(mod, T=T + 1, B=B))
