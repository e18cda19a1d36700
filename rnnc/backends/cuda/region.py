"""Region lowering: an ordered list of IR nodes as kernels and their launches.

A region's nodes are split into levels: a breaking node (an op whose CUDA
lowering is a `Kernel` of its own: a product, a reduction or a softmax) needs
all of its arguments before it starts, so it ends the phase its arguments
come from. A level is its breaking kernels, then its phase: elementwise work
that stores the values needed later (by a breaking node, a later phase or
after the region) and inlines the rest. A value stored in a 16-bit buffer is
rounded where it is made: the expressions that inline it read the rounded
value too, as a later kernel loading it does (rnnc/dtypes.py).

Each kernel is a body (`kernels.Part`); launches cost the host more than
most of these kernels take on the GPU, so a level goes in as few launches
as its dependencies allow:

- a product whose tiles split the batch rows (`Generator.takes_rows_after`)
  runs the level's phase in its own launch, each block for the units whose
  columns its tile holds or the last block to finish a tile of rows for
  those rows (`Generator.rows_after`); the level's other kernels whose
  results the phase reads go in a launch before it;
- the level's kernels share a launch (`launch_together`): none reads
  another's results;
- consecutive levels whose kernels and phases all work example by example
  (`Generator.row_local`) are one launch with a block per example
  (`Generator.rows_launch`); kernels nothing in the region reads (parameter
  gradients) wait for the next launch of kernels side by side;
- a concatenation that only products read, of values stored anyway, is not
  stored: the products read its parts where they are (`cexpr.Joined`).
"""
from __future__ import annotations

from ...ops import OPS, Kernel
from ...shapes import concrete_shape
from .cexpr import Joined, Ref
from .elementwise import loop_for
from .kernels import BLOCK, Generator


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
                 accumulate=(), persistent=False):
        self.gen, self.label, self.rows = gen, label, rows
        self.nodes = list(nodes)
        self.persistent = persistent  # run once a step: may run as one persistent kernel (blocks of one size)
        self.producer = {n.out: n for n in self.nodes}
        self.external, self.home = resolve_external, home
        self.accumulate = set(accumulate)  # nodes whose home is added to, not overwritten
        reads_breaking = {a for n in self.nodes if breaking(n) for a in n.args}
        self.materialised = {n.out for n in self.nodes
                             if breaking(n) or n.out in reads_breaking or n.out in exports}
        self.joined = self._joined(exports)
        self.materialised -= self.joined
        self.level = self._levels()
        self.launches: list = []

    def _joined(self, exports) -> set:
        """Concatenations that kernels read only as operands of products, of
        values stored anyway: the products read the parts where they are
        (`Joined`), so the concatenation is never stored (phases that read it
        inline it, as ever)."""
        kernels_reading: dict = {}
        for n in self.nodes:
            if breaking(n):
                for a in n.args:
                    kernels_reading.setdefault(a, []).append(n)
        joined = set()
        for n in self.nodes:
            readers = kernels_reading.get(n.out)
            if (n.op == "concat" and readers and n.out not in exports
                    and all(OPS[r.op].cuda.template == "contract.cu.j2" for r in readers)
                    and all((a not in self.producer or (a in self.materialised and self.producer[a].op != "concat"))
                            and self.ref(a).batched == n.batched for a in n.args)
                    and len({self.ref(a).elem for a in n.args}) == 1):
                joined.add(n.out)
        return joined

    def operand(self, name: str):
        """What a kernel reads for value `name`: its Ref, or a Joined for a
        concatenation read where its parts are."""
        if name not in self.joined:
            return self.ref(name)
        n = self.producer[name]
        shape = concrete_shape(n.shape)
        axis = n.attr("axis") % len(shape)
        parts, start = [], 0
        for a in n.args:
            ref = self.ref(a)
            parts.append((ref, start))
            start += ref.shape[axis]
        return Joined(tuple(parts), axis, shape, n.batched)

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
        read = {a for n in self.nodes for a in n.args}
        chain: list = []  # consecutive levels that work row by row, not launched yet
        later: list = []  # kernels whose results no kernel of the region reads, left for a later launch
        for level in range(top + 1):
            kernels = [n for n in self.nodes if breaking(n) and self.level[n.out] == level]
            stores = [n for n in self.nodes if not breaking(n) and n.out in self.materialised
                      and self.level[n.out] == level]
            host = self.host(kernels, stores)
            unread = [n for n in kernels if n.out not in read and not self.by_row([n], [])]
            by_row = [n for n in kernels if n not in unread]
            if host is None and self.by_row(by_row, stores):
                chain.append(self.row_level(level, by_row, stores))
                later += unread
                continue
            self.launch_rows(chain)
            self.launch_level(level, kernels + later, stores, host)
            chain, later = [], []
        self.launch_rows(chain)
        self.launch_together([self.breaking(n, shares_launch=len(later) > 1) for n in later])
        return self.launches

    def launch_level(self, level, kernels, stores, host):
        """The kernels of a level, in as few launches as can be, and its phase:
        in the host's launch (`host`), else a launch of its own."""
        then = self.phase_loops(level, stores, {self.ref(host.out).param}) if host else None
        read = {r.param for loop in then[0] for r in loop.refs.values()} if then else set()
        # the host's launch runs the phase: the kernels whose results it reads go before
        before = [n for n in kernels if n is not host and self.ref(n.out).param in read]
        beside = [n for n in kernels if n is not host and n not in before] + ([host] if host else [])
        for group in (before, beside):
            self.launch_together([self.breaking(n, then if n is host else None, len(group) > 1) for n in group])
        if stores and not host:
            self.launch_phase(level, self.phase_loops(level, stores))

    def launch_phase(self, level, loops):
        self.gen.launch(self, [self.gen.elementwise(self, f"phase{level}", *loops)])

    def by_row(self, kernels, stores) -> bool:
        """Whether a level's kernels and phase all work example by example."""
        return all(n.batched for n in stores) and all(
            self.gen.row_local(n, [self.operand(a) for a in n.args], self.ref(n.out)) for n in kernels)

    def row_level(self, level, kernels, stores) -> tuple:
        """A level that works row by row, made to share a launch: (level, its
        kernels' parts, its phase's loops or None)."""
        parts = [self.breaking(n, shares_launch=True) for n in kernels]
        return level, parts, self.phase_loops(level, stores) if stores else None

    def launch_rows(self, chain):
        """Levels that work row by row (`row_level`): one launch, a block per
        row, when that saves a launch and their kernels can share one (blocks
        of BLOCK threads); else each as usual."""
        parts = [p for _, level_parts, _ in chain for p in level_parts]
        kernels = len(parts) + sum(loops is not None for _, _, loops in chain)
        if kernels >= 2 and all(p.block == BLOCK for p in parts):
            self.gen.rows_launch(self, [stage for _, level_parts, loops in chain
                                        for stage in level_parts + ([loops] if loops else [])])
            return
        for level, level_parts, loops in chain:
            self.launch_together(level_parts)
            if loops:
                self.launch_phase(level, loops)

    def launch_together(self, parts):
        """`parts`, kernels of one level (none reads another's results), in as
        few launches as their block sizes allow (a block runs one of them, in the
        launch's shared memory)."""
        launches: list = []
        for part in parts:
            fits = [group for group in launches if group[0].block == part.block]
            if fits:
                fits[0].append(part)
            else:
                launches.append([part])
        for group in launches:
            self.gen.launch(self, group)

    def host(self, kernels, stores):
        """The product of `kernels` whose launch runs the phase of `stores` after
        it, row by row (`Generator.takes_rows_after`), if the phase works row
        by row (every value it stores is per example); else None."""
        if not stores or not all(n.batched for n in stores):
            return None
        hosts = [n for n in kernels
                 if self.gen.takes_rows_after(n, [self.operand(a) for a in n.args], self.ref(n.out))]
        return hosts[-1] if hosts else None

    def phase_loops(self, level: int, stores, coherent=frozenset()) -> tuple:
        """The loops of the phase at `level` that store `stores`, and a comment
        for each; `coherent`: params to read from L2 (written by the same launch)."""
        loops: dict = {}
        resolve = self.resolver(level)
        for n in stores:
            loop = loop_for(loops, concrete_shape(n.shape), n.batched, resolve, self.narrow, frozenset(coherent))
            value = loop.node(n, loop.row, loop.index)
            loop.store(self.ref(n.out), value, "+=" if n.out in self.accumulate else "=")
        return list(loops.values()), [f"{n.out} = {n.op}({', '.join(n.args)})" for n in stores]

    def breaking(self, n, then=None, shares_launch=False):
        """The kernel of node `n`: on blocks of BLOCK threads where it shares a
        launch, or where the region may run as one persistent kernel."""
        op = "+=" if n.out in self.accumulate else "="
        return self.gen.breaking(self, n, [self.operand(a) for a in n.args], self.ref(n.out), op,
                                 f"{n.out} = {n.op}({', '.join(n.args)})", then, shares_launch or self.persistent)
