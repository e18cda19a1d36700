"""The recompute planner: which forward values the backward step stores, and
which it recomputes from what is stored.

The backward step reads some forward values of the step (its residuals). A
policy chooses a set of step values to store for every step; `make_plan`
derives the forward nodes the backward must rerun to rebuild the rest. Policy
(choosing) is kept apart from mechanism (deriving and applying the choice),
as JAX's checkpoint policies do.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph, Node
from ..ops import OPS, numel
from .autodiff import Backward
from .hoist import Hoisted

POLICIES = ("none", "all", "auto")


@dataclass(frozen=True)
class Plan:
    policy: str
    residuals: tuple  # step values the backward step reads
    stored: tuple  # step values kept for every step
    recompute: tuple  # step nodes the backward step reruns, in forward order

    def format(self) -> str:
        lines = [f"plan (recompute={self.policy})",
                 f"  residuals: {', '.join(self.residuals) or '(none)'}",
                 f"  stored per step: {', '.join(self.stored) or '(none)'}",
                 f"  recomputed: {', '.join(n.out for n in self.recompute) or '(none)'}"]
        return "\n".join(lines)

    __str__ = format


def step_candidates(hoisted: Hoisted) -> tuple:
    """Step values that could be stored: the states before the step and every node result."""
    states = tuple(d.name for d in hoisted.cell.of_kind("state"))
    return states + tuple(n.out for n in hoisted.step.nodes if n.op != "const")


def residuals_of(hoisted: Hoisted, backward: Backward) -> tuple:
    candidates = set(step_candidates(hoisted))
    return tuple(r for r in backward.residuals if r in candidates)


def rerun_for(step: Graph, wanted: set, stored: set) -> tuple:
    """The step nodes that rebuild `wanted` from `stored` values and the step's inputs."""
    producer = step.producers()
    needed, order = set(), []

    def visit(name):
        if name in stored or name in needed or name not in producer:
            return
        needed.add(name)
        for a in producer[name].args:
            visit(a)

    for w in wanted:
        visit(w)
    return tuple(n for n in step.nodes if n.out in needed)


def choose_stored(policy, hoisted: Hoisted, residuals: tuple) -> set:
    """The policy's choice of values to store per step."""
    states = {d.name for d in hoisted.cell.of_kind("state")}
    if policy == "none":
        return set(residuals)
    if policy == "all":
        return states
    if policy == "auto":
        return _auto(hoisted, residuals, states)
    names = [policy] if isinstance(policy, str) else list(policy)
    unknown = [n for n in names if n not in residuals]
    if unknown:
        raise ValueError(f"recompute: {', '.join(map(repr, unknown))} is not a value the backward "
                         f"step reads; recompute one of: {', '.join(r for r in residuals if r not in states)} "
                         f"or a policy ({', '.join(POLICIES)})")
    if any(n in states for n in names):
        raise ValueError(f"recompute: states cannot be recomputed ({', '.join(n for n in names if n in states)})")
    return set(residuals) - set(names)


def _auto(hoisted: Hoisted, residuals: tuple, states: set) -> set:
    """Keep products and reductions; recompute cheap elementwise chains."""
    keep = {n.out for n in hoisted.step.nodes if not OPS[n.op].elementwise and n.op != "slice"}
    return states | (set(residuals) & keep)


def make_plan(hoisted: Hoisted, backward: Backward, policy="auto") -> Plan:
    if isinstance(policy, str) and policy not in POLICIES and policy not in step_candidates(hoisted):
        raise ValueError(f"recompute: unknown policy {policy!r}; use one of {', '.join(POLICIES)} "
                         "or a list of value names")
    residuals = residuals_of(hoisted, backward)
    # states are always stored: nothing earlier in the step can rebuild them
    stored = choose_stored(policy, hoisted, residuals) | {d.name for d in hoisted.cell.of_kind("state")}
    recompute = rerun_for(hoisted.step, set(residuals) - stored, stored)
    # store only what the backward or the recomputation actually reads
    read = set(residuals) | {a for n in recompute for a in n.args}
    order = step_candidates(hoisted)
    stored_list = tuple(v for v in order if v in stored and v in read)
    name = policy if isinstance(policy, str) else "manual"
    return Plan(name, residuals, stored_list, recompute)
