"""The schedule (rnnc/passes/schedule.py): one list of events per call, which
both backends interpret; here its shape, and `rnnc emit --stage schedule`.
tests/test_memory.py checks that the NumPy backend holds the bytes it
counts, tests/test_cuda_emulated.py that the CUDA runtime does."""
import re

import pytest

import rnnc

from conftest import EXAMPLES, compile_sized, declared_dims, example, run_rnnc

DIMS = {"D": 4, "H": 6, "E": 3, "S": 5, "P": 2}
T, B = 20, 3


def budgeted(path, percent, T=T):
    none = compile_sized(path, DIMS, recompute="none").plan
    return compile_sized(path, DIMS, memory_budget=none.peak_bytes(T, B) * percent // 100, seq_len=T, batch=B)


def kinds(schedule) -> list:
    return [str(e) for e in schedule.events]


def test_a_budgeted_training_call_checkpoints_replays_and_frees_everything():
    plan = budgeted(example("lstm"), 25).plan
    k = len(plan.segments)
    assert k >= 3
    events = plan.schedule(T, B).events
    last = k - 1
    assert kinds(plan.schedule(T, B)) == (
        ["seq"] + [f"{kind} {j}" for j in range(last) for kind in ("checkpoint", "forward")] + [f"forward {last}"]
        + [f"backward {last}", f"param_grads {last}"]
        + [f"{kind} {j}" for j in reversed(range(last)) for kind in ("replay", "backward", "param_grads")]
        + ["backward_seq"])
    forward = [e for e in events if e.kind == "forward"]
    assert [(e.start, e.stop) for e in forward] == [(sum(plan.segments[:j]), sum(plan.segments[:j + 1]))
                                                   for j in range(k)]
    # a buffer is made while not held and freed while held (a replay frees the
    # checkpoint it starts from first), and nothing is held at the end
    live = set()
    for e in events:
        for b in [e.restores] if e.restores else []:
            live.remove(b.key)
        for b in e.allocs:
            assert b.key not in live, (str(e), str(b))
            live.add(b.key)
        for b in e.frees:
            live.remove(b.key)
    assert not live


@pytest.mark.parametrize("policy", ["none", "all", "budget"])
def test_inference_runs_the_forward_events_without_checkpoints_or_tape(policy):
    program = budgeted(example("gru"), 30) if policy == "budget" else compile_sized(example("gru"), DIMS, recompute=policy)
    train, infer = program.plan.schedule(T, B), program.plan.schedule(T, B, train=False)
    forward = [e for e in train.events if e.kind in ("seq", "forward")]
    assert [(e.kind, e.segment, e.start, e.stop) for e in infer.events] == [
        (e.kind, e.segment, e.start, e.stop) for e in forward]
    assert not [b for e in infer.events for b in e.allocs if b.role in ("tape", "checkpoint")]
    assert infer.stored_bytes == 0 < train.stored_bytes
    assert infer.peak_bytes <= train.stored_bytes


def test_a_shorter_sequence_drops_steps_from_the_first_segments():
    plan = budgeted(example("lstm"), 25).plan
    short = plan.schedule(T - 7, B)
    lengths = [e.stop - e.start for e in short.events if e.kind == "forward"]
    assert sum(lengths) == T - 7 and lengths[-1] == plan.segments[-1]
    assert short.peak_bytes <= plan.peak_bytes(T, B)


def test_no_steps_runs_the_once_per_sequence_region_forward_and_backward():
    plan = compile_sized(example("attention_lstm"), DIMS).plan
    assert kinds(plan.schedule(0, B)) == ["seq", "backward_seq"]
    assert kinds(plan.schedule(0, B, train=False)) == ["seq"]
    assert plan.schedule(0, B, train=False).held_bytes()[-1] > 0 == plan.schedule(0, B, train=False).stored_bytes


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_emit_prints_the_schedule_of_any_policy_and_budget(path):
    dims = [f"-D{k}={v}" for k, v in declared_dims(path, DIMS).items()]
    budget = compile_sized(path, DIMS, recompute="none").plan.peak_bytes(12, 2) * 30 // 100
    for options in (["--recompute", "all"], ["--recompute", "none"], ["--memory-budget", str(budget)]):
        done = run_rnnc("emit", str(path), "--stage", "schedule", *dims, "--seq-len", "12", "--batch", "2",
                        *options)
        if done.returncode and "smallest feasible budget" in done.stderr:
            continue  # a budget some cell cannot fit
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("schedule for T=12, B=2, float32, training")
        replays = sum(line.split()[0] == "replay" for line in lines[1:])
        segments = sum(line.split()[0] == "forward" for line in lines[1:])
        assert replays == segments - 1 and "backward_seq" in done.stdout
        assert "budget" not in options[0] or segments > 1


def test_the_schedule_stage_needs_a_call_size():
    source = rnnc.driver.read_source(example("lstm"))
    with pytest.raises(ValueError, match="seq_len=T and batch=B"):
        rnnc.driver.emit(source, "schedule", dims={"D": 2, "H": 3})
    text = rnnc.driver.emit(source, "schedule", dims={"D": 2, "H": 3}, seq_len=4, batch=2)
    assert "forward 0      0..3" in text


def test_the_schedule_and_the_plan_say_how_cuda_runs_each_events_steps():
    """The LSTM's step is one kernel forward (the product, then its gates) and two
    backward: each event's steps in one persistent launch."""
    source = rnnc.driver.read_source(example("lstm"))
    text = rnnc.driver.emit(source, "schedule", dims={"D": 2, "H": 3}, seq_len=4, batch=2)
    forms = text[text.index("cuda: the steps of each event"):].splitlines()
    assert re.fullmatch(r"  forward, replay: persistent: one launch runs all the event's steps, 1 kernel a step, "
                        r"a grid barrier after each; \d+ bytes of shared memory a block; "
                        r"params kept in shared memory across steps by rnnc_step_\d+_dot", forms[1]), forms[1]
    assert forms[2].startswith("  backward: persistent: one launch runs all the event's steps, 2 kernels a step")
    assert re.search(r"params kept in shared memory across steps by rnnc_bwd_\d+_dot", forms[2]), forms[2]
    done = run_rnnc("plan", str(example("lstm")), "-DD=2", "-DH=3")
    assert done.returncode == 0 and "\n".join(forms[:3]) in done.stdout, done.stdout
    huge = {"D": 4, "H": 20000}  # U: 1.6e9 elements, past the kernels' int indices; the NumPy backend runs it
    says = "cuda: no kernels (cuda: 'param:U' has 1,600,000,000 elements"
    assert says in rnnc.driver.emit(source, "schedule", dims=huge, seq_len=4, batch=2)
    done = run_rnnc("plan", str(example("lstm")), *(f"-D{k}={v}" for k, v in huge.items()))
    assert done.returncode == 0 and says in done.stdout
