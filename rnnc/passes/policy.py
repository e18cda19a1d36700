"""The per-step choice: which step values the backward stores, and which
forward nodes the backward step reruns to rebuild the rest.

The backward step reads some forward values of the step (its residuals). A
policy chooses which step values to store for every step; `per_step_plan`
derives the forward nodes the backward step reruns to rebuild the rest.
Policies: `none` (store every residual), `all` (store only the states),
`auto` (a min-cut over a cost model of bytes and flops, as PyTorch's
AOTAutograd partitioner) and a list of names to recompute. Policy (choosing)
is kept apart from mechanism (deriving and applying the choice), as JAX's
checkpoint policies are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir import Graph
from ..ops import OPS, numel
from .costs import node_flops
from .hoist import Hoisted
from .mask import VALID
from .mincut import FlowNetwork

POLICIES = ("none", "all", "auto")

# The cost model of `auto`, in flop-equivalents. Storing an element costs a
# write in the forward, a read in the backward and the memory between them;
# we price it like 8 flops, so cheap elementwise work (sigmoid: 4 flops per
# element) is recomputed and a product over a fan-in (2*K flops per element)
# is kept. Ops the registry marks `recompute=False` (products) are never
# recomputed: their cost grows with the fan-in, which a per-element price hides.
STORE_COST = 8


def state_names(hoisted: Hoisted) -> tuple:
    return tuple(d.name for d in hoisted.cell.of_kind("state"))


def step_candidates(hoisted: Hoisted) -> tuple:
    """Step values that could be stored: the states before the step and every node result."""
    return state_names(hoisted) + recompute_candidates(hoisted)


def recompute_candidates(hoisted: Hoisted) -> tuple:
    """Names a manual list may give: every step value but the states, literals
    and the lengths mask's selects of the step's results (which nothing reads)."""
    return tuple(n.out for n in hoisted.step.nodes if n.op != "const" and VALID not in n.args)


def rerun_for(step: Graph, wanted, stored: set) -> tuple:
    """The step nodes that rebuild `wanted` from `stored` values and the step's inputs."""
    producer = step.producers()
    needed = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in stored or name in needed or name not in producer:
            continue
        needed.add(name)
        todo.extend(producer[name].args)
    return tuple(n for n in step.nodes if n.out in needed)


def choose_none(hoisted: Hoisted, residuals: tuple) -> set:
    return set(residuals)


def choose_all(hoisted: Hoisted, residuals: tuple) -> set:
    return set(state_names(hoisted))


def choose_auto(hoisted: Hoisted, residuals: tuple) -> set:
    """The cheapest set to store by the cost model: a minimum s-t cut.

    Each step node v becomes an edge v.in -> v.out of capacity STORE_COST *
    elements(v) (cut: v is stored); source -> v.in has capacity flops(v) (cut:
    v is rerun in the backward; infinite for products); u.out -> v.in is
    infinite for every argument u; residual.out -> sink is infinite. The
    step's inputs (states, hoisted values, params) are available to the
    backward anyway and stay out of the graph."""
    step = hoisted.step
    values = step.values()
    nodes = [n for n in step.nodes if n.op != "const"]
    net = FlowNetwork()
    for n in nodes:
        net.add((n.out, "in"), (n.out, "out"), STORE_COST * numel(n.shape))
        recompute = node_flops(n, values).per_example if OPS[n.op].recompute else math.inf
        net.add("source", (n.out, "in"), recompute)
        for a in n.args:
            if (a, "out") in net.nodes:
                net.add((a, "out"), (n.out, "in"), math.inf)
    for r in residuals:
        if (r, "out") in net.nodes:
            net.add((r, "out"), "sink", math.inf)
    source_side = net.min_cut("source", "sink")
    stored = {n.out for n in nodes if (n.out, "in") in source_side and (n.out, "out") not in source_side}
    return stored | set(state_names(hoisted))


def choose_manual(hoisted: Hoisted, residuals: tuple, names: list) -> set:
    """Recompute the named values, as Caffe2's `recurrent_net` recomputes the
    blobs its `recompute_blobs_on_backward` names.

    A name the user wrote stands for its whole statement: its compiler-made
    intermediates (`%3`) are recomputed with it, so `recompute=["gates"]`
    reruns `gates = x @ W + h @ U + b`, product included. Everything computed
    from a recomputed value is recomputed too; the rest is stored."""
    candidates = recompute_candidates(hoisted)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        states = set(state_names(hoisted))
        why = ("states are always stored" if all(n in states for n in unknown)
               else "not a value of the step")
        raise ValueError(f"recompute: {', '.join(map(repr, unknown))}: {why}; recompute one of: "
                         f"{', '.join(candidates)} (or a policy: {', '.join(POLICIES)})")
    producer = hoisted.step.producers()
    banned, todo = set(), list(names)
    while todo:  # the named values and their compiler-made intermediates
        name = todo.pop()
        if name in banned or name not in producer:
            continue
        banned.add(name)
        todo.extend(a for a in producer[name].args if not a.isidentifier())
    for n in hoisted.step.nodes:  # and everything computed from them
        if any(a in banned for a in n.args):
            banned.add(n.out)
    needed = rerun_for(hoisted.step, [r for r in residuals if r in banned], set())
    frontier = {a for n in needed if n.out in banned for a in n.args if a not in banned}
    return ({r for r in residuals if r not in banned} | frontier | set(state_names(hoisted)))


@dataclass(frozen=True)
class PerStep:
    policy: str
    residuals: tuple
    stored: tuple
    recompute: tuple


def per_step_plan(hoisted: Hoisted, step_backward, policy) -> PerStep:
    """Apply a policy: the values stored per step and the nodes the backward reruns."""
    candidates = set(step_candidates(hoisted))
    residuals = tuple(r for r in step_backward.residuals if r in candidates)
    if isinstance(policy, str) and policy not in POLICIES:  # "gates,c_new", as a command line gives it
        policy = [name.strip() for name in policy.split(",") if name.strip()]
    if isinstance(policy, str):
        choice = {"none": choose_none, "all": choose_all, "auto": choose_auto}[policy](hoisted, residuals)
        name = policy
    elif isinstance(policy, (list, tuple)) and all(isinstance(n, str) for n in policy):
        choice, name = choose_manual(hoisted, residuals, list(policy)), "[" + ", ".join(policy) + "]"
    else:
        raise ValueError(f"recompute: unknown policy {policy!r}; use one of {', '.join(POLICIES)} "
                         f"or a list of value names to recompute (from: "
                         f"{', '.join(recompute_candidates(hoisted))})")
    # states are always stored: nothing earlier in the step can rebuild them
    states = set(state_names(hoisted))
    stored = choice | states
    recompute = rerun_for(hoisted.step, [r for r in residuals if r not in stored], stored)
    # store only what the backward step or the recomputation actually reads
    read = set(residuals) | {a for n in recompute for a in n.args}
    # (states always: a replayed segment's checkpoint becomes its first step's states)
    kept = tuple(v for v in step_candidates(hoisted) if v in stored and (v in read or v in states))
    return PerStep(name, residuals, kept, recompute)
