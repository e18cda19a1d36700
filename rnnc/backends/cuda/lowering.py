"""Program lowering: the hoisted regions, their backward regions and the Plan
as CUDA C (`Generated.source`) and a schedule of kernel launches
(`Generated.schedule`), with every value given a home buffer.

Python decides everything: `Lowering` places each value in a buffer (its
role, slots and slot selector: `schedule.Buffer`) and lowers each region
(`region.Region`) in the order the runtime runs them; the kernel builders
(`kernels.Generator`) and templates only spell out what was decided.
"""
from __future__ import annotations

import math
from dataclasses import replace

from ...precision import precision as find_precision
from ...shapes import concrete_shape
from .cexpr import MAX_INDEX, Ref, comment
from .elementwise import loop_for
from .kernels import Generator, intrinsics, render
from .region import Region
from .schedule import Buffer, Generated, Schedule

# breaking ops whose parameter gradient may run once over all rows of a segment
# instead of once per step (see `Lowering.deferred`)
DEFERRABLE = {"dot", "reduce_to"}


class Lowering:
    """The program's regions, in the order the runtime runs them, with every
    value given a home buffer. Buffer names carry the role and the IR name
    (`tape:%4`, `state:h`); they reach C only through `mangle`."""

    def __init__(self, program, precision):
        self.program = program
        self.cell = program.cell
        self.hoisted = program.hoisted
        self.plan = program.plan
        self.gen = Generator(precision.name)
        self.schedule = Schedule()
        self.decl = {d.name: d for d in self.cell.decls}
        self.values = self.hoisted.values()
        # and the step backward's, looked up for every seed it reads: made once
        self.values_bwd = {**self.values, **program.grads["step"].graph.values()}
        self.stored = set(self.plan.stored)
        self.states = [d.name for d in self.cell.of_kind("state")]
        for _, v in self.cell.nexts + self.cell.outputs:
            if not self.values[v].batched:
                raise ValueError(f"cuda: the step result {v!r} does not depend on the batch; "
                                 "the cuda backend needs per-example step results")

    # buffers ---------------------------------------------------------------------------
    def buffer(self, name, shape, batched, slots="one", role="scratch", selector="base") -> Ref:
        shape = tuple(shape)
        self.schedule.buffers.setdefault(name, Buffer(name, math.prod(shape), batched, slots, role))
        return Ref(name, selector, shape, batched)

    def shape(self, name) -> tuple:
        return concrete_shape(self.values[name].shape)

    def declared(self, name, selector="t") -> Ref:
        """A declaration's caller-given buffer: inputs per step, states per step, others whole."""
        d = self.decl[name]
        shape = concrete_shape(d.shape)
        if d.kind == "input":
            return self.buffer(f"input:{name}", shape, True, "T", "input", selector)
        if d.kind == "state":
            return self.buffer(f"state:{name}", shape, True, "state", "state", selector)
        return self.buffer(f"{d.kind}:{name}", shape, d.batched, "one", d.kind)

    def caller_buffers(self):
        """Every declaration's buffer and gradient buffer, used or not, so the
        runtime finds each argument and each gradient it returns."""
        for d in self.cell.decls:
            self.declared(d.name)
            if d.kind == "input":
                self.d_row(d.name, "base")
            elif d.kind == "state":
                self.d_state(d.name)
            else:
                self.accumulator(d.name)
        for o, v in self.cell.outputs:
            self.buffer(f"output:{o}", self.shape(v), True, "T", "output")
            self.buffer(f"d_output:{o}", self.shape(v), True, "T", "d_output")

    def hoisted_value(self, name, selector="t") -> Ref:
        """A value the step reads from outside: a declaration, a `pre` value or a `seq` value."""
        if name in self.decl:
            return self.declared(name, selector)
        if name in self.hoisted.pre.producers():
            return self.pre_home(name, selector)
        return self.seq_home(name)

    def seq_home(self, name) -> Ref:
        return self.buffer(f"seq:{name}", self.shape(name), self.values[name].batched)

    def pre_home(self, name, selector="base") -> Ref:
        batched = self.values[name].batched
        return self.buffer(f"pre:{name}", self.shape(name), batched, "T" if batched else "one", selector=selector)

    # regions ----------------------------------------------------------------------------
    def region(self, label, rows, nodes, exports, external, home, accumulate=()) -> list:
        return Region(self.gen, label, rows, nodes, set(exports), external, home, accumulate).lower()

    def lower(self) -> Generated:
        s = self.schedule
        self.caller_buffers()
        s.forward_seq, s.forward_pre = self.forward_once()
        s.forward_step = self.forward_step() + self.commit()
        deferred = self.deferred()
        s.backward_step = self.seeds() + self.backward_step(deferred) + self.grads(deferred)
        s.backward_segment = self.after_loop(deferred) + self.pre_backward()
        s.backward_seq = self.seq_backward()
        s.zero_before_backward = [b.name for b in s.buffers.values()
                                  if b.name.split(":", 1)[0] in ("d_row", "d_acc")]
        s.buffers.update(self.gen.scratch)
        check_sizes(s)
        return Generated(render("module.cu.j2", cell=comment(self.cell.name), intrinsics=intrinsics(),
                                kernels=self.gen.sources), s)

    def forward_once(self) -> tuple:
        """The hoisted regions. What they keep (values read later) lives in
        `seq:`/`pre:` buffers; their other results are transient scratch,
        freed when the regions have run."""
        h, grads = self.hoisted, self.program.grads
        seq_kept = set(h.seq.outputs) | set(grads["seq"].residuals)
        pre_kept = set(h.pre.outputs) | set(grads["pre"].residuals)
        seq = self.region("seq", "B", h.seq.nodes, seq_kept, lambda v: self.declared(v),
                          lambda v, n: self.seq_home(v) if v in seq_kept else self.transient(v, n, "one"))
        pre = self.region("pre", "TB", h.pre.nodes, pre_kept, lambda v: self.hoisted_value(v, "base"),
                          lambda v, n: self.pre_home(v) if v in pre_kept else self.transient(v, n, "T"))
        return seq, pre

    def transient(self, name, node, slots) -> Ref:
        return self.buffer(f"once:{name}", concrete_shape(node.shape), node.batched,
                           slots if node.batched else "one", "transient")

    def step_home(self, name, node) -> Ref:
        if name in self.stored:
            return self.buffer(f"tape:{name}", self.shape(name), node.batched, "tape", selector="t")
        return self.buffer(f"step:{name}", self.shape(name), node.batched)

    def forward_step(self) -> list:
        exports = self.stored | {v for _, v in self.cell.nexts + self.cell.outputs}
        return self.region("step", "B", self.hoisted.step.nodes, exports,
                           self.hoisted_value, self.step_home)

    def step_value(self, name) -> Ref:
        """A forward step value after the step's kernels ran."""
        node = self.hoisted.step.producers().get(name)
        return self.step_home(name, node) if node else self.hoisted_value(name)

    def glue(self, label, targets) -> list:
        """One elementwise kernel from (target Ref, op, expression builder) triples;
        the builder gets a loader (`Loop.at`) and the `valid` 0/1 of the row."""
        loops: dict = {}
        for target, op, build in targets:
            loop = loop_for(loops, target.shape, target.batched)
            valid = loop.temp("float", f"(t < lengths[{loop.row}]) ? 1.0f : 0.0f") if loop.batched else "1.0f"
            loop.store(target, loop.temp("float", build(loop.at, valid)), op)
        return self.glue_kernel(label, "B", loops, label)

    def glue_kernel(self, label, rows, loops: dict, note) -> list:
        """The launch of one elementwise kernel of `loops` (none without loops),
        outside any region's phases."""
        if not loops:
            return []
        region = Region(self.gen, label, rows, [], set(), None, None)
        self.gen.elementwise(region, "glue", list(loops.values()), [note])
        return region.launches

    def commit(self) -> list:
        """Outputs are zero and states carried over past a sequence's length."""
        targets = []
        for o, v in self.cell.outputs:
            out = self.buffer(f"output:{o}", self.shape(v), True, "T", "output", "t")
            targets.append((out, "=", lambda at, valid, v=v: f"{valid} * {at(self.step_value(v))}"))
        for s, v in self.cell.nexts:
            new = self.declared(s, "t+1")
            targets.append((new, "=", lambda at, valid, s=s, v=v:
                            f"{valid} > 0.0f ? {at(self.step_value(v))} : {at(self.declared(s))}"))
        return self.glue("commit", targets)

    # backward ----------------------------------------------------------------------------
    @property
    def step_bwd(self):
        return self.program.grads["step"]

    def deferred(self) -> dict:
        """Parameter-gradient products of the step backward that sum over the
        batch and read only values kept for every step anyway (states, stored
        values, inputs, `pre` values and their cotangents): run once after the
        loop over all rows of a segment instead of once per step, at no extra
        memory (node name -> the value it is the gradient of)."""
        producers = self.step_bwd.graph.producers()
        kept = set(self.states) | self.stored | set(self.row_gradients()) | self.row_targets()
        return {g: w for g, w in self.sole_gradients().items()
                if producers[g].op in DEFERRABLE and not producers[g].batched
                and all(self.values_bwd[a].batched and a in kept for a in producers[g].args)}

    def sole_gradients(self) -> dict:
        """Backward nodes that are the gradient of one whole-sequence value
        (param, context, `seq` value) and nothing else: they can add straight
        into its accumulator (node name -> the value)."""
        graph = self.step_bwd.graph
        producers = graph.producers()
        read = {a for n in graph.nodes for a in n.args}
        per_step = set(self.states) | self.row_targets()
        return {g: w for g, w in self.single_gradients().items()
                if g in producers and g not in read and w not in per_step
                and producers[g].batched == self.values[w].batched
                and concrete_shape(producers[g].shape) == self.shape(w)}

    def single_gradients(self) -> dict:
        """Step-backward values that are the gradient of one value only (name -> that value)."""
        grads = [g for _, g in self.step_bwd.grads if g]
        return {g: w for w, g in self.step_bwd.grads if g and grads.count(g) == 1}

    def row_targets(self) -> set:
        return {d.name for d in self.cell.of_kind("input")} | set(self.hoisted.pre.outputs)

    def seed_ref(self, seed) -> Ref:
        value = self.values_bwd[seed]
        return self.buffer(f"seed:{seed}", concrete_shape(value.shape), value.batched)

    def d_state(self, s) -> Ref:
        return self.buffer(f"d_state:{s}", self.shape(s), True, "one", "d_state")

    def seeds(self) -> list:
        """Each step output's cotangent: the carried state cotangents and the
        output cotangents given for this step, zero past the sequence's length."""
        targets = []
        for out, seed in self.step_bwd.seeds:
            states = [s for s, v in self.cell.nexts if v == out]
            outputs = [o for o, v in self.cell.outputs if v == out]

            def build(at, valid, out=out, states=states, outputs=outputs):
                terms = [at(self.d_state(s)) for s in states]
                terms += [at(self.buffer(f"d_output:{o}", self.shape(out), True, "T", "d_output", "t"))
                          for o in outputs]
                return f"{valid} * ({' + '.join(terms) or '0.0f'})"
            targets.append((self.seed_ref(seed), "=", build))
        return self.glue("seeds", targets)

    def row_gradients(self) -> dict:
        """Step-backward values that are the gradient of exactly one input or
        `pre` value (its per-step row cotangent), by value name."""
        return {g: w for g, w in self.single_gradients().items() if w in self.row_targets()}

    def bwd_home(self):
        """Where backward values live: row cotangents in their per-step rows,
        sole gradients of whole-sequence values in their accumulators (added
        to), the rest in one step's scratch."""
        rows, sole = self.row_gradients(), self.sole_gradients()

        def home(name, node):
            if name in rows:
                return self.d_row(rows[name], "t")
            if name in sole:
                return self.accumulator(sole[name])
            return self.buffer(f"bwd:{name}", concrete_shape(node.shape), node.batched)
        return home

    def bwd_external(self, selector="t"):
        seeds = dict((s, o) for o, s in self.step_bwd.seeds)

        def external(name):
            if name in seeds:
                return self.seed_ref(name)
            if name in self.stored and name not in self.states:
                return self.buffer(f"tape:{name}", self.shape(name), self.values[name].batched, "tape",
                                   selector=selector)
            return self.hoisted_value(name, selector)
        return external

    def backward_step(self, deferred) -> list:
        """The Plan's recomputation and the backward step as one region, so
        recomputed elementwise values are inlined into the backward kernels."""
        nodes = list(self.plan.recompute) + [n for n in self.step_bwd.graph.nodes if n.out not in deferred]
        exports = {g for _, g in self.step_bwd.grads if g}
        accumulate = set(self.sole_gradients()) - set(deferred)
        return self.region("bwd", "B", nodes, exports, self.bwd_external(), self.bwd_home(), accumulate)

    def accumulator(self, w) -> Ref:
        """Where the gradient of a whole-sequence value (param, context, `seq` value) adds up."""
        v = self.values[w]
        return self.buffer(f"d_acc:{w}", self.shape(w), v.batched)

    def d_row(self, w, selector) -> Ref:
        """The per-step cotangent of an input (returned) or of a `pre` value."""
        role = "d_input" if w in self.decl else "scratch"
        return self.buffer(f"d_row:{w}", self.shape(w), True, "T", role, selector)

    def grads(self, deferred) -> list:
        """The state cotangents carried to the step before (kept as they are past
        a sequence's length), the row cotangents and accumulations the
        backward kernels did not write in place."""
        external, home = self.bwd_external(), self.bwd_home()
        producers = self.step_bwd.graph.producers()
        in_place = set(self.sole_gradients()) | set(deferred)

        def ref(g):
            return home(g, producers[g]) if g in producers else external(g)
        targets = []
        for w, g in self.step_bwd.grads:
            if w in self.states:
                targets.append((self.d_state(w), "=", lambda at, valid, w=w, g=g:
                                (f"{at(ref(g))} + " if g else "") + f"(1.0f - {valid}) * {at(self.d_state(w))}"))
            elif not g or g in in_place:
                continue
            elif w in self.row_targets():
                if ref(g).buffer != f"d_row:{w}":  # unless the backward wrote it there already
                    targets.append((self.d_row(w, "t"), "=", lambda at, valid, g=g: at(ref(g))))
            else:
                targets.append((self.accumulator(w), "+=", lambda at, valid, g=g: at(ref(g))))
        return self.glue("grads", targets)

    def after_loop(self, deferred) -> list:
        """The deferred parameter-gradient products over all rows of a segment, added to their accumulators."""
        producers = self.step_bwd.graph.producers()
        home, external = self.bwd_home(), self.bwd_external("base")

        def whole(name):  # every step's slot at once: the base of a per-step buffer
            return replace(home(name, producers[name]), selector="base") if name in producers else external(name)
        launches = []
        for g, w in deferred.items():
            target = self.accumulator(w)
            launches += self.region("dgrad", "TB", [producers[g]], {g}, whole,
                                    lambda name, node, target=target: target, accumulate={g})
        return launches

    def whole_region_backward(self, label, rows, backward, external, add_to) -> list:
        """A hoisted region's backward, then its gradients added to their accumulators."""
        def home(name, node):
            slots = "T" if rows == "TB" and node.batched else "one"
            return self.buffer(f"{label}:{name}", concrete_shape(node.shape), node.batched, slots)
        launches = self.region(label, rows, backward.graph.nodes, {g for _, g in backward.grads if g},
                               external, home)
        producers = backward.graph.producers()
        loops: dict = {}
        for w, g in backward.grads:
            if not g:
                continue
            target = add_to(w)
            loop = loop_for(loops, target.shape, target.batched)
            source = home(g, producers[g]) if g in producers else external(g)
            loop.store(target, loop.at(source), "+=")
        return launches + self.glue_kernel(f"{label}_add", rows, loops, f"{label}: add gradients")

    def pre_backward(self) -> list:
        if not self.hoisted.pre.nodes:
            return []
        seeds = {s: o for o, s in self.program.grads["pre"].seeds}

        def external(name):
            if name in seeds:
                return self.d_row(seeds[name], "base")
            return self.hoisted_value(name, "base")
        inputs = {d.name for d in self.cell.of_kind("input")}
        return self.whole_region_backward(
            "pre_bwd", "TB", self.program.grads["pre"], external,
            lambda w: self.d_row(w, "base") if w in inputs else self.accumulator(w))

    def seq_backward(self) -> list:
        if not self.hoisted.seq.nodes:
            return []
        seeds = {s: o for o, s in self.program.grads["seq"].seeds}

        def external(name):
            return self.accumulator(seeds[name]) if name in seeds else self.hoisted_value(name, "base")
        return self.whole_region_backward("seq_bwd", "B", self.program.grads["seq"], external,
                                          self.accumulator)


def check_sizes(schedule: Schedule):
    """Refuse per-example sizes the kernels' 32-bit indices cannot reach (see cexpr.MAX_INDEX)."""
    for b in schedule.buffers.values():
        if b.numel > MAX_INDEX:
            per = " per example" if b.batched else ""
            raise ValueError(f"cuda: {b.name!r} has {b.numel:,} elements{per}, more than the "
                             f"{MAX_INDEX:,} (2^30) the kernels' 32-bit int indices reach; "
                             "use smaller dims or backend='numpy'")


def generate(program, precision: str | None = None) -> Generated:
    """CUDA C source and launch schedule of a compiled Program, its products at
    `precision` (default: the Program's)."""
    return Lowering(program, find_precision(precision or program.precision)).lower()
