"""Region lowering: an ordered list of IR nodes as kernels and their launches.

A region's nodes are split into phases: a breaking node (an op whose CUDA
lowering is a `Kernel` of its own: a product, a reduction or a softmax) needs
all of its arguments before it starts, so it ends the phase its arguments come from. Each phase is one
elementwise kernel that stores the values needed later (by a breaking node,
a later phase or after the region) and inlines the rest; each breaking node is
a kernel of its own. A value stored in a 16-bit buffer is rounded where it is
made: the expressions that inline it read the rounded value too, as a later
kernel loading it does (rnnc/dtypes.py).
"""
from __future__ import annotations

from ...ops import OPS, Kernel
from ...shapes import concrete_shape
from .cexpr import Ref
from .elementwise import loop_for
from .kernels import Generator


def breaking(n) -> bool:
    """Whether node `n` is a kernel of its own."""
    return isinstance(OPS[n.op].cuda, Kernel)


class Region:
    """Lowers an ordered list of nodes into phases and breaking kernels.

    `resolve_external(name)` gives the Ref of a value the nodes read but do not
    make; `home(name, node)` gives where a materialised node result lives.
    `exports` are the node results needed after the region (they are stored
    even when fusible).
    """

    def __init__(self, gen: Generator, label: str, rows: str, nodes, exports, resolve_external, home,
                 accumulate=()):
        self.gen, self.label, self.rows = gen, label, rows
        self.nodes = list(nodes)
        self.producer = {n.out: n for n in self.nodes}
        self.external, self.home = resolve_external, home
        self.accumulate = set(accumulate)  # nodes whose home is added to, not overwritten
        reads_breaking = {a for n in self.nodes if breaking(n) for a in n.args}
        self.materialised = {n.out for n in self.nodes
                             if breaking(n) or n.out in reads_breaking or n.out in exports}
        self.level = self._levels()
        self.launches: list = []

    def _levels(self) -> dict:
        level = {}
        for n in self.nodes:
            base = max((level.get(a, 0) for a in n.args), default=0)
            level[n.out] = base + 1 if breaking(n) else base
        return level

    def ref(self, name: str) -> Ref:
        if name in self.producer:
            return self.home(name, self.producer[name])
        return self.external(name)

    def narrow(self, name: str) -> str | None:
        """The 16-bit C type a node's result is stored in, if it is."""
        if name not in self.materialised:
            return None
        elem = self.ref(name).elem
        return None if elem == "float" else elem

    def resolver(self, level: int):
        """Inside the phase at `level`: results of earlier kernels are loaded,
        fusible nodes of this level are inlined."""
        def resolve(name):
            n = self.producer.get(name)
            if n is None or breaking(n) or (name in self.materialised and self.level[name] < level):
                return self.ref(name)
            return n
        return resolve

    def lower(self) -> list:
        top = max(self.level.values(), default=0)
        for level in range(top + 1):
            for n in self.nodes:
                if breaking(n) and self.level[n.out] == level:
                    self.breaking(n)
            stores = [n for n in self.nodes if not breaking(n) and n.out in self.materialised
                      and self.level[n.out] == level]
            if stores:
                self.phase(level, stores)
        return self.launches

    def phase(self, level: int, stores):
        loops: dict = {}
        resolve = self.resolver(level)
        for n in stores:
            loop = loop_for(loops, concrete_shape(n.shape), n.batched, resolve, self.narrow)
            value = loop.node(n, loop.row, loop.index)
            loop.store(self.ref(n.out), value, "+=" if n.out in self.accumulate else "=")
        self.gen.elementwise(self, f"phase{level}", list(loops.values()),
                             comments=[f"{n.out} = {n.op}({', '.join(n.args)})" for n in stores])

    def breaking(self, n):
        op = "+=" if n.out in self.accumulate else "="
        self.gen.breaking(self, n, [self.ref(a) for a in n.args], self.ref(n.out), op,
                          f"{n.out} = {n.op}({', '.join(n.args)})")
