"""Kernel builders: each kernel's source from a jinja2 template, and its launch.

The templates in `templates/` only fill in strings prepared here. A kernel
family's template writes a body, a device function written for any grid
(`Part`); a launch runs one body (`kernel.cu.j2`), several side by side
(`fused.cu.j2`: the blocks of the grid go to each in turn) or several in a
row for each example (`rows.cu.j2`: a block per row), each through a device
function of its own, `{kernel}_body`, given the launch's shared memory (one
pool, which its bodies take in turn). A persistent kernel
(`persistent.cu.j2`) runs the launches of every step of a per-step launch
list, calling those functions over their grids in turn; where a launch's
product multiplies by a param, it calls the launch's `{kernel}_kept_body`
instead, which keeps each block's slice of the param in shared memory from
step to step (`kept_operands` picks which, `products.ProductKernel.values`
says how). The families:

- `elementwise.cu.j2`: a phase of fused elementwise work (`elementwise.py`
  prepares its loops).
- `contract.cu.j2`: a tiled product for one `dot` spec (batched or shared
  operands), seen as out[g, m, n] = sum_k A[g, m, k] * B[g, k, n]
  (`products.py` decides its tiles and inner loop; `contract_store.cu.j2`
  or `contract_split.cu.j2` writes the result, then `contract_rows.cu.j2`
  runs the elementwise work that reads it, a tile of rows at a time).
- `reduce.cu.j2`: sum, mean and reduce_to (a sum over some axes).
- `softmax.cu.j2`: softmax over one small axis.

The last three are the *breaking* kernels: an op whose registry entry is a
`Kernel` names its template, and the template's builder here (`BUILDERS`)
takes the op's parameters of it; such a node needs all of its arguments
before it starts, so it ends the phase they come from. Block sizes are set
here and tile sizes in `products.py`, once, and passed to the templates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

import jinja2

from ...ops import BATCH, OPS
from .cexpr import Joined, Ref, c_float, comment, decode, offset, parts_of, size_expr, strides
from .launches import ELEMS, Buffer, Extent, Launch, Persistent
from .occupancy import GPUS
from .products import INPUTS, NOMINAL_ROWS, Contraction, product_kernel, tile_bytes

BLOCK = 256  # threads per block of the elementwise, reduction and softmax kernels
# A persistent kernel's shared memory, kept operands and all, at most: two blocks a
# multiprocessor of an H100 or H200 (a block per multiprocessor of an A100)
KEPT_SHARED = GPUS["H100"].shared_per_sm // 2 - GPUS["H100"].reserved_shared_per_block


# --- templates -----------------------------------------------------------------------------
@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    root = resources.files("rnnc.templates")
    return jinja2.Environment(loader=jinja2.FunctionLoader(lambda name: root.joinpath(name).read_text()),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **values) -> str:
    return environment().get_template(template).render(**values)


@lru_cache(maxsize=None)
def intrinsics() -> str:
    """templates/intrinsics.cu: the PTX instructions as device functions, C as it is."""
    return resources.files("rnnc.templates").joinpath("intrinsics.cu").read_text()


# --- launch extents --------------------------------------------------------------------------
def extent(axes: list, div: int = 1) -> Extent:
    """The launch extent of a list of (size or None for rows) sizes."""
    return Extent(math.prod(s for s in axes if s is not None), any(s is None for s in axes), div)


def extent_c(e: Extent, rows: str = "rows") -> str:
    """An extent as C (unsigned, at least 1) for `rows` rows, as `executor.blocks` counts it."""
    return f"unsigned(max(1, ({rows} * {e.n} + {e.div - 1}) / {e.div}))" if e.rows else str(max(1, -(-e.n // e.div)))


def grid_c(launch: Launch) -> list:
    """The grid of `launch` as C (3 unsigned expressions of `rows`): a launch of
    several kernels has a block for each block of each of their grids."""
    if launch.parts:
        return [" + ".join(f"({' * '.join(extent_c(e) for e in part)})" for part in launch.parts), "1u", "1u"]
    return [extent_c(e) for e in launch.grid]


def pool_bytes(shared: int) -> int:
    """The size of a kernel's pool of shared memory for bodies that take `shared`
    bytes of it (at least 16: C has no empty arrays)."""
    return max(16, aligned16(shared))


def column_groups(loops: list, out: Ref) -> tuple | None:
    """(groups, per_row) where the product's columns are `groups` groups of
    per_row and the elementwise work after it reads, for a row's element u +
    g * per_row of any of its loops, only the product's columns u + g' *
    per_row (an LSTM's hidden unit u reads its four gates); else None. Each
    loop runs over a row of one axis, a multiple of per_row (the shortest)."""
    if len(out.shape) != 1 or any(len(loop.shape) != 1 for loop in loops):
        return None
    per_row, columns = min(loop.shape[0] for loop in loops), out.shape[0]
    for loop in loops:
        offsets = loop.offsets_read(out.param)
        if offsets is None or any(x % per_row for x in [loop.shape[0], columns, *offsets]):
            return None
    return columns // per_row, per_row


def kept_operands(pool: int, launches: list) -> dict:
    """Which launches of a persistent kernel keep their parts' B operands in
    shared memory across steps, given (kernel, the bytes of each part's kept
    operand) in order: each that still fits, first come first kept, in
    KEPT_SHARED with the kernels' pool of `pool` bytes; kernel -> (where its
    operands start, their bytes)."""
    held, end = {}, pool
    for kernel, regions in launches:
        if regions and end + sum(regions) <= KEPT_SHARED:
            held[kernel] = (end, regions)
            end += sum(regions)
    return held


def aligned16(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


def launch_bounds(parts: list) -> str:
    """The __launch_bounds__ of a launch of `parts`: none where a part wants
    none, else their block size and the fewest blocks per multiprocessor any
    of them asks for."""
    if any(part.bounds is None for part in parts):
        return ""
    asks = [part.bounds[1] for part in parts if len(part.bounds) > 1]
    values = [parts[0].block] + ([min(asks)] if asks else [])
    return f"__launch_bounds__({', '.join(map(str, values))}) "


def total_expr(axes: list) -> str:
    e = extent([s for s, _ in axes])
    return size_expr(e.n, e.rows)


# --- products ----------------------------------------------------------------------------------
def contraction(spec: str, a: Ref, b: Ref, out: Ref) -> Contraction:
    """The `dot` spec as a batched product out[g, m, n] = sum_k A[g, m, k] B[g, k, n]."""
    ins, out_letters = spec.split("->")
    la, lb = ins.split(",")
    size = {}
    for letters, ref in ((la, a), (lb, b)):
        size.update(zip(letters.replace(BATCH, ""), ref.shape))
    lonely = [c for c in la + lb if c not in out_letters and not (c in la and c in lb)]
    if lonely:
        raise ValueError(f"dot {spec}: letter {lonely[0]!r} is summed in one operand only")
    strides = {"a": letter_strides(la, a), "b": letter_strides(lb, b), "c": letter_strides(out_letters, out)}
    groups = {"g": [c for c in out_letters if c in la and c in lb],
              "m": [c for c in out_letters if c in la and c not in lb],
              "n": [c for c in out_letters if c in lb and c not in la],
              "k": [c for c in la if c in lb and c not in out_letters]}
    sizes, terms, index = {}, {op: {} for op in "abc"}, {}
    for var, letters in groups.items():
        letters = sorted(letters, key=lambda c: c != BATCH)  # the batch letter outermost
        sizes[var] = [None if c == BATCH else size[c] for c in letters]
        index.update(zip(letters, decode(var, sizes[var])))
        for op in "abc":
            terms[op][var] = [(index[c], strides[op].get(c, 0)) for c in letters]
    pieces = {op: joined_pieces(letters, operand, groups, index)
              for op, letters, operand in (("a", la, a), ("b", lb, b)) if isinstance(operand, Joined)}
    return Contraction(sizes, terms, {"a": a.numel, "b": b.numel, "c": out.numel}, pieces)


def joined_pieces(letters: str, joined: Joined, groups: dict, index: dict) -> list:
    """Each part of a Joined operand as (param, the index along the joined
    axis where the part ends, its offset, the numbers its vector copies must
    divide): its own strides, the joined axis's index counted from its start."""
    own = [c for c in letters if c != BATCH]
    axis_letter = own[joined.axis]
    out = []
    for ref, start in joined.parts:
        table = letter_strides(letters, ref)
        moved = {c: f"({index[c]} - {start})" if c == axis_letter and start else index[c] for c in table}
        terms = [(moved[c], table[c]) for group in groups.values() for c in sorted(group, key=lambda c: c != BATCH)
                 if c in table]
        stop = start + ref.shape[joined.axis]
        out.append((ref.param, index[axis_letter], stop, offset(terms),
                    [ref.numel, start] + [s for s in table.values() if s != 1]))
    return out


def letter_strides(letters: str, ref: Ref) -> dict:
    """The stride in `ref`'s buffer of each letter of its part of a `dot` spec
    (the batch letter strides over whole rows)."""
    own = [c for c in letters if c != BATCH]
    table = dict(zip(own, strides(ref.shape)))
    if BATCH in letters:
        table[BATCH] = ref.numel
    return table


# --- reductions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReduceLayout:
    """How reduce.cu.j2's BLOCK threads share out a block's `per_block` outputs:
    thread (lane, warp) works on output `o_lane` as its `r_lane`-th thread;
    `shuffles` add up the sums of an output's threads within a warp (the
    lanes `lead` selects hold them), then `warps` warps' sums are added."""

    name: str
    per_block: int
    o_lane: str
    r_lane: str
    shuffles: tuple
    lead: str
    warps: int


# a warp per output: its 32 lanes read consecutive r (the reduced axis is contiguous)
WARP_PER_OUTPUT = ReduceLayout("a warp per output", BLOCK // 32, "warp", "lane", (16, 8, 4, 2, 1),
                               "lane == 0", 1)
# 8 consecutive outputs side by side in every warp, 4 lanes and 8 warps each (the outputs are contiguous)
SIDE_BY_SIDE = ReduceLayout("8 outputs side by side, 4 lanes of each of 8 warps per output", 8, "lane % 8",
                            "lane / 8 + 4 * warp", (16, 8), "lane < 8", BLOCK // 32)
# the whole block per output (a handful of outputs, each a long sum)
BLOCK_PER_OUTPUT = ReduceLayout("the whole block per output", 1, "0", "threadIdx.x", (16, 8, 4, 2, 1),
                                "lane == 0", BLOCK // 32)


def reduce_layout(kept: list) -> ReduceLayout:
    """A block per output when there are fewer outputs than a block takes;
    else threads side by side along the outputs when they are contiguous in
    the input, along the sum when not."""
    if all(s is not None for s, _ in kept) and math.prod(s for s, _ in kept) < SIDE_BY_SIDE.per_block:
        return BLOCK_PER_OUTPUT
    if kept and kept[-1][1] == 1:
        return SIDE_BY_SIDE
    return WARP_PER_OUTPUT


def reduction_axes(src: Ref, axes: tuple, rows: bool):
    """(kept, reduced) axes of a sum over `axes` of `src` (and over its rows
    when `rows`), each a list of (size or None for rows, stride in `src`)."""
    kept, reduced = [], []
    if src.batched:
        (reduced if rows else kept).append((None, src.numel))
    for k, axis in enumerate(zip(src.shape, strides(src.shape))):
        (reduced if k in axes else kept).append(axis)
    return kept, reduced


def flat_terms(var: str, axes: list) -> str:
    sizes = [s for s, _ in axes]
    return offset(list(zip(decode(var, sizes), [st for _, st in axes])))


# --- the kernels of a program ------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A kernel's work as a device function, `{name}_body(blockIdx, gridDim,
    rows, buffers...)`, written for a grid of `grid` (3 Extents) blocks of
    `block` threads; `bounds`: its __launch_bounds__ (threads, and blocks per
    multiprocessor where it asks for some), None for none; `shared`: the bytes
    of shared memory it declares; `refs`: its buffers, in its parameters' order;
    `kept`: for a product that can keep its B operand in shared memory across a
    persistent kernel's steps, the bytes that takes, else 0; `kept_sources`:
    then the source of its body that does so, `{name}_kept_body` (which takes
    them at `held_`), for a persistent kernel that keeps it to add."""

    name: str
    grid: tuple
    block: int
    bounds: tuple | None
    shared: int
    refs: tuple
    kept: int = 0
    kept_sources: tuple = ()

    @property
    def args(self) -> str:
        return ", ".join(["rows"] + [r.param for r in self.refs])


class Launched(NamedTuple):
    """What a persistent kernel needs to know of a launch's kernel: its buffers'
    Refs, the shared memory its bodies declare, the bytes of each of its parts'
    kept operands (`Part.kept`) in order, and the sources of its kept body."""

    refs: list
    shared: int
    kept: tuple = ()
    kept_sources: tuple = ()


class Generator:
    """Collects kernel sources and launches for a whole program. A kernel
    builder makes a `Part` (the kernel's body), and `launch` makes one launch
    of one or several parts, which goes to the region it belongs to
    (`region.launches`); the region also gives the kernel's name prefix
    (`region.label`) and rows (`region.rows`). Products read their inputs as
    `inputs` (`products.INPUTS`) says: "fp32" or "tf32" for the precisions of
    rnnc/precision.py, "bf16" or "f16" for 16-bit arrays. The scratch buffers
    kernels need for themselves (split-K's) go to `scratch`."""

    def __init__(self, inputs: str):
        self.sources: list = []
        self.count = 0
        self.inputs = INPUTS[inputs]
        self.scratch: dict = {}  # name -> launches.Buffer
        self.launched: dict = {}  # kernel name -> Launched

    def name(self, region, family: str) -> str:
        self.count += 1
        return f"rnnc_{region.label}_{self.count}_{family}"

    @staticmethod
    def signature(refs) -> str:
        """The kernel's parameters: rows, then one pointer per buffer slot it reads or writes."""
        return ", ".join(["const int rows"] + [f"{r.elem}* {r.param}" for r in refs])

    def emit(self, name, template, refs, grid, note, block=BLOCK, bounds=(BLOCK,), shared=0, keeping=None,
             **values) -> Part:
        """The body of kernel `name` from `template`, as a Part; `keeping`, for a
        product that can keep its B operand across steps: (the bytes that
        takes, the values that differ), its `{name}_kept_body` from the same
        template. Bodies are `static`: their __shared__ arrays stay inside
        their own module (as inline functions' static locals, g++ would make
        them one object across all the libraries the tests' emulator loads)."""
        refs = tuple({r.param: r for r in refs}.values())
        bytes_, kept_values = keeping or (0, None)
        sources = [render(template, name=f"{name}_{body}", comment=comment(note), block=block,
                          params=self.body_params(refs, held), **{**values, **differ})
                   for body, held, differ in [("body", False, {})] + [("kept_body", True, kept_values)] * bool(keeping)]
        self.sources.append(sources[0])
        return Part(name, grid, block, bounds, shared, refs, bytes_, tuple(sources[1:]))

    def launch(self, region, parts: list):
        """One launch of `parts`, kernels that need nothing of each other, on
        blocks of one size: a kernel of its own for one part, on the part's
        grid; else a kernel whose blocks go to each part in turn. Either way
        the launch's work is a device function, `{kernel}_body`, that a
        persistent kernel calls as well (`persistent`)."""
        refs = list({r.param: r for part in parts for r in part.refs}.values())
        kept = tuple(source for part in parts for source in part.kept_sources)
        if len(parts) == 1:
            (part,) = parts
            name, grid, split = part.name, part.grid, ()
        else:
            name, grid, split = self.name(region, "fused"), (Extent(1),) * 3, tuple(part.grid for part in parts)
            bodies = [render("fused.cu.j2", name=f"{name}_{'kept_' * held}body", params=self.body_params(refs, held),
                             comment=comment(" | ".join(part.name for part in parts)),
                             parts=self.fused_parts(parts, held)) for held in (False, True)[:1 + bool(kept)]]
            self.sources.append(bodies[0])
            kept += tuple(bodies[1:])
        self.add_launch(region, Launch(name, grid, parts[0].block, region.rows,
                                       tuple((r.buffer, r.selector) for r in refs), split),
                        refs, launch_bounds(parts), max(part.shared for part in parts),
                        (tuple(aligned16(part.kept) for part in parts if part.kept), kept))

    @staticmethod
    def fused_parts(parts: list, held: bool) -> list:
        """fused.cu.j2's parts; where `held`, the kept bodies of the parts that
        have one, each given its own stretch of the launch's `held_`."""
        spelled, at = [], 0
        for part in parts:
            kept = held and part.kept
            spelled.append({"body": f"{part.name}_{'kept_' * bool(kept)}body", "held": f"held_ + {at}, " * bool(kept),
                            "args": part.args, "grid": [extent_c(e) for e in part.grid]})
            at += aligned16(part.kept) if kept else 0
        return spelled

    def add_launch(self, region, launch: Launch, refs: list, bounds: str, shared: int, kept: tuple = ((), ())):
        """`launch` of the device function `{kernel}_body` over `refs`, as a
        kernel of its own that gives it `shared` bytes of shared memory;
        `kept`: the bytes of its parts' kept operands (`Part.kept`) and the
        sources of its kept body, for a persistent kernel."""
        self.sources.append(render("kernel.cu.j2", name=launch.kernel, body=f"{launch.kernel}_body", bounds=bounds,
                                   params=self.signature(refs), args=", ".join(["rows"] + [r.param for r in refs]),
                                   shared=pool_bytes(shared)))
        self.launched[launch.kernel] = Launched(refs, shared, *kept)
        region.launches.append(launch)

    def body_params(self, refs, held: bool = False) -> str:
        """A body's parameters: its block and grid, the launch's shared memory
        (and, a kept body's, where it keeps its operand), then the kernel's."""
        return ", ".join(["const uint3 blockIdx, const uint3 gridDim, char* const shared_"]
                         + ["char* const held_"] * held + [self.signature(refs)])

    def persistent(self, name: str, launches: list):
        """One kernel that runs every step of the per-step launch list `launches`
        (templates/persistent.cu.j2), or the reason it cannot: (Persistent or
        None, the reason or None). Its blocks run every kernel of the list, so
        they must all take blocks of one size; they take their shared memory
        from one pool in turn, and after it, the params its products keep."""
        if not launches:
            return None, "no launches a step"
        sizes = sorted({launch.block for launch in launches})
        if len(sizes) > 1:
            return None, f"its kernels take blocks of {' and '.join(map(str, sizes))} threads"
        launched = [self.launched[launch.kernel] for launch in launches]
        pool = pool_bytes(max(made.shared for made in launched))
        held = kept_operands(pool, [(launch.kernel, made.kept) for launch, made in zip(launches, launched)])
        self.sources += [source for kernel in held for source in self.launched[kernel].kept_sources]
        phases, at = [], 0
        for launch, made in zip(launches, launched):
            args = ["rows"] + [f"reinterpret_cast<{r.elem}*>(at_[{at + 1 + k}])" for k, r in enumerate(made.refs)]
            kept = launch.kernel in held
            phases.append({"kernel": launch.kernel, "body": f"{launch.kernel}_{'kept_' * kept}body",
                           "held": f"shared_ + {held[launch.kernel][0]}, " if kept else "",
                           "at": at, "grid": grid_c(launch), "args": ", ".join(args)})
            at += 1 + len(made.refs)
        shared = pool + sum(sum(regions) for _, regions in held.values())
        flags = [start + sum(regions[:i]) for start, regions in held.values() for i in range(len(regions))]
        self.sources.append(render("persistent.cu.j2", name=name, block=sizes[0], width=at, phases=phases,
                                   pool=pool, shared=shared, flags=flags,
                                   comment=comment(f"{name}: " + " | ".join(launch.kernel for launch in launches))))
        unkept = tuple(launch.kernel for launch, made in zip(launches, launched) if made.kept and launch.kernel not in held)
        return Persistent(name, sizes[0], shared, tuple(held), unkept), None

    def scratch_ref(self, name, numel, batched, role="scratch") -> Ref:
        """A buffer of the kernel's own, `numel` floats (per row when `batched`)."""
        self.scratch[name] = Buffer(name, numel, batched, "one", role)
        return Ref(name, "base", (numel,), batched)

    def elementwise(self, region, family, loops, comments) -> Part:
        """A phase of fused elementwise work. No __launch_bounds__: given only the
        block size, ptxas (CUDA 13, sm_90) holds some small kernels to 32
        registers and spills; without it they take what they need (64 at most)."""
        refs = [r for loop in loops for r in loop.refs.values()]
        work = max((Extent(math.prod(loop.shape), loop.batched, BLOCK) for loop in loops),
                   key=lambda e: (e.rows, e.n))
        return self.emit(self.name(region, family), "elementwise.cu.j2", refs, (work, Extent(1), Extent(1)),
                         "; ".join(comments), bounds=None,
                         loops=[{"total": loop.total, "lines": loop.live_lines()} for loop in loops])

    def breaking(self, region, n, args: list, out: Ref, op: str, note: str, then=None, block_of=False) -> Part:
        """The kernel of node `n`, an op whose lowering is a `Kernel`, reading
        `args`, writing (op `=`) or adding to (op `+=`) `out`; then, for a
        product that `takes_rows_after`, the elementwise loops `then`
        ((loops, comments): a phase that reads it, row by row). `block_of`:
        it runs on blocks of BLOCK threads (a product then picks its tile
        for them), as it shares them with other kernels."""
        lowering = OPS[n.op].cuda
        extra = {"then": then} if then else {}
        if lowering.template == "contract.cu.j2":
            extra["block_of"] = block_of
        return BUILDERS[lowering.template](self, region, n, args, out, op, note, **lowering.params(n, *args),
                                           **extra)

    @staticmethod
    def takes_rows_after(n, args: list, out: Ref) -> bool:
        """Whether node `n` is a product whose launch can go on with elementwise
        work row by row: its tiles split the batch rows along m and nothing
        else is per example, so the rows of a tile of m are done together."""
        lowering = OPS[n.op].cuda
        if lowering.template != "contract.cu.j2" or not out.batched:
            return False
        c = contraction(lowering.params(n, *args)["spec"], *args, out)
        return c.sizes["m"] == [None] and not c.sizes["g"]

    @staticmethod
    def row_local(n, args: list, out: Ref) -> bool:
        """Whether node `n`'s kernel works example by example, so a block can run
        it for one row (`rows_launch`): a sum or a softmax within each example,
        or a product per example."""
        lowering = OPS[n.op].cuda
        params = lowering.params(n, *args)
        if not (out.batched and args[0].batched):
            return False
        if lowering.template == "contract.cu.j2":
            return contraction(params["spec"], *args, out).sizes["g"] == [None]
        return lowering.template == "softmax.cu.j2" or (lowering.template == "reduce.cu.j2" and not params["rows"])

    def rows_launch(self, region, stages: list):
        """One launch that runs `stages` row by row, a block per row: each a
        Part (its body for one row, over its grid's blocks one by one) or
        elementwise loops (loops, comments) of a phase, in order."""
        refs, spelled, notes = [], [], []
        for stage in stages:
            if isinstance(stage, Part):
                refs += stage.refs
                notes.append(stage.name)
                args = ["1"] + [f"{r.param} + row_ * {r.numel}" if r.batched else r.param for r in stage.refs]
                spelled.append({"body": f"{stage.name}_body", "args": ", ".join(args),
                                "grid": [extent_c(e, "1") for e in stage.grid]})
            else:
                loops, comments = stage
                refs += [r for loop in loops for r in loop.refs.values()]
                notes += comments
                spelled.append({"body": None, "loops": [{"per_row": math.prod(loop.shape), "lines": loop.live_lines()}
                                                        for loop in loops]})
        refs = list({r.param: r for r in refs}.values())
        name = self.name(region, "rows")
        self.sources.append(render("rows.cu.j2", name=f"{name}_body", params=self.body_params(refs),
                                   comment=comment("; ".join(notes)), stages=spelled))
        self.add_launch(region, Launch(name, (Extent(1, True), Extent(1), Extent(1)), BLOCK, region.rows,
                                       tuple((r.buffer, r.selector) for r in refs)),
                        refs, "", max([stage.shared for stage in stages if isinstance(stage, Part)], default=0))

    def contract(self, region, n, args, out, op, note, spec, then=None, block_of=False) -> Part:
        a, b = args
        c = contraction(spec, a, b, out)
        threads = {"threads": BLOCK} if block_of else {}
        kernel = product_kernel(c, self.inputs, NOMINAL_ROWS[region.rows], {"a": ELEMS[a.elem], "b": ELEMS[b.elem]},
                                **threads)
        b_at = aligned16(tile_bytes(kernel.tiles["a"]))
        flags_at = aligned16(b_at + tile_bytes(kernel.tiles["b"]))
        name, engine = self.name(region, "dot"), kernel.engine
        rows, rows_refs = None, []
        if then:
            kernel, rows, rows_refs = self.rows_after(name, kernel, then[0], out)
            note = f"{note}; then {'; '.join(then[1])}"
        # tiles along n: of BN columns, or of units (ProductKernel.owning)
        columns = Extent(kernel.columns[1], False, kernel.n_step) if kernel.columns else extent(c.sizes["n"], engine.bn)
        extra = self.split_buffers(name, c, kernel, -(-columns.n // columns.div)) if kernel.splits > 1 else {}
        refs = [*parts_of(a), *parts_of(b), out, *extra.values(), *rows_refs]
        extra = {k: r.param for k, r in extra.items()}
        grid = (columns, extent(c.sizes["m"], engine.bm),
                Extent(kernel.splits) if kernel.splits > 1 else extent(c.sizes["g"]))
        exprs = {f"{v}_size": size_expr(e.n, e.rows) for v in "gmnk" for e in [extent(c.sizes[v])]}
        params = [x.param if isinstance(x, Ref) else None for x in (a, b)]
        values = kernel.values(*params, b_at)
        # a param (or a value made of params) as B of a product of every step: each block of a
        # persistent kernel may keep its slice from step to step
        keeping = (kernel.kept_bytes, kernel.values(*params, b_at, kept=True)) if (
            region.persistent and isinstance(b, Ref) and b.fixed and not c.sizes["g"]) else None
        return self.emit(name, "contract.cu.j2", refs, grid, f"{note}  [{spec}]", block=kernel.block,
                         bounds=(kernel.block, values["min_blocks"]), keeping=keeping,
                         shared=flags_at + 8, flags_at=flags_at,  # the tiles, then two flags
                         c=out.param, op=op, rows=rows, **values, **exprs, **extra)

    def rows_after(self, name, kernel, loops: list, out: Ref) -> tuple:
        """The elementwise `loops` a product's launch runs after it, as
        contract.cu.j2's `rows`: where a row's element j reads only the
        product's columns j + g * per_row (`column_groups`), each block runs
        them for the units whose columns its tile holds (`ProductKernel.owning`,
        contract_units.cu.j2); else the last block to finish a tile of rows
        runs them for all of its columns (contract_rows.cu.j2, which counts
        the tiles done with tickets). (The kernel, owning where it does; the
        rows; the buffers they add.)"""
        finished = "last_" if kernel.splits > 1 else "true"
        groups = column_groups(loops, out)
        owning = kernel.owning(*groups) if groups else None
        spelled = [{"per_row": math.prod(loop.shape), "lines": loop.live_lines(),
                    "groups": math.prod(loop.shape) // groups[1] if owning else None} for loop in loops]
        refs = [r for loop in loops for r in loop.refs.values()]
        if owning:
            _, per_row, units = owning.columns
            return owning, {"template": "contract_units.cu.j2", "finished": finished, "units": units,
                            "per_row": per_row, "loops": spelled}, refs
        tickets = self.scratch_ref(f"rows:{name}", 1, True, "tickets")
        return kernel, {"template": "contract_rows.cu.j2", "tickets": tickets.param, "finished": finished,
                        "loops": spelled}, [tickets, *refs]

    def split_buffers(self, name, c: Contraction, kernel, column_tiles: int) -> dict:
        """A split-K product's workspace (each split's partial sums, [splits, M, N])
        and tickets (per output tile, the splits done so far; zero between launches)."""
        per_row = {v: math.prod(s for s in c.sizes[v] if s is not None) for v in "mn"}
        batched = None in c.sizes["m"] + c.sizes["n"]
        tiles = -(-per_row["m"] // kernel.engine.bm) * column_tiles
        return {"workspace": self.scratch_ref(f"split:{name}", kernel.splits * per_row["m"] * per_row["n"], batched),
                "tickets": self.scratch_ref(f"tickets:{name}", tiles, batched, "tickets")}

    def reduce(self, region, n, args, out, op, note, axes, rows, mean):
        (src,) = args
        kept, reduced = reduction_axes(src, axes, rows)
        count = math.prod(s for s, _ in reduced if s is not None)
        scale = f" * {c_float(1.0 / count)}" if mean else ""
        layout = reduce_layout(kept)
        work = extent([s for s, _ in kept], layout.per_block)
        return self.emit(
                  self.name(region, n.op), "reduce.cu.j2", [src, out], (work, Extent(1), Extent(1)), note,
                  shared=4 * layout.warps * layout.per_block, x=src.param, y=out.param, op=op, scale=scale, out_total=total_expr(kept),
                  red_total=total_expr(reduced), base=flat_terms("o_", kept), step=flat_terms("r_", reduced),
                  layout=layout.name, per_block=layout.per_block, lanes=BLOCK // layout.per_block,
                  o_lane=layout.o_lane, r_lane=layout.r_lane, shuffles=layout.shuffles, lead=layout.lead,
                  warps=layout.warps)

    def softmax(self, region, n, args, out, op, note, axis):
        (src,) = args
        shape = src.shape
        outer, size, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        work = Extent(outer * inner, src.batched, BLOCK)
        return self.emit(self.name(region, "softmax"), "softmax.cu.j2", [src, out], (work, Extent(1), Extent(1)), note,
                  x=src.param, y=out.param, op=op, size=size, inner=inner, span=size * inner,
                  lanes=size_expr(outer * inner, src.batched))


# the builder of each template of a kernel of its own (an op's `Kernel` names the template)
BUILDERS = {"contract.cu.j2": Generator.contract, "reduce.cu.j2": Generator.reduce,
            "softmax.cu.j2": Generator.softmax}
