"""The Builder: how the checker and the derivative rules add nodes to a region."""
from __future__ import annotations

from ..ir import Node
from .registry import OPS


class Builder:
    """Appends nodes to a region, inferring each result's shape and batchedness."""

    def __init__(self, values: dict, prefix: str = "%"):
        self.values = dict(values)  # name -> Value
        self.nodes: list[Node] = []
        self.producers: dict[str, Node] = {}  # name -> the node of `nodes` that makes it
        self.prefix = prefix
        self.counter = 0

    def fresh(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"

    def emit(self, op: str, *args: str, name: str | None = None, pos=None, **attrs) -> str:
        opdef = OPS[op]
        arg_values = [self.values[a] for a in args]
        shape = opdef.shape([v.shape for v in arg_values], attrs)
        flags = [v.batched for v in arg_values]
        batched = opdef.batched(flags, attrs) if opdef.batched else any(flags)
        node = Node(name or self.fresh(), op, tuple(args), tuple(sorted(attrs.items())),
                    tuple(shape), batched, pos)
        self.nodes.append(node)
        self.producers[node.out] = node
        self.values[node.out] = node.value
        return node.out

    # shorthands for derivative rules
    def const(self, value: float) -> str:
        return self.emit("const", value=float(value))

    def add(self, a, b): return self.emit("add", a, b)
    def sub(self, a, b): return self.emit("sub", a, b)
    def mul(self, a, b): return self.emit("mul", a, b)
    def div(self, a, b): return self.emit("div", a, b)
    def neg(self, a): return self.emit("neg", a)
    def gt(self, a, b): return self.emit("gt", a, b)

    def reduce_to(self, g: str, like: str) -> str:
        """Sum the cotangent `g` down to the shape and batchedness of value `like`."""
        gv, target = self.values[g], self.values[like]
        if gv.shape == target.shape and gv.batched == target.batched:
            return g
        return self.emit("reduce_to", g, shape=tuple(target.shape), batched=target.batched,
                         src_batched=gv.batched)
