"""Kernel builders: each kernel's source from a jinja2 template, and its launch.

The templates in `templates/` only fill in strings prepared here, one
template per kernel family:

- `elementwise.cu.j2`: a phase of fused elementwise work (`elementwise.py`
  prepares its loops).
- `contract.cu.j2`: a tiled product for one `dot` spec (batched or shared
  operands), seen as out[g, m, n] = sum_k A[g, m, k] * B[g, k, n].
- `reduce.cu.j2`: sum, mean and reduce_to (a sum over some axes).
- `softmax.cu.j2`: softmax over one small axis.

The last three are the *breaking* kernels (`BREAKING`): their node needs all
of its arguments before it starts, so it ends the phase they come from.
Block and tile sizes are set here, once, and passed to the templates.
"""
from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources

import jinja2

from ...ops import BATCH
from ...shapes import concrete_shape
from .cexpr import Ref, c_float, comment, decode, offset, size_expr, strides
from .schedule import Extent, Launch

BLOCK = 256  # threads per block of every kernel family
# The product kernel's BLOCK threads form an EDGE x EDGE square (so BLOCK is a
# square); each thread computes PER_THREAD x PER_THREAD outputs EDGE apart, so
# a block computes a TILE x TILE tile of the output, reading k TILE at a time
# through shared memory.
EDGE = math.isqrt(BLOCK)
PER_THREAD = 2
TILE = EDGE * PER_THREAD
MIN_BLOCKS = 2  # product blocks each multiprocessor must fit at once (bounds the registers per thread)


def tile_registers() -> dict:
    """The product kernel's per-thread registers, as C: PER_THREAD values of A
    (rows ty, ty + EDGE, ...) and of B (columns tx, tx + EDGE, ...) per k, and
    an accumulator for each of their products with its (m, n) offset."""
    picks = range(PER_THREAD)

    def at(base, i):
        return f"{base} + {i * EDGE}" if i else base
    return {"a_loads": [f"a{i} = As[kk][{at('ty', i)}]" for i in picks],
            "b_loads": [f"b{j} = Bs[kk][{at('tx', j)}]" for j in picks],
            "zeroed": [f"acc{i}{j} = 0.0f" for i in picks for j in picks],
            "products": [[f"acc{i}{j} += a{i} * b{j};" for j in picks] for i in picks],
            "outputs": [(f"acc{i}{j}", i * EDGE, j * EDGE) for i in picks for j in picks]}


# --- templates -----------------------------------------------------------------------------
@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    root = resources.files("rnnc.templates")
    return jinja2.Environment(loader=jinja2.FunctionLoader(lambda name: root.joinpath(name).read_text()),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **values) -> str:
    return environment().get_template(template).render(**values)


# --- launch extents --------------------------------------------------------------------------
def extent(axes: list, div: int = 1) -> Extent:
    """The launch extent of a list of (size or None for rows) sizes."""
    return Extent(math.prod(s for s in axes if s is not None), any(s is None for s in axes), div)


def total_expr(axes: list) -> str:
    e = extent([s for s, _ in axes])
    return size_expr(e.n, e.rows)


# --- products ----------------------------------------------------------------------------------
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


# --- reductions --------------------------------------------------------------------------------
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


# --- the kernels of a program ------------------------------------------------------------------
class Generator:
    """Collects kernel sources and launches for a whole program. A kernel's
    launch goes to the region it belongs to (`region.launches`), which also
    gives the kernel's name prefix (`region.label`) and rows (`region.rows`)."""

    def __init__(self):
        self.sources: list = []
        self.count = 0

    def name(self, region, family: str) -> str:
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
                                   comment=comment(note), block=BLOCK, **values))
        region.launches.append(Launch(name, grid, BLOCK, region.rows,
                                      tuple((r.buffer, r.selector) for r in refs)))

    def elementwise(self, region, family, loops, comments):
        refs = [r for loop in loops for r in loop.refs.values()]
        work = max((Extent(math.prod(loop.shape), loop.batched, BLOCK) for loop in loops),
                   key=lambda e: (e.rows, e.n))
        self.emit(region, family, "elementwise.cu.j2", refs, (work, Extent(1), Extent(1)),
                  "; ".join(comments), loops=[{"total": loop.total, "lines": loop.lines} for loop in loops])

    def breaking(self, region, n, args: list, out: Ref, op: str, note: str):
        """The kernel of breaking node `n` (`BREAKING`) reading `args`, writing
        (op `=`) or adding to (op `+=`) `out`."""
        BREAKING[n.op](self, region, n, args, out, op, note)

    def contract(self, region, n, args, out, op, note):
        (a, b), spec = args, n.attr("spec")
        c = contraction(spec, a, b, out)
        sizes = c.pop("sizes")
        grid = (extent(sizes["n"], TILE), extent(sizes["m"], TILE), extent(sizes["g"]))
        exprs = {f"{v}_size": size_expr(e.n, e.rows) for v in "gmnk" for e in [extent(sizes[v])]}
        self.emit(region, "dot", "contract.cu.j2", [a, b, out], grid, f"{note}  [{spec}]",
                  a=a.param, b=b.param, c=out.param, op=op, tile=TILE, edge=EDGE, per_thread=PER_THREAD,
                  min_blocks=MIN_BLOCKS, **tile_registers(), **exprs, **c)

    def reduce(self, region, n, args, out, op, note):
        (src,) = args
        kept, reduced = reduction_axes(n, src)
        count = math.prod(s for s, _ in reduced if s is not None)
        scale = f" * {c_float(1.0 / count)}" if n.op == "mean" else ""
        work = extent([s for s, _ in kept], BLOCK)
        self.emit(region, n.op, "reduce.cu.j2", [src, out], (work, Extent(1), Extent(1)), note,
                  x=src.param, y=out.param, op=op, scale=scale, out_total=total_expr(kept),
                  red_total=total_expr(reduced), base=flat_terms("o_", kept), step=flat_terms("r_", reduced))

    def softmax(self, region, n, args, out, op, note):
        (src,) = args
        shape = src.shape
        axis = n.attr("axis") % len(shape)
        outer, size, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        work = Extent(outer * inner, src.batched, BLOCK)
        self.emit(region, "softmax", "softmax.cu.j2", [src, out], (work, Extent(1), Extent(1)), note,
                  x=src.param, y=out.param, op=op, size=size, inner=inner, span=size * inner,
                  lanes=size_expr(outer * inner, src.batched))


# the ops whose node is a kernel of its own, and the Generator method that builds it
BREAKING = {"dot": Generator.contract, "sum": Generator.reduce, "mean": Generator.reduce,
            "reduce_to": Generator.reduce, "softmax": Generator.softmax}
