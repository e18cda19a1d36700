"""The step IR: a small frozen SSA graph with shapes.

Every value is assigned once. A value is *batched* when it has the hidden
batch axis (inputs, contexts, states and anything computed from them) and
*shared* when it does not (params, literals and values computed only from
them). Shapes are per example: the batch axis never appears in them.

Names the user wrote are kept as they are; names the compiler makes contain a
character no identifier can (`%3`, `d:h`), so they never collide.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import Pos
from .shapes import Shape, shape_str


@dataclass(frozen=True)
class Value:
    """A value that enters a graph from outside (a declaration or an interface)."""

    name: str
    shape: Shape
    batched: bool


@dataclass(frozen=True)
class Node:
    """`out = op(args...)` with attributes; `shape` is the result's per-example shape."""

    out: str
    op: str
    args: tuple
    attrs: tuple = ()  # sorted (key, value) pairs, hashable
    shape: Shape = ()
    batched: bool = True
    pos: Pos | None = field(default=None, compare=False)

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    @property
    def value(self) -> Value:
        return Value(self.out, self.shape, self.batched)


@dataclass(frozen=True)
class Graph:
    """A straight-line SSA region: values in, nodes in order, values out."""

    inputs: tuple  # of Value
    nodes: tuple  # of Node, topologically ordered
    outputs: tuple  # of value names

    def values(self) -> dict:
        """Every value of the region by name, inputs and node results."""
        table = {v.name: v for v in self.inputs}
        table.update((n.out, n.value) for n in self.nodes)
        return table

    def producers(self) -> dict:
        return {n.out: n for n in self.nodes}


def live_nodes(nodes, roots) -> list:
    """The nodes that some root needs, directly or through other nodes, in order."""
    needed, live = set(roots), []
    for n in reversed(nodes):
        if n.out in needed:
            live.append(n)
            needed.update(n.args)
    return list(reversed(live))


@dataclass(frozen=True)
class Decl:
    """A declared input, context, state or param of a cell."""

    kind: str  # input context state param, or a random draw's counter: key example step
    name: str
    shape: Shape
    init: float | None = None  # params only; None means uniform(+-1/sqrt(fan_in))
    pos: Pos | None = field(default=None, compare=False)

    @property
    def batched(self) -> bool:
        return self.kind not in ("param", "key")

    @property
    def value(self) -> Value:
        return Value(self.name, self.shape, self.batched)


@dataclass(frozen=True)
class Cell:
    """One checked time step: declarations, the step graph, where states and outputs come from."""

    name: str
    dims: tuple  # (name, int or None) in declaration order
    decls: tuple  # of Decl
    nodes: tuple  # of Node
    nexts: tuple  # (state name, value name) per state, in declaration order
    outputs: tuple  # (output name, value name)

    def of_kind(self, kind: str) -> tuple:
        return tuple(d for d in self.decls if d.kind == kind)

    @property
    def graph(self) -> Graph:
        """The step as one region: declarations in, next states and outputs out."""
        outs = tuple(v for _, v in self.nexts) + tuple(v for _, v in self.outputs)
        return Graph(tuple(d.value for d in self.decls), self.nodes, outs)


# --- printing ---------------------------------------------------------------
def _fmt_attr(value) -> str:
    if isinstance(value, tuple):
        return shape_str(value) if value and not isinstance(value[0], (int, str)) else repr(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_node(n: Node) -> str:
    parts = list(n.args) + [f"{k}={_fmt_attr(v)}" for k, v in n.attrs]
    kind = "" if n.batched else "  (shared)"
    return f"{n.out}{shape_str(n.shape)} = {n.op}({', '.join(parts)}){kind}"


def format_graph(g: Graph, title: str) -> str:
    lines = [f"{title}:"]
    for v in g.inputs:
        lines.append(f"  in  {v.name}{shape_str(v.shape)}{'' if v.batched else '  (shared)'}")
    lines += ["  " + format_node(n) for n in g.nodes]
    lines.append(f"  out {', '.join(g.outputs) if g.outputs else '(none)'}")
    return "\n".join(lines)


def format_cell(cell: Cell) -> str:
    dims = " ".join(f"{k}={v}" if v is not None else k for k, v in cell.dims)
    lines = [f"cell {cell.name}  dims {dims}"]
    for d in cell.decls:
        init = "" if d.kind != "param" else (f" = {d.init!r}" if d.init is not None else " = uniform")
        lines.append(f"  {d.kind:<7} {d.name}{shape_str(d.shape)}{init}")
    lines += ["  " + format_node(n) for n in cell.nodes]
    lines += [f"  next {s} = {v}" for s, v in cell.nexts]
    lines += [f"  output {o} = {v}" for o, v in cell.outputs]
    return "\n".join(lines)
