"""Code generation: the hoisted regions, their backward regions and the Plan
lowered to CUDA C and to a schedule of kernel launches.

Python decides everything here; the jinja2 templates in `templates/` only
fill in the prepared strings, one template per kernel family:

- `elementwise.cu.j2`: a phase of fused elementwise work. Elementwise ops,
  slices, pads, concatenations, transposes and broadcasts are inlined into the
  expressions of the values the phase stores (structural ops become index
  arithmetic), with common subexpressions shared per element.
- `contract.cu.j2`: a tiled product for one `dot` spec (batched or shared
  operands), seen as out[g, m, n] = sum_k A[g, m, k] * B[g, k, n].
- `reduce.cu.j2`: sum, mean and reduce_to (a sum over some axes).
- `softmax.cu.j2`: softmax over one small axis.

`module.cu.j2` puts the kernels into one self-contained file.

A region's nodes are split into phases: a *breaking* node (a product, a
reduction or a softmax) needs all of its arguments before it starts, so it ends the phase
its arguments come from. Every value is stored row-major as [rows, *shape]
(batched) or [*shape] (shared); rows is B per step and T*B for the hoisted
`pre` region. Per-example sizes are compile-time constants; only `rows` and
`t` are kernel arguments.

The schedule (which kernels, with which buffers, in which order) is plain
data (`Schedule.to_json`), so the runtime and the artifact share it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources

import jinja2

from ...ops import BATCH, OPS
from ...shapes import concrete_shape

BLOCK = 256  # threads per block of every kernel family
TILE = 32  # the product kernel's tile edge (contract.cu.j2 assumes 16x16 threads, 2x2 each)
# each thread of the product kernel keeps 2x2 accumulators, 16 apart in m and n
TILE_OUTPUTS = [("acc00", 0, 0), ("acc01", 0, 16), ("acc10", 16, 0), ("acc11", 16, 16)]
BREAKING = {"dot", "sum", "mean", "softmax", "reduce_to"}


# --- names -------------------------------------------------------------------------
def mangle(name: str) -> str:
    """A C identifier for any name: letters and digits kept, everything else
    (including '_') escaped as _XX, so the map is injective and never yields a
    C or CUDA keyword (`float`, `threadIdx`) or a name of ours."""
    out = []
    for ch in name:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ord(ch) < 256:
            out.append(f"_{ord(ch):02x}")
        else:
            out.append(f"_u{ord(ch):06x}")
    return "v_" + "".join(out)


def comment(text: str) -> str:
    """Text safe inside a // comment: printable ASCII without backslashes
    (a trailing backslash would continue the comment onto the next line)."""
    return "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in text)


def c_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"literal {value!r} has no float32 C spelling")
    return f"{float(value)!r}f"


# --- the schedule: plain data shared by runtime and artifact ---------------------------
@dataclass(frozen=True)
class Buffer:
    """Device memory for one value: `slots` copies of [B, numel] (batched) or [numel].

    slots: "one"; "T" (one per step); "tape" (one per step when training,
    else 1); "state" (one per step and the final one when training, else 2).
    The caller's sequences (roles input, output, d_output, d_input) have a slot
    for every step of the sequence; the others only for the steps of one
    segment, indexed from the segment's start.
    """

    name: str
    numel: int
    batched: bool
    slots: str
    role: str  # input param context state d_output d_state (the caller's), output d_input, scratch, transient

    @property
    def whole_sequence(self) -> bool:
        return self.role in WHOLE_SEQUENCE


WHOLE_SEQUENCE = ("input", "output", "d_output", "d_input")


@dataclass(frozen=True)
class Extent:
    """n, times the launch's rows when `rows`, divided (rounding up) by `div`."""

    n: int
    rows: bool = False
    div: int = 1


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple  # 3 Extents
    block: int
    rows: str  # "B", or "TB": B times the number of steps of the segment being run
    args: tuple  # (buffer name, selector) pairs; selector: base, t or t+1 (modulo the slots)


@dataclass
class Schedule:
    """The launches of each part of a call, in order. The host runs `forward_seq`
    once, then per segment of steps (one segment unless the Plan checkpoints)
    `forward_pre` over the segment's rows and `forward_step` per step; the
    backward runs per segment, last first, `backward_step` per step (last
    first) then `backward_segment` over the segment's rows, and finally
    `backward_seq` once."""

    buffers: dict = field(default_factory=dict)  # name -> Buffer
    forward_seq: list = field(default_factory=list)
    forward_pre: list = field(default_factory=list)
    forward_step: list = field(default_factory=list)
    backward_step: list = field(default_factory=list)
    backward_segment: list = field(default_factory=list)
    backward_seq: list = field(default_factory=list)
    zero_before_backward: list = field(default_factory=list)  # buffers the backward accumulates into

    def to_json(self) -> dict:
        return {"buffers": [asdict(b) for b in self.buffers.values()],
                **{k: [asdict(launch) for launch in getattr(self, k)] for k in LAUNCH_LISTS},
                "zero_before_backward": list(self.zero_before_backward)}

    @staticmethod
    def from_json(data: dict) -> "Schedule":
        def launch(d):
            return Launch(d["kernel"], tuple(Extent(**e) for e in d["grid"]), d["block"], d["rows"],
                          tuple(tuple(a) for a in d["args"]))
        s = Schedule({b["name"]: Buffer(**b) for b in data["buffers"]})
        for k in LAUNCH_LISTS:
            setattr(s, k, [launch(d) for d in data[k]])
        s.zero_before_backward = list(data["zero_before_backward"])
        return s

    def launches(self):
        return [launch for k in LAUNCH_LISTS for launch in getattr(self, k)]

    def kernels(self) -> list:
        return list(dict.fromkeys(launch.kernel for launch in self.launches()))

    def arities(self) -> dict:
        """Buffers each kernel takes (after rows, t and lengths)."""
        return {launch.kernel: len(launch.args) for launch in self.launches()}


LAUNCH_LISTS = ("forward_seq", "forward_pre", "forward_step", "backward_step", "backward_segment",
                "backward_seq")


# --- templates -----------------------------------------------------------------------
@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    root = resources.files("rnnc.templates")
    return jinja2.Environment(loader=jinja2.FunctionLoader(lambda name: root.joinpath(name).read_text()),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **values) -> str:
    return environment().get_template(template).render(**values)


# --- where values live -----------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """A value's storage as seen by one kernel: a buffer at a slot, and its per-example shape."""

    buffer: str
    selector: str
    shape: tuple
    batched: bool

    @property
    def param(self) -> str:
        return mangle(f"{self.buffer}@{self.selector}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def strides(shape: tuple) -> list:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def decode(var: str, sizes: list) -> list:
    """C expressions of the indices of a row-major flat index `var` over `sizes`;
    the first size may be None (runtime), which needs no modulo."""
    exprs, inner = [], 1
    for i in reversed(range(len(sizes))):
        part = var if inner == 1 else f"({var} / {inner})"
        exprs.append(part if i == 0 else f"({part} % {sizes[i]})")
        inner *= sizes[i] if sizes[i] is not None else 1
    return exprs[::-1]


def offset(terms) -> str:
    """sum(index * stride) as C, dropping zero strides."""
    parts = [idx if s == 1 else f"{idx} * {s}" for idx, s in terms if s]
    return " + ".join(parts) or "0"


# --- elementwise phases ------------------------------------------------------------------
class Loop:
    """One grid-stride loop of a phase kernel over the elements of one shape:
    statements (with common subexpressions shared) and the stores."""

    def __init__(self, shape: tuple, batched: bool, resolve):
        self.shape, self.batched, self.resolve = shape, batched, resolve
        self.lines: list = []
        self.memo: dict = {}
        self.refs: dict = {}  # param -> Ref
        numel = math.prod(shape)
        self.total = size_expr(numel, batched)
        self.row = self.temp_int(f"i_ / {numel}") if batched else None
        flat = self.temp_int(f"i_ % {numel}") if batched else "i_"
        self.index = tuple(self.temp_int(e) for e in decode(flat, list(shape))) if shape else ()

    def temp_int(self, expr: str) -> str:
        return expr if expr.isidentifier() or expr.isdigit() else self.temp("int", expr)

    def temp(self, ctype: str, expr: str) -> str:
        key = (ctype, expr)
        if key not in self.memo:
            name = f"{'j' if ctype == 'int' else 'f'}{len(self.memo)}"
            self.lines.append(f"const {ctype} {name} = {expr};")
            self.memo[key] = name
        return self.memo[key]

    def element(self, ref: Ref, row, index) -> str:
        """`ref`'s element at (row, index) as a C lvalue; the row counts only when batched."""
        self.refs[ref.param] = ref
        terms = list(zip(index, strides(ref.shape)))
        if ref.batched:
            terms.insert(0, (row, ref.numel))
        return f"{ref.param}[{offset(terms)}]"

    def load(self, ref: Ref, row, index) -> str:
        return self.temp("float", self.element(ref, row, index))

    def value(self, name: str, row, index) -> str:
        """The C expression of value `name` at (row, index), inlining fusible producers."""
        where = self.resolve(name)
        if isinstance(where, Ref):
            return self.load(where, row if where.batched else None, index)
        return self.node(where, row, index)

    def node(self, n, row, index) -> str:
        shape = concrete_shape(n.shape)
        if n.op == "const":
            return c_float(n.attr("value"))
        lower = STRUCTURAL.get(n.op)
        if lower is not None:
            return lower(self, n, shape, row, index)
        args = [self.value(a, row, broadcast_index(self.shape_of(a), shape, index)) for a in n.args]
        return self.temp("float", OPS[n.op].cuda.format(*args))

    def shape_of(self, name: str) -> tuple:
        where = self.resolve(name)
        return where.shape if isinstance(where, Ref) else concrete_shape(where.shape)

    def store(self, ref: Ref, expr_name: str, op: str = "="):
        """`ref` at this loop's own element gets (`=`) or adds (`+=`) `expr_name`."""
        self.lines.append(f"{self.element(ref, self.row, self.index)} {op} {expr_name};")

    def at(self, ref: Ref) -> str:
        """`ref` loaded at this loop's own element (broadcast the NumPy way)."""
        return self.load(ref, self.row if ref.batched else None,
                         broadcast_index(ref.shape, self.shape, self.index))

    def clamp(self, expr: str, n: int) -> str:
        return self.temp_int(f"min(max({expr}, 0), {n - 1})")


def loop_for(loops: dict, shape: tuple, batched: bool, resolve=None) -> Loop:
    """The loop of `loops` over the elements of (shape, batched), made on first
    use: a kernel runs one grid-stride loop per shape it writes. Without
    `resolve` the loop only loads and stores buffers (`Loop.at`, `Loop.store`)."""
    key = (shape, batched)
    if key not in loops:
        loops[key] = Loop(shape, batched, resolve)
    return loops[key]


def broadcast_index(arg_shape: tuple, out_shape: tuple, index: tuple) -> tuple:
    """An argument's index under right-aligned NumPy broadcasting (size-1 axes read index 0)."""
    lead = len(out_shape) - len(arg_shape)
    return tuple("0" if a == 1 and out_shape[lead + k] != 1 else index[lead + k]
                 for k, a in enumerate(arg_shape))


def lower_slice(loop: Loop, n, shape, row, index):
    axis = n.attr("axis") % len(shape)
    moved = list(index)
    moved[axis] = loop.temp_int(f"{index[axis]} + {n.attr('start').value}")
    return loop.value(n.args[0], row, tuple(moved))


def lower_pad(loop: Loop, n, shape, row, index):
    # the argument is read at a clamped index (always in bounds) and the pad selects 0 outside
    axis, before = n.attr("axis"), n.attr("before").value
    size = shape[axis] - before - n.attr("after").value
    j = loop.temp_int(f"{index[axis]} - {before}")
    moved = list(index)
    moved[axis] = loop.clamp(j, size)
    inner = loop.value(n.args[0], row, tuple(moved))
    return loop.temp("float", f"({j} >= 0 && {j} < {size}) ? {inner} : 0.0f")


def lower_concat(loop: Loop, n, shape, row, index):
    axis = n.attr("axis") % len(shape)
    start, parts = 0, []
    for a in n.args:
        size = loop.shape_of(a)[axis]
        moved = list(index)
        moved[axis] = loop.clamp(f"{index[axis]} - {start}", size)
        parts.append((start + size, loop.value(a, row, tuple(moved))))
        start += size
    expr = parts[-1][1]
    for stop, value in reversed(parts[:-1]):
        expr = f"({index[axis]} < {stop}) ? {value} : {expr}"
    return loop.temp("float", expr)


def lower_transpose(loop: Loop, n, shape, row, index):
    return loop.value(n.args[0], row, tuple(reversed(index)))


def lower_broadcast_in(loop: Loop, n, shape, row, index):
    axis = n.attr("axis")
    kept = tuple(ix for k, ix in enumerate(index) if k != axis) if axis is not None else index
    kept_shape = tuple(s for k, s in enumerate(shape) if k != axis) if axis is not None else shape
    return loop.value(n.args[0], row, broadcast_index(loop.shape_of(n.args[0]), kept_shape, kept))


STRUCTURAL = {"slice": lower_slice, "pad": lower_pad, "concat": lower_concat,
              "transpose": lower_transpose, "broadcast_in": lower_broadcast_in}


# --- breaking kernels: products, reductions, softmax ---------------------------------------
def size_expr(n: int, rows: bool) -> str:
    return f"rows * {n}" if rows else str(n)


def extent(axes: list, div: int = 1) -> Extent:
    """The launch extent of a list of (size or None for rows) sizes."""
    return Extent(math.prod(s for s in axes if s is not None), any(s is None for s in axes), div)


def contraction(spec: str, a: Ref, b: Ref, out: Ref) -> dict:
    """The `dot` spec as a batched product out[g, m, n] = sum_k A[g, m, k] B[g, k, n]:
    each of g, m, n, k a group of letters (the batch letter first) with its
    offset expression in every operand."""
    ins, out_letters = spec.split("->")
    la, lb = ins.split(",")
    size = {}
    for letters, ref in ((la, a), (lb, b)):
        size.update(zip(letters.replace(BATCH, ""), ref.shape))
    lonely = [c for c in la + lb if c not in out_letters and not (c in la and c in lb)]
    if lonely:
        raise ValueError(f"dot {spec}: letter {lonely[0]!r} is summed in one operand only")
    st = {"a": letter_strides(la, a), "b": letter_strides(lb, b), "c": letter_strides(out_letters, out)}
    groups = {"g": [c for c in out_letters if c in la and c in lb],
              "m": [c for c in out_letters if c in la and c not in lb],
              "n": [c for c in out_letters if c in lb and c not in la],
              "k": [c for c in la if c in lb and c not in out_letters]}
    result = {}
    for var, letters in groups.items():
        letters = sorted(letters, key=lambda c: c != BATCH)  # the batch letter outermost
        sizes = [None if c == BATCH else size[c] for c in letters]
        idx = decode(var, sizes)
        result[f"{var}_size"] = sizes
        for op in "abc":
            result[f"{op}_{var}"] = [(i, st[op].get(c, 0)) for i, c in zip(idx, letters)]
    return {"sizes": {v: result[f"{v}_size"] for v in "gmnk"},
            # neighbouring threads load neighbouring addresses: the tile index that
            # varies fastest (c_) walks the operand's unit-stride axis
            "a_map": tile_map("m", "k", result["a_m"], "m0"),
            "b_map": tile_map("n", "k", result["b_n"], "n0"),
            "a_offset": offset(result["a_g"] + result["a_m"] + result["a_k"]),
            "b_offset": offset(result["b_g"] + result["b_k"] + result["b_n"]),
            "c_offset": offset(result["c_g"] + result["c_m"] + result["c_n"])}


def letter_strides(letters: str, ref: Ref) -> dict:
    """The stride in `ref`'s buffer of each letter of its part of a `dot` spec
    (the batch letter strides over whole rows)."""
    own = [c for c in letters if c != BATCH]
    table = dict(zip(own, strides(ref.shape)))
    if BATCH in letters:
        table[BATCH] = ref.numel
    return table


def tile_map(free: str, summed: str, free_terms: list, origin: str) -> str:
    """How a tile load's (r_, c_) become the operand's indices: c_ (consecutive
    threads) along the free index when its innermost letter has unit stride,
    else along the summed one."""
    along_free = bool(free_terms) and free_terms[-1][1] == 1
    first, second = (summed, free) if along_free else (free, summed)
    origins = {free: origin, summed: "k0"}
    return f"{first} = {origins[first]} + r_, {second} = {origins[second]} + c_"


def reduction_axes(n, src: Ref):
    """(kept, reduced) axes of a sum-like node over its argument, each a list of
    (size or None for rows, stride in the argument)."""
    shape = src.shape
    axes = [(s, st) for s, st in zip(shape, strides(shape))]
    row = [(None, src.numel)] if src.batched else []
    if n.op in ("sum", "mean"):
        axis = n.attr("axis") % len(shape)
        return row + axes[:axis] + axes[axis + 1:], [axes[axis]]
    target = concrete_shape(n.attr("shape"))
    lead = len(shape) - len(target)
    reduced_rows = row if (src.batched and not n.batched) else []
    kept = row if not reduced_rows else []
    reduced = list(reduced_rows) + axes[:lead]
    for k, t in enumerate(target):
        (reduced if t == 1 and shape[lead + k] != 1 else kept).append(axes[lead + k])
    return kept, reduced


def flat_terms(var: str, axes: list) -> str:
    sizes = [s for s, _ in axes]
    return offset(list(zip(decode(var, sizes), [st for _, st in axes])))


def total_expr(axes: list) -> str:
    e = extent([s for s, _ in axes])
    return size_expr(e.n, e.rows)


# --- one region -> kernels and launches ------------------------------------------------------
class Region:
    """Lowers an ordered list of nodes into phases and breaking kernels.

    `resolve_external(name)` gives the Ref of a value the nodes read but do not
    make; `home(name, node)` gives where a materialised node result lives.
    `exports` are the node results needed after the region (they are stored
    even when fusible).
    """

    def __init__(self, gen: "Generator", label: str, rows: str, nodes, exports, resolve_external, home,
                 accumulate=()):
        self.gen, self.label, self.rows = gen, label, rows
        self.nodes = list(nodes)
        self.producer = {n.out: n for n in self.nodes}
        self.external, self.home = resolve_external, home
        self.accumulate = set(accumulate)  # nodes whose home is added to, not overwritten
        reads_breaking = {a for n in self.nodes if n.op in BREAKING for a in n.args}
        self.materialised = {n.out for n in self.nodes
                             if n.op in BREAKING or n.out in reads_breaking or n.out in exports}
        self.level = self._levels()
        self.launches: list = []

    def _levels(self) -> dict:
        level = {}
        for n in self.nodes:
            base = max((level.get(a, 0) for a in n.args), default=0)
            level[n.out] = base + 1 if n.op in BREAKING else base
        return level

    def ref(self, name: str) -> Ref:
        if name in self.producer:
            return self.home(name, self.producer[name])
        return self.external(name)

    def resolver(self, level: int):
        """Inside the phase at `level`: results of earlier kernels are loaded,
        fusible nodes of this level are inlined."""
        def resolve(name):
            n = self.producer.get(name)
            if n is None or n.op in BREAKING or (name in self.materialised and self.level[name] < level):
                return self.ref(name)
            return n
        return resolve

    def lower(self) -> list:
        top = max(self.level.values(), default=0)
        for level in range(top + 1):
            for n in self.nodes:
                if n.op in BREAKING and self.level[n.out] == level:
                    self.breaking(n)
            stores = [n for n in self.nodes if n.op not in BREAKING and n.out in self.materialised
                      and self.level[n.out] == level]
            if stores:
                self.phase(level, stores)
        return self.launches

    def phase(self, level: int, stores):
        loops: dict = {}
        resolve = self.resolver(level)
        for n in stores:
            loop = loop_for(loops, concrete_shape(n.shape), n.batched, resolve)
            value = loop.node(n, loop.row, loop.index)
            loop.store(self.ref(n.out), value, "+=" if n.out in self.accumulate else "=")
        self.gen.elementwise(self, f"phase{level}", list(loops.values()),
                             comments=[f"{n.out} = {n.op}({', '.join(n.args)})" for n in stores])

    def breaking(self, n):
        out = self.ref(n.out)
        args = [self.ref(a) for a in n.args]
        op = "+=" if n.out in self.accumulate else "="
        note = f"{n.out} = {n.op}({', '.join(n.args)})"
        if n.op == "dot":
            self.gen.contract(self, n.attr("spec"), args[0], args[1], out, op, note)
        elif n.op == "softmax":
            self.gen.softmax(self, n, args[0], out, op, note)
        else:
            self.gen.reduce(self, n, args[0], out, op, note)


class Generator:
    """Collects kernel sources and launches for a whole program."""

    def __init__(self):
        self.sources: list = []
        self.count = 0

    def name(self, region: Region, family: str) -> str:
        self.count += 1
        return f"rnnc_{region.label}_{self.count}_{family}"

    @staticmethod
    def signature(refs) -> str:
        params = ["const int rows", "const int t", "const int* lengths"]
        return ", ".join(params + [f"float* {r.param}" for r in refs])

    def emit(self, region, family, template, refs, grid, note, **values):
        name = self.name(region, family)
        refs = list({r.param: r for r in refs}.values())
        self.sources.append(render(template, name=name, params=self.signature(refs),
                                   comment=comment(note), **values))
        region.launches.append(Launch(name, grid, BLOCK, region.rows,
                                      tuple((r.buffer, r.selector) for r in refs)))

    def elementwise(self, region, family, loops, comments):
        refs = [r for loop in loops for r in loop.refs.values()]
        work = max((Extent(math.prod(loop.shape), loop.batched, BLOCK) for loop in loops),
                   key=lambda e: (e.rows, e.n))
        self.emit(region, family, "elementwise.cu.j2", refs, (work, Extent(1), Extent(1)),
                  "; ".join(comments), loops=[{"total": loop.total, "lines": loop.lines} for loop in loops])

    def contract(self, region, spec, a, b, out, op, note):
        c = contraction(spec, a, b, out)
        sizes = c.pop("sizes")
        grid = (extent(sizes["n"], TILE), extent(sizes["m"], TILE), extent(sizes["g"]))
        exprs = {f"{v}_size": size_expr(e.n, e.rows) for v in "gmnk" for e in [extent(sizes[v])]}
        self.emit(region, "dot", "contract.cu.j2", [a, b, out], grid, f"{note}  [{spec}]",
                  a=a.param, b=b.param, c=out.param, op=op, tile=TILE, outputs=TILE_OUTPUTS, **exprs, **c)

    def reduce(self, region, n, src, out, op, note):
        kept, reduced = reduction_axes(n, src)
        count = math.prod(s for s, _ in reduced if s is not None)
        scale = f" * {c_float(1.0 / count)}" if n.op == "mean" else ""
        work = extent([s for s, _ in kept], BLOCK)
        self.emit(region, n.op, "reduce.cu.j2", [src, out], (work, Extent(1), Extent(1)), note,
                  x=src.param, y=out.param, op=op, scale=scale, out_total=total_expr(kept),
                  red_total=total_expr(reduced), base=flat_terms("o_", kept), step=flat_terms("r_", reduced))

    def softmax(self, region, n, src, out, op, note):
        shape = src.shape
        axis = n.attr("axis") % len(shape)
        outer, size, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        work = Extent(outer * inner, src.batched, BLOCK)
        self.emit(region, "softmax", "softmax.cu.j2", [src, out], (work, Extent(1), Extent(1)), note,
                  x=src.param, y=out.param, op=op, size=size, inner=inner, span=size * inner,
                  lanes=size_expr(outer * inner, src.batched))


# --- the whole program ---------------------------------------------------------------------
DEFERRABLE = {"dot", "reduce_to"}


@dataclass(frozen=True)
class Generated:
    source: str
    schedule: Schedule


class Lowering:
    """The program's regions, in the order the runtime runs them, with every
    value given a home buffer. Buffer names carry the role and the IR name
    (`tape:%4`, `state:h`); they reach C only through `mangle`."""

    def __init__(self, program):
        self.program = program
        self.cell = program.cell
        self.hoisted = program.hoisted
        self.plan = program.plan
        self.gen = Generator()
        self.schedule = Schedule()
        self.decl = {d.name: d for d in self.cell.decls}
        self.values = self.hoisted.values()
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
        return Generated(render("module.cu.j2", cell=comment(self.cell.name),
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
                and all(self.values_bwd(a).batched and a in kept for a in producers[g].args)}

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

    def values_bwd(self, name):
        return self.step_bwd.graph.values().get(name) or self.values[name]

    def seed_ref(self, seed) -> Ref:
        value = self.values_bwd(seed)
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


def generate(program) -> Generated:
    """CUDA C source and launch schedule of a compiled Program."""
    return Lowering(program).lower()
