"""The recompute planner on its own: policies, the cost model, budgets, printing.

These tests make plans and read their predictions; tests/test_memory.py runs
them on the NumPy backend and checks the predictions against what it holds.
"""
import math

import pytest

import rnnc
from rnnc.driver import read_source
from rnnc.passes.mincut import FlowNetwork
from rnnc.passes.plan import parse_budget
from rnnc.passes.policy import STORE_COST, recompute_candidates

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import EXAMPLES, compile_sized, example  # noqa: E402

DIMS = {"D": 8, "H": 16, "E": 8, "S": 5, "P": 4}
T, B = 50, 4


def compile_example(path, **kw):
    return compile_sized(path, DIMS, **kw)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_policies_are_ordered(path):
    """all stores least and recomputes most; none the reverse; auto in between."""
    plans = {p: compile_example(path, recompute=p).plan for p in ("none", "auto", "all")}
    for measure in ("stored_bytes", "peak_bytes"):
        got = [getattr(plans[p], measure)(T, B) for p in ("all", "auto", "none")]
        assert got == sorted(got), (measure, got)
    flops = [plans[p].recompute_flops(T, B) for p in ("none", "auto", "all")]
    assert flops == sorted(flops) and flops[0] == 0
    assert plans["all"].recompute_flops(T, B) < plans["all"].forward_flops(T, B)
    # every residual is either stored or rebuilt by a recomputed node
    for plan in plans.values():
        rebuilt = {n.out for n in plan.recompute}
        assert all(r in plan.stored or r in rebuilt for r in plan.residuals)


def cost_model(plan) -> int:
    """The objective `auto` minimises: stored elements (states are stored by every
    plan) priced at STORE_COST, plus recomputed flops, per example."""
    c = plan.costs
    return STORE_COST * (c.stored.per_example - c.state.per_example) + c.recompute_flops.per_example


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_auto_keeps_products_and_beats_every_other_choice_by_its_cost_model(path):
    auto = compile_example(path, recompute="auto").plan
    assert not [n.out for n in auto.recompute if n.op == "dot"]
    rivals = [compile_example(path, recompute="none").plan]
    prog = compile_example(path)
    for name in recompute_candidates(prog.hoisted):
        plan = compile_example(path, recompute=[name]).plan
        if not any(n.op == "dot" for n in plan.recompute):
            rivals.append(plan)
    assert all(cost_model(auto) <= cost_model(r) for r in rivals)


def test_auto_on_the_lstm_keeps_the_recurrent_product():
    auto = compile_example(example("lstm"), recompute="auto").plan
    step = compile_example(example("lstm")).hoisted.step
    product = next(n.out for n in step.nodes if n.op == "dot")  # h @ U
    assert product not in {n.out for n in auto.recompute}
    assert auto.recompute  # and recomputes cheap elementwise work
    assert all(n.op not in ("dot",) for n in auto.recompute)


def test_manual_list_recomputes_the_whole_statement_like_caffe2():
    """recompute=["gates"] reruns `gates = x @ W + h @ U + b` and all that follows
    from it: only the states are stored, as in Caffe2's recurrent_net when
    its recompute_blobs_on_backward names the gates."""
    plan = compile_example(example("lstm"), recompute=["gates"]).plan
    assert plan.stored == ("h", "c")
    assert any(n.op == "dot" for n in plan.recompute)
    # a value downstream of nothing recomputed stays stored
    partial = compile_example(example("lstm"), recompute=["c_new"]).plan
    assert "c_new" in {n.out for n in partial.recompute}
    assert not any(n.op == "dot" for n in partial.recompute)


def test_manual_list_errors_list_the_candidates():
    with pytest.raises(ValueError) as err:
        compile_example(example("lstm"), recompute=["gatez"])
    message = str(err.value)
    assert "'gatez'" in message and "gates" in message and "c_new" in message
    with pytest.raises(ValueError, match="states are always stored"):
        compile_example(example("lstm"), recompute=["h"])
    with pytest.raises(ValueError, match="none, all, auto"):
        compile_example(example("lstm"), recompute="some")


def test_budget_needs_a_length_and_a_batch():
    with pytest.raises(ValueError, match="seq_len"):
        compile_example(example("lstm"), memory_budget=1 << 20)
    with pytest.raises(ValueError, match="positive"):
        compile_example(example("lstm"), memory_budget=-5, seq_len=T, batch=B)


def test_too_small_a_budget_names_the_smallest_feasible_one():
    with pytest.raises(ValueError, match="smallest feasible budget is") as err:
        compile_example(example("lstm"), memory_budget=1000, seq_len=T, batch=B)
    floor = int(str(err.value).split("smallest feasible budget is ")[1].split()[0])
    plan = compile_example(example("lstm"), memory_budget=floor, seq_len=T, batch=B).plan
    assert plan.peak_bytes(T, B) <= floor
    with pytest.raises(ValueError):
        compile_example(example("lstm"), memory_budget=floor - 1, seq_len=T, batch=B)


def test_budget_picks_the_least_recompute_that_fits():
    none = compile_example(example("lstm"), recompute="none").plan
    roomy = compile_example(example("lstm"), memory_budget=none.peak_bytes(T, B), seq_len=T, batch=B).plan
    assert roomy.segments == (T,) and roomy.recompute_flops(T, B) == 0
    tight = compile_example(example("lstm"), memory_budget=none.peak_bytes(T, B) // 10,
                            seq_len=T, batch=B).plan
    assert len(tight.segments) > 1 and sum(tight.segments) == T
    # every segment but the last is replayed once
    c = tight.costs
    replayed = T - tight.segments[-1]
    assert tight.recompute_flops(T, B) == (T * c.recompute_flops.at(B)
                                           + replayed * (c.pre_flops + c.step_flops).at(B))


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(0.02, 1.2), name=st.sampled_from(["lstm", "gru", "attention_lstm"]),
       length=st.integers(1, 60), batch=st.integers(1, 9), dtype=st.sampled_from(["float32", "float64"]))
def test_a_budgeted_plan_never_exceeds_its_budget(fraction, name, length, batch, dtype):
    none = compile_example(example(name), recompute="none").plan
    budget = max(1, int(fraction * none.peak_bytes(length, batch, dtype)))
    try:
        plan = compile_example(example(name), memory_budget=budget, seq_len=length, batch=batch,
                               dtype=dtype).plan
    except ValueError as err:
        assert "smallest feasible budget" in str(err)
        return
    assert sum(plan.segments) == length
    assert plan.peak_bytes(length, batch, dtype) <= budget
    for shorter in (length // 2, 1):  # a shorter sequence keeps to the budget too
        if shorter:
            assert plan.peak_bytes(shorter, batch, dtype) <= budget


def test_a_budgeted_plan_is_for_its_length():
    plan = compile_example(example("lstm"), memory_budget=20_000, seq_len=T, batch=B).plan
    assert sum(plan.segments_for(T - 7)) == T - 7
    with pytest.raises(ValueError, match=f"seq_len={T + 1}"):
        plan.peak_bytes(T + 1, B)


def test_plan_prints_what_it_decided():
    plan = compile_example(example("lstm"), memory_budget=20_000, seq_len=T, batch=B).plan
    text = str(plan)
    for part in ("stored per step", "recomputed", "segments", f"T={T} B={B}", "peak"):
        assert part in text
    data = plan.as_dict()
    assert data["segments"] == list(plan.segments) and data["stored"] == list(plan.stored)
    assert "stored per step: h, c" in rnnc.driver.emit(read_source(example("lstm")), "plan",
                                                        dims={"D": 3, "H": 4}, recompute="all")


def test_cli_plan_prints_the_table_beside_none_and_all(capsys):
    from rnnc.cli import main
    code = main(["plan", str(example("lstm")), "-D", "D=8", "-D", "H=16", "--seq-len", "20",
                 "--batch", "4", "--recompute", "gates"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recomputed: %2=dot" in out and "stored (state)" in out
    assert "this plan" in out and "none" in out and "all" in out and "T=20, B=4" in out
    code = main(["plan", str(example("lstm")), "-D", "D=8", "-D", "H=16", "--memory-budget", "1kB"])
    assert code == 1 and "smallest feasible budget" in capsys.readouterr().err
    code = main(["plan", str(example("lstm")), "-D", "D=8", "-D", "H=16", "--memory-budget", "64MiB"])
    assert code == 0 and "memory_budget=64.00 MiB" in capsys.readouterr().out


def test_budgets_take_units():
    plan = compile_example(example("lstm"), memory_budget="1MiB", seq_len=T, batch=B).plan
    assert plan.budget == 1 << 20
    for text, value in (("64MiB", 64 << 20), ("2GiB", 2 << 30), ("500kB", 500_000), ("1e6", 10**6),
                        ("77", 77), (2.5e4, 25_000)):
        assert parse_budget(text) == value
    for bad in ("lots", "-3MiB", float("nan"), True):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_budget(bad)


def test_cli_graph_writes_dot_and_says_how_to_render(tmp_path, capsys, monkeypatch):
    from rnnc.cli import main
    dims = ["-D", "D=3", "-D", "H=4"]
    assert main(["graph", str(example("lstm")), *dims, "-o", str(tmp_path / "cell.dot")]) == 0
    text = (tmp_path / "cell.dot").read_text()
    assert text.startswith("digraph") and '"%2" -> "%3"' in text
    assert "#9ecae1" in text and "#fdd0a2" in text  # stored and recomputed values are marked
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["graph", str(example("lstm")), *dims, "-o", str(tmp_path / "g.svg")]) == 1
    assert "apt-get install graphviz" in capsys.readouterr().err
    assert (tmp_path / "g.dot").exists()


def compositions(n):
    """Every way to write n as an ordered sum of positive parts."""
    if n == 0:
        yield ()
        return
    for first in range(1, n + 1):
        for rest in compositions(n - first):
            yield (first,) + rest


@pytest.mark.parametrize("fraction", [0.12, 0.16, 0.2, 0.35, 0.6])
@pytest.mark.parametrize("name", ["lstm", "attention_lstm"])
def test_budget_schedule_is_the_best_segmentation(name, fraction):
    """Against every segmentation of a short sequence, under every per-step
    choice: none that fits the budget replays less than the planner's choice,
    and none fits a budget the planner calls too small."""
    from dataclasses import replace
    steps = 8
    none = compile_example(example(name), recompute="none").plan
    budget = int(fraction * none.peak_bytes(steps, B))
    try:
        chosen = compile_example(example(name), memory_budget=budget, seq_len=steps, batch=B).plan
    except ValueError:
        chosen = None
    fitting = 0
    for policy in ("none", "auto", "all"):
        base = compile_example(example(name), recompute=policy).plan
        for segments in compositions(steps):
            rival = replace(base, segments=segments, seq_len=steps)
            if rival.peak_bytes(steps, B) <= budget:
                fitting += 1
                assert chosen is not None, (policy, segments)
                assert chosen.recompute_flops(steps, B) <= rival.recompute_flops(steps, B), (policy, segments)
    assert (chosen is None) == (fitting == 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6), st.sampled_from([1, 2, 3, 5, 8, math.inf])),
                min_size=1, max_size=20))
def test_min_cut_is_the_least_cut_of_a_small_network(edges):
    """The min-cut against every cut of a network of 7 vertices (source 0,
    sink 6; edges into the sink finite, as a step's store edges make them)."""
    net, capacity = FlowNetwork(), {}
    for u, v, cap in edges:
        if u == v:
            continue
        cap = 4 if v == 6 and cap == math.inf else cap
        net.add(u, v, cap)
        capacity[u, v] = capacity.get((u, v), 0) + cap

    def cut(side):
        return sum(c for (u, v), c in capacity.items() if u in side and v not in side)
    middle = range(1, 6)
    least = min(cut({0, *(v for k, v in enumerate(middle) if mask >> k & 1)}) for mask in range(32))
    side = net.min_cut(0, 6)
    assert 0 in side and 6 not in side
    assert cut(side) == least
