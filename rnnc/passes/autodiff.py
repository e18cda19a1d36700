"""Reverse-mode autodiff of one region.

A short loop over the region's nodes in reverse: each op's VJP rule (in
rnnc/ops/, beside the op) returns one cotangent per input, and cotangents that
reach the same value are added. The result is a backward region that reads
forward values (the residuals) and the cotangents of the forward outputs, and
gives the cotangents of the requested inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Graph, Value, format_graph, live_nodes
from ..ops import OPS, Builder


def cotangent_name(value: str) -> str:
    return f"d:{value}"


@dataclass(frozen=True)
class Backward:
    graph: Graph  # inputs: residuals, then the cotangents of the forward outputs
    seeds: tuple  # (forward output, cotangent input name)
    grads: tuple  # (forward input, cotangent name or None when it gets none)

    @property
    def residuals(self) -> tuple:
        """The forward values this backward region reads."""
        seeds = {s for _, s in self.seeds}
        return tuple(v.name for v in self.graph.inputs if v.name not in seeds)

    def format(self, title: str) -> str:
        grads = ", ".join(f"{v} <- {g or '0'}" for v, g in self.grads)
        return format_graph(self.graph, title) + f"\n  gives {grads or '(nothing)'}"


def vjp(forward: Graph, wrt: tuple, prefix: str = "%g") -> Backward:
    """The backward region of `forward`: cotangents of `wrt` from those of its outputs.
    New values are named `prefix` + a number."""
    values = forward.values()
    outputs = tuple(dict.fromkeys(forward.outputs))  # an output may be listed twice
    seeds = tuple((o, cotangent_name(o)) for o in outputs)
    builder = Builder({**values, **{s: Value(s, values[o].shape, values[o].batched)
                                    for o, s in seeds}}, prefix=prefix)
    parts = {o: [s] for o, s in seeds}  # value -> cotangent contributions
    for node in reversed(forward.nodes):
        if node.out not in parts or OPS[node.op].vjp is None:
            continue
        g = _total(builder, parts[node.out])
        for arg, ga in zip(node.args, OPS[node.op].vjp(builder, node, g)):
            if ga is not None:
                parts.setdefault(arg, []).append(ga)
    cot = {v: _total(builder, p) for v, p in parts.items() if v in wrt}
    grads = tuple((w, cot.get(w)) for w in wrt)
    given = [g for _, g in grads if g is not None]
    nodes = live_nodes(builder.nodes, given)
    read = {a for n in nodes for a in n.args}
    # literals are free: the backward makes its own rather than storing them
    nodes = [n for n in forward.nodes if n.op == "const" and n.out in read] + nodes
    produced = {n.out for n in nodes}
    # inputs: the forward values it reads or gives as a gradient (residuals), then the seeds
    inputs = [values[v] for v in values if (v in read or v in given) and v not in produced]
    inputs += [builder.values[s] for _, s in seeds]
    return Backward(Graph(tuple(inputs), tuple(nodes), tuple(given)), seeds, grads)


def _total(builder: Builder, parts: list) -> str:
    """The sum of a value's cotangent contributions. When they are the padded
    cotangents of slices that tile an axis (the parts of a `split`), their
    concatenation is the same sum without the zeros."""
    if len(parts) == 1:
        return parts[0]
    pads = [builder.producers.get(p) for p in parts]
    if all(n is not None and n.op == "pad" for n in pads):
        pads.sort(key=lambda n: _order_key(n.attr("before")))
        axis = pads[0].attr("axis")
        edges = [pads[0].attr("before")] + [n.attr("before") + builder.values[n.args[0]].shape[axis]
                                             for n in pads]
        tiles = (edges[0] == 0 and edges[-1] == builder.values[parts[0]].shape[axis]
                 and all(n.attr("axis") == axis and n.attr("before") == e for n, e in zip(pads, edges)))
        if tiles:
            return builder.emit("concat", *(n.args[0] for n in pads), axis=axis)
    total = parts[0]
    for p in parts[1:]:
        total = builder.add(total, p)
    return total


def _order_key(size) -> float:
    """A number that orders sizes the way they compare for any large dims."""
    value = size.bind({s: 10**6 for s in size.symbols})
    return float(sum(value.terms.values()))
