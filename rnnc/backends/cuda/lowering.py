"""Program lowering: the hoisted regions, their backward regions and the Plan
as CUDA C (`Generated.source`) and the kernel launches of each kind of event
of the schedule (`Generated.launches`), with every value given a home buffer.

Python decides everything: `Lowering` places each value in a buffer (its
role, slots, slot selector and, by the role and the module's dtype, element
type: `launches.Buffer`) and lowers each region
(`region.Region`) in the order the runtime runs them; the kernel builders
(`kernels.Generator`) and templates only spell out what was decided.
"""
from __future__ import annotations

import math
from dataclasses import replace

from ...ops import COUNTER_KINDS, OPS
from ...passes.mask import VALID, cotangent_input
from ...dtypes import storage
from ...precision import for_dtype
from ...shapes import concrete_shape
from .cexpr import MAX_INDEX, Ref, comment
from .elementwise import loop_for
from .kernels import Generator, intrinsics, render
from .launches import FIXED_ROLES, PER_STEP, Buffer, Generated, Launches, buffer_elem
from .region import Region


class Lowering:
    """The program's regions, in the order the runtime runs them, with every
    value given a home buffer. Buffer names carry the role and the IR name
    (`tape:%4`, `state:h`); they reach C only through `mangle`."""

    def __init__(self, program, precision, dtype: str):
        self.program = program
        self.dtype = dtype
        self.cell = program.cell
        self.hoisted = program.hoisted
        self.plan = program.plan
        self.gen = Generator(precision.name)
        self.launches = Launches()
        self.decl = {d.name: d for d in self.cell.decls}
        self.values = self.hoisted.values()
        # and the step backward's, looked up for every seed it reads: made once
        self.values_bwd = {**self.values, **program.grads["step"].graph.values()}
        self.stored = set(self.plan.stored)
        self.states = [d.name for d in self.cell.of_kind("state")]
        # where the step's (masked) results go: the next states' and the outputs' slots of the step
        self.results = {v: self.declared(s, "t+1") for s, v in self.hoisted.nexts}
        self.results.update((v, self.buffer(f"output:{o}", self.shape(v), True, "T", "output", "t"))
                            for o, v in self.hoisted.outputs)

    # buffers ---------------------------------------------------------------------------
    def buffer(self, name, shape, batched, slots="one", role="scratch", selector="base") -> Ref:
        shape = tuple(shape)
        made = self.launches.buffers.setdefault(
            name, Buffer(name, math.prod(shape), batched, slots, role, buffer_elem(role, slots, self.dtype)))
        return Ref(name, selector, shape, batched, made.elem, role in FIXED_ROLES and not batched)

    def shape(self, name) -> tuple:
        return concrete_shape(self.values[name].shape)

    def declared(self, name, selector="t") -> Ref:
        """A declaration's buffer: inputs and the step index per step, states
        per step, others whole. The runtime fills the counter's (key, example, step)."""
        d = self.decl[name]
        shape = concrete_shape(d.shape)
        if d.kind in ("input", "step"):
            return self.buffer(f"{d.kind}:{name}", shape, True, "T", d.kind, selector)
        if d.kind == "state":
            return self.buffer(f"state:{name}", shape, True, "state", "tape", selector)
        return self.buffer(f"{d.kind}:{name}", shape, d.batched, "one", d.kind)

    def caller_buffers(self):
        """Every declaration's buffer and gradient buffer, used or not, so the
        runtime finds each argument and each gradient it returns."""
        for d in self.cell.decls:
            self.declared(d.name)
            if d.kind == "input":
                self.d_row(d.name, "base")
            elif d.kind == "state":
                self.d_state(d.name, "t")
            elif d.kind not in COUNTER_KINDS:
                self.accumulator(d.name)
        for o, _ in self.hoisted.outputs:
            self.d_output(o, "t")
        self.valid("t")

    def d_output(self, o, selector) -> Ref:
        """The cotangent of output `o`, given for every step."""
        value = dict(self.hoisted.outputs)[o]
        return self.buffer(f"d_output:{o}", self.shape(value), True, "T", "d_output", selector)

    def valid(self, selector) -> Ref:
        """The lengths mask (rnnc/passes/mask.py): 1 at step t of example b inside its sequence, else 0."""
        return self.buffer("valid", (), True, "T", "valid", selector)

    def hoisted_value(self, name, selector="t") -> Ref:
        """A value the step reads from outside: a declaration, the lengths mask,
        a `pre` value or a `seq` value."""
        if name in self.decl:
            return self.declared(name, selector)
        if name == VALID:
            return self.valid(selector)
        if name in self.hoisted.pre.producers():
            return self.pre_home(name, selector)
        return self.seq_home(name)

    def seq_home(self, name) -> Ref:
        return self.buffer(f"seq:{name}", self.shape(name), self.values[name].batched, role="seq")

    def pre_home(self, name, selector="base") -> Ref:
        batched = self.values[name].batched
        return self.buffer(f"pre:{name}", self.shape(name), batched, "T" if batched else "one", "rows", selector)

    # regions ----------------------------------------------------------------------------
    def region(self, label, rows, nodes, exports, external, home, accumulate=(), persistent=False) -> list:
        return Region(self.gen, label, rows, nodes, set(exports), external, home, accumulate, persistent).lower()

    def lower(self) -> Generated:
        s = self.launches
        self.caller_buffers()
        s.seq, s.rows = self.forward_once()
        s.step = self.forward_step()
        deferred = self.deferred()
        s.backward_step = self.backward_step(deferred) + self.grads(deferred)
        s.param_grads = self.after_loop(deferred) + self.pre_backward()
        s.backward_seq = self.seq_backward()
        for kind in PER_STEP:
            made, why = self.gen.persistent(f"rnnc_{kind}_persistent", getattr(s, kind))
            if made:
                s.persistent[kind] = made
            else:
                s.why_per_step[kind] = why
        s.buffers.update(self.gen.scratch)
        check_sizes(s)
        return Generated(render("module.cu.j2", cell=comment(self.cell.name), intrinsics=intrinsics(),
                                kernels=self.gen.sources), s, self.dtype)

    def forward_once(self) -> tuple:
        """The hoisted regions. What they keep (values read later: the plan's
        `seq` and `rows` values) lives in `seq:`/`pre:` buffers; their other
        results are scratch, freed when the regions have run."""
        h = self.hoisted
        seq_kept, pre_kept = set(self.plan.held["seq"]), set(self.plan.held["rows"])
        seq = self.region("seq", "B", h.seq.nodes, seq_kept, lambda v: self.declared(v),
                          lambda v, n: self.seq_home(v) if v in seq_kept else self.transient(v, n, "one"))
        pre = self.region("pre", "TB", h.pre.nodes, pre_kept, lambda v: self.hoisted_value(v, "base"),
                          lambda v, n: self.pre_home(v) if v in pre_kept else self.transient(v, n, "T"))
        return seq, pre

    def transient(self, name, node, slots) -> Ref:
        return self.buffer(f"once:{name}", concrete_shape(node.shape), node.batched,
                           slots if node.batched else "one")

    def step_home(self, name, node) -> Ref:
        if name in self.results:
            return self.results[name]
        if name in self.stored:
            return self.buffer(f"tape:{name}", self.shape(name), node.batched, "tape", "tape", "t")
        return self.buffer(f"step:{name}", self.shape(name), node.batched)

    def forward_step(self) -> list:
        exports = self.stored | set(self.results)
        return self.region("step", "B", self.hoisted.step.nodes, exports,
                           self.hoisted_value, self.step_home, persistent=True)

    def glue_kernel(self, label, rows, loops: dict, note) -> list:
        """The launch of one elementwise kernel of `loops` (none without loops),
        outside any region's phases."""
        if not loops:
            return []
        region = Region(self.gen, label, rows, [], set(), None, None)
        self.gen.launch(region, [self.gen.elementwise(region, "glue", list(loops.values()), [note])])
        return region.launches

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
                if OPS[producers[g].op].sums_rows and not producers[g].batched
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

    def d_state(self, s, selector) -> Ref:
        """The cotangent of state s before step t (at t) and after it (at t+1)."""
        return self.buffer(f"d_state:{s}", self.shape(s), True, "pair", "d_state", selector)

    def row_gradients(self) -> dict:
        """Step-backward values that are the gradient of exactly one input or
        `pre` value (its per-step row cotangent), by value name."""
        return {g: w for g, w in self.single_gradients().items() if w in self.row_targets()}

    def bwd_home(self):
        """Where backward values live: the states' cotangents before the step
        in their slot, row cotangents in their per-step rows, sole gradients
        of whole-sequence values in their accumulators (added to), the rest
        in one step's scratch."""
        rows, sole = self.row_gradients(), self.sole_gradients()
        states = {g: w for w, g in self.step_bwd.grads if w in self.states}

        def home(name, node):
            if name in states:
                return self.d_state(states[name], "t")
            if name in rows:
                return self.d_row(rows[name], "t")
            if name in sole:
                return self.accumulator(sole[name])
            return self.buffer(f"bwd:{name}", concrete_shape(node.shape), node.batched)
        return home

    def bwd_external(self, selector="t"):
        """The backward step's inputs: the cotangents of the states after the
        step and of its outputs, stored values, and what the forward step read."""
        given = {cotangent_input("next", s): self.d_state(s, "t+1") for s in self.states}
        given.update((cotangent_input("out", o), self.d_output(o, "t")) for o, _ in self.hoisted.outputs)

        def external(name):
            if name in given:
                return given[name]
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
        return self.region("bwd", "B", nodes, exports, self.bwd_external(), self.bwd_home(), accumulate,
                           persistent=True)

    def accumulator(self, w) -> Ref:
        """Where the gradient of a whole-sequence value (param, context, `seq` value) adds up."""
        role = "d_param" if w in self.decl else "d_seq"
        return self.buffer(f"d_acc:{w}", self.shape(w), self.values[w].batched, role=role)

    def d_row(self, w, selector) -> Ref:
        """The per-step cotangent of an input (returned) or of a `pre` value."""
        role = "d_input" if w in self.decl else "d_rows"
        return self.buffer(f"d_row:{w}", self.shape(w), True, "T", role, selector)

    def grads(self, deferred) -> list:
        """The row cotangents and accumulations the backward kernels did not
        write in place (a cotangent of several values, say)."""
        external, home = self.bwd_external(), self.bwd_home()
        producers = self.step_bwd.graph.producers()
        in_place = set(self.sole_gradients()) | set(deferred)

        def ref(g):
            return home(g, producers[g]) if g in producers else external(g)
        loops: dict = {}
        for w, g in self.step_bwd.grads:
            if w in self.states or not g or g in in_place:
                continue
            if w in self.row_targets():
                if ref(g).buffer == f"d_row:{w}":  # the backward wrote it there already
                    continue
                target, op = self.d_row(w, "t"), "="
            else:
                target, op = self.accumulator(w), "+="
            loop = loop_for(loops, target.shape, target.batched)
            loop.store(target, loop.at(ref(g)), op)
        return self.glue_kernel("grads", "B", loops, "grads: cotangents not written in place")

    def after_loop(self, deferred) -> list:
        """The deferred parameter-gradient products over all rows of a segment,
        added to their accumulators: one region, so those that fit share a launch."""
        producers = self.step_bwd.graph.producers()
        home, external = self.bwd_home(), self.bwd_external("base")
        targets = {g: self.accumulator(w) for g, w in deferred.items()}

        def whole(name):  # every step's slot at once: the base of a per-step buffer
            return replace(home(name, producers[name]), selector="base") if name in producers else external(name)
        return self.region("dgrad", "TB", [producers[g] for g in deferred], set(deferred), whole,
                           lambda name, node: targets[name], accumulate=set(deferred))

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


def check_sizes(launches: Launches):
    """Refuse per-example sizes the kernels' 32-bit indices cannot reach (see cexpr.MAX_INDEX)."""
    for b in launches.buffers.values():
        if b.numel > MAX_INDEX:
            per = " per example" if b.batched else ""
            raise ValueError(f"cuda: {b.name!r} has {b.numel:,} elements{per}, more than the "
                             f"{MAX_INDEX:,} (2^30) the kernels' 32-bit int indices reach; "
                             "use smaller dims or backend='numpy'")


def generate(program, precision: str | None = None, dtype="float32") -> Generated:
    """CUDA C source and launches of a compiled Program for arrays of `dtype`
    (float32, bfloat16 or float16), its products at `precision` (default:
    the Program's; a 16-bit dtype's products are in that type, rnnc/precision.py)."""
    dtype = storage(dtype, CUDA_DTYPES).name
    return Lowering(program, for_dtype(dtype, precision or program.precision), dtype).lower()


CUDA_DTYPES = ("float32", "bfloat16", "float16")
