"""Hoisting: split the step into what runs once, for all steps at once, and per step.

- `seq`: values that depend on no input and no state (contexts, params,
  literals: the attention keys `enc @ We`), computed once per sequence.
- `pre`: values that depend on inputs and shared values but on no state and on
  nothing else batched (`x @ W + b`), computed for all T*B rows in one go
  before the loop: one large product instead of T small ones.
- `step`: everything else, run once per time step.

Literals are free, so each region gets its own copy of the ones it reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Cell, Graph, format_graph


@dataclass(frozen=True)
class Hoisted:
    cell: Cell
    seq: Graph  # contexts and params in; values the other regions read out
    pre: Graph  # inputs (rows = T*B) and shared values in; values the step reads out
    step: Graph  # everything a step sees in; next states and outputs out
    nexts: tuple  # (state, the step value that becomes it), in declaration order
    outputs: tuple  # (output, the step value written to it)

    def values(self) -> dict:
        """Every value of the step and of its regions, by name."""
        return {**self.cell.graph.values(), **self.seq.values(), **self.pre.values(),
                **self.step.values()}

    def format(self) -> str:
        return "\n\n".join(format_graph(g, title) for g, title in (
            (self.seq, "once per sequence"), (self.pre, "all steps at once (T*B rows)"),
            (self.step, "per step")))


def classify(cell: Cell) -> dict:
    """Region ('seq', 'pre' or 'step') of every value of the step."""
    # the step index is a value of every row, as an input is; a random draw's other counter values are once per sequence
    region = {d.name: {"input": "pre", "step": "pre", "state": "step"}.get(d.kind, "seq") for d in cell.decls}
    batched = {d.name: d.batched for d in cell.decls}
    for n in cell.nodes:
        batched[n.out] = n.batched
        kinds = {region[a] for a in n.args}
        if "step" in kinds:
            region[n.out] = "step"
        elif "pre" in kinds:
            # rows of `pre` are (t, b) pairs: a batched operand from `seq` has
            # only b rows, so such a node must wait for the step
            mixes_rows = any(region[a] == "seq" and batched[a] for a in n.args)
            region[n.out] = "step" if mixes_rows else "pre"
        else:
            region[n.out] = "seq"
    return region


def hoist(cell: Cell) -> Hoisted:
    """The step's nodes in their three regions, each region a graph of its own
    that reads what earlier regions (or the declarations) give it."""
    region = classify(cell)
    nodes = {name: [n for n in cell.nodes if region[n.out] == name and n.op != "const"]
             for name in ("seq", "pre", "step")}
    consts = {n.out: n for n in cell.nodes if n.op == "const"}
    values = cell.graph.values()
    step_outputs = tuple(v for _, v in cell.nexts) + tuple(v for _, v in cell.outputs)

    def reads(ns, outs=()):
        return {a for n in ns for a in n.args} | set(outs)

    def region_graph(name, outputs):
        own = nodes[name]
        read = reads(own, outputs)
        local = [n for n in consts.values() if n.out in read]
        body = local + own
        produced = {n.out for n in body}
        inputs = [values[v] for v in values if v in read and v not in produced]
        return Graph(tuple(inputs), tuple(_in_order(body, cell)), tuple(outputs))

    def exported(name):
        later = {"seq": ("pre", "step"), "pre": ("step",)}[name]
        read = set().union(*(reads(nodes[r]) for r in later)) | set(step_outputs)
        return tuple(n.out for n in nodes[name] if n.out in read)

    return Hoisted(cell, region_graph("seq", exported("seq")), region_graph("pre", exported("pre")),
                   region_graph("step", step_outputs), cell.nexts, cell.outputs)


def _in_order(nodes, cell: Cell):
    order = {n.out: i for i, n in enumerate(cell.nodes)}
    return sorted(nodes, key=lambda n: order[n.out])
