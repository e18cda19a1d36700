"""The lengths mask, as IR: a padded step has no effect at all.

With `lengths`, batch element b runs steps 0..lengths[b]-1 of its sequence
and is padding after them, as in PyTorch's packed sequences: its outputs are
0 past its length, its final states those at its length, and its gradients
those of the unpadded sequence, whatever the padding holds. Both backends
still compute every step of every element (a padded row costs what any row
costs), so this pass inserts, once, the selects that make the padded rows
count for nothing. `%valid` is 1 where step t lies inside element b's
sequence and 0 past it (a per-row value the backends make from `lengths`):

- the step's outputs are `select(%valid, y, 0)` and its next states
  `select(%valid, s_new, s)`;
- the step backward reads the cotangents of the outputs at step t and of the
  states after it (`dout:y`, `dnext:h`) and makes each step result's
  cotangent from them, 0 on a padded row; a state's cotangent before the step
  is `select(%valid, g, dnext:h)`, passing through a padded row unchanged;
- every cotangent a step or row gives back (of an input, a hoisted value, a
  context) is selected to 0 on padded rows, and so is every batched operand
  of a sum over the rows (a parameter's gradient: dW = x^T dg), in the step
  backward and in the backward of the hoisted all-steps region.

Always a select, never a product with a 0/1 mask: a padded row may hold NaN
or inf (0/0 from a normalisation of zero padding, or whatever the caller
left in the padding), and 0 * NaN is NaN. Mathematically every cotangent on
a padded row is 0 already; the selects only keep what a padded row computes
from reaching anything else. Without lengths every row is valid and the
NumPy backend runs each select as the value it selects.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import Graph, Value, format_graph, live_nodes
from ..ops import OPS, Builder
from .autodiff import Backward
from .hoist import Hoisted

VALID = "%valid"
VALID_VALUE = Value(VALID, (), True)


def mask(hoisted: Hoisted, grads: dict) -> tuple:
    """The step and the step and all-steps backward regions with the lengths
    mask inserted: (Hoisted, grads) of the same kinds as given."""
    step, nexts, outputs = mask_step(hoisted)
    masked = replace(hoisted, step=step, nexts=nexts, outputs=outputs)
    step_backward = mask_step_backward(grads["step"], hoisted, nexts, outputs)
    pre = grads["pre"]
    pre_backward = mask_backward(pre, Builder({**pre.graph.values(), VALID: VALID_VALUE}, prefix="%pre:mask"),
                                 safe={s for _, s in pre.seeds})
    return masked, {**grads, "step": step_backward, "pre": pre_backward}


def mask_step(hoisted: Hoisted) -> tuple:
    """The step with its results selected: (graph, nexts, outputs)."""
    step, states = hoisted.step, {d.name: d.value for d in hoisted.cell.of_kind("state")}
    values = step.values()
    inputs = step.inputs + tuple(v for s, v in states.items() if s not in values) + (VALID_VALUE,)
    b = Builder({**values, **states, VALID: VALID_VALUE}, prefix="%mask:")
    zero = b.const(0)
    nexts = tuple((s, b.emit("select", VALID, v, s, name=f"%next:{s}")) for s, v in hoisted.nexts)
    outputs = tuple((o, b.emit("select", VALID, v, zero, name=f"%output:{o}")) for o, v in hoisted.outputs)
    results = tuple(v for _, v in nexts + outputs)
    return Graph(inputs, step.nodes + tuple(b.nodes), results), nexts, outputs


def cotangent_input(kind: str, name: str) -> str:
    """The step backward's input for the cotangent of output `name` at the step
    (kind "out") or of state `name` after it (kind "next")."""
    return f"d{kind}:{name}"


def mask_step_backward(backward: Backward, hoisted: Hoisted, nexts: tuple, outputs: tuple) -> Backward:
    """The step backward reading `dout:y` and `dnext:h`, with the mask (see the module doc)."""
    graph, forward = backward.graph, hoisted.step.values()
    states = {d.name: d.value for d in hoisted.cell.of_kind("state")}
    given = {name: Value(name, shape, True) for name, shape in
             [(cotangent_input("next", s), states[s].shape) for s, _ in hoisted.nexts]
             + [(cotangent_input("out", o), forward[v].shape) for o, v in hoisted.outputs]}
    b = Builder({**forward, **graph.values(), **given, VALID: VALID_VALUE}, prefix="%step:mask")
    # each step result's cotangent: what its outputs and next states give, 0 on padded rows
    zero = b.const(0)
    for value, seed in backward.seeds:
        terms = [cotangent_input("out", o) for o, v in hoisted.outputs if v == value]
        terms += [cotangent_input("next", s) for s, v in hoisted.nexts if v == value]
        total = terms[0]
        for t in terms[1:]:
            total = b.add(total, t)
        target = b.values[value]
        if target.batched:
            b.emit("select", VALID, total, zero, name=seed)
        else:  # a step result of params alone (`output pb = b`): its cotangent sums over the batch
            b.emit("reduce_to", b.emit("select", VALID, total, zero), shape=tuple(target.shape),
                   batched=False, src_batched=True, name=seed)
    seeds = {s for _, s in backward.seeds}
    inputs = tuple(v for v in graph.inputs if v.name not in seeds) + (VALID_VALUE,) + tuple(given.values())
    unmasked = Backward(Graph(inputs, graph.nodes, graph.outputs), (), backward.grads)
    masked = mask_backward(unmasked, b, safe=seeds | set(states), skip=set(states), zero=zero)
    # a state's cotangent before the step passes a padded row unchanged
    grads = dict(masked.grads)
    for s in states:
        grads[s] = b.emit("select", VALID, grads.get(s) or zero, cotangent_input("next", s))
    # (every state, the ones no step value reads too: `next s = b`)
    final = tuple((w, grads[w]) for w in dict.fromkeys([w for w, _ in backward.grads] + list(states)))
    results = tuple(dict.fromkeys(g for _, g in final if g))
    return Backward(Graph(inputs, tuple(live_nodes(b.nodes, results)), results),
                    tuple((v, cotangent_input("next", s)) for s, v in nexts)
                    + tuple((v, cotangent_input("out", o)) for o, v in outputs), final)


def mask_backward(backward: Backward, b: Builder, safe: set, skip=frozenset(), zero=None) -> Backward:
    """`backward` with every batched cotangent it gives back (but those of
    `skip`) and every batched operand of a sum over the rows selected to 0 on
    padded rows, unless `safe` (0 there already, or finite: states). Each such
    value is selected once, right after it is made, and read selected from then
    on. The nodes go after those `b` holds (`zero` among them, when given)."""
    graph, values = backward.graph, b.values
    safe = set(safe) | {VALID}

    def sums_rows(n) -> bool:
        return not n.batched and OPS[n.op].sums_rows and any(values[a].batched for a in n.args)
    wanted = {a for n in graph.nodes if sums_rows(n) for a in n.args}
    wanted |= {g for w, g in backward.grads if g and w not in skip}
    wanted = {v for v in wanted if values[v].batched and v not in safe}
    renamed = {}

    def select(name):
        nonlocal zero
        zero = zero or b.const(0)
        renamed[name] = b.emit("select", VALID, name, zero)
    for v in graph.inputs:
        if v.name in wanted:
            select(v.name)
    for n in graph.nodes:
        b.emit(n.op, *(renamed.get(a, a) for a in n.args), name=n.out, **dict(n.attrs))
        if n.out in wanted:
            select(n.out)
    grads = tuple((w, renamed.get(g, g) if g else g) for w, g in backward.grads)
    inputs = graph.inputs + (() if VALID in graph.values() else (VALID_VALUE,))
    results = tuple(dict.fromkeys(g for _, g in grads if g))
    return Backward(Graph(inputs, tuple(live_nodes(b.nodes, results)), results), backward.seeds, grads)


def format_masked(hoisted: Hoisted, grads: dict) -> str:
    """What `rnnc emit --stage mask` prints: the masked step and backward regions."""
    return "\n\n".join([format_graph(hoisted.step, "per step, masked"),
                        grads["step"].format("backward of step, masked"),
                        grads["pre"].format("backward of pre, masked")])
