"""Product kernels: the tile, shared-memory layout and inner loop of every
`dot`, decided here and spelled out by `templates/contract.cu.j2`.

A block computes a BM x BN tile of out[g, m, n] = sum_k A[g, m, k] B[g, k, n],
copying BK-wide slices of A and B into shared memory with `cp.async`, two
stages, so the next slice is in flight while this one is multiplied. Two
engines multiply a slice:

- `Simt` (exact float32): 16x16 threads, each a TM x TN patch of consecutive
  outputs, reading TM values of A and TN of B per k as vectors (LDS.64/128).
- `Mma` (tensor cores): warps of `mma.sync`, each a tile of 16x8 products;
  TF32 inputs (m16n8k8), or BF16/FP16 (m16n8k16), with float32 sums.
  Fragments sit in registers in the PTX ISA's layout ("Matrix Fragments for
  mma.m16n8k8" and "...m16n8k16").

Tiles are sized to the product (`choose_tile`): the largest tile that still
gives one block per multiprocessor of the GPU the kernels are sized for,
and split-K (several blocks per tile, each summing part of k, added up by the
last to finish) where k is long and the tiles too few. Products with a
single row, column or summand (a matrix-vector or outer product per example)
stay on `Simt`, which rounds its inputs as the tensor cores would.

Each operand is read in the element type of its buffer (`Elem`): float, or
under a 16-bit dtype the 16-bit type for the buffers kept narrow and float
for the others (states, scratch), which the engine rounds to the 16-bit type
as it reads them, so an operand's values are the same whichever buffer it
came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .cexpr import offset
from .launches import ELEMS, Elem

GPU_SMS = 132  # multiprocessors of the GPU the tiles are sized for (H100, H200)
NOMINAL_ROWS = {"B": 64, "TB": 64 * 100}  # rows of a region the tiles are sized for: a batch, T*B
SHARED_BYTES = 48 * 1024  # static shared memory one block may declare
TILE_BYTES = SHARED_BYTES - 32  # a product's tiles: the rest of its shared memory holds its flags
MIN_K_TILES = 4  # k slices each split of a split-K product sums, at least
WARP = 32


@dataclass(frozen=True)
class InputType:
    """What a product multiplies: the type its inputs round to and the engine's instruction."""

    name: str
    elem: str  # the element type of the data of this precision: float, or its 16-bit type
    mma: str | None = None  # the tensor-core function (templates/intrinsics.cu); None: SIMT
    mma_k: int = 1
    convert: str = ""  # TF32: applied to a float from shared memory to make a fragment register
    rounding: str = ""  # applied to a float before a SIMT multiply, so both engines round alike


INPUTS = {t.name: t for t in (
    InputType("fp32", "float"),
    InputType("tf32", "float", "rnnc_mma_tf32", 8, "rnnc_to_tf32", "rnnc_round_tf32"),
    InputType("bf16", "rnnc_bf16", "rnnc_mma_bf16", 16, rounding="rnnc_round_rnnc_bf16"),
    InputType("f16", "rnnc_f16", "rnnc_mma_f16", 16, rounding="rnnc_round_rnnc_f16"))}


# --- shared memory ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedTile:
    """One operand's slice in shared memory, per stage: `rows` rows along axis
    `outer` of `cols` elements along axis `inner` (axes named m, n or k), each
    row `stride` elements apart. `slot`: which copy of the slice an element is
    in, as C: the stage, or, for an operand kept whole (`ProductKernel.kept`),
    the slice's place along k."""

    array: str
    outer: str
    inner: str
    rows: int
    cols: int
    stride: int
    elem: Elem
    slot: str = "stage"

    def at(self, **pos) -> str:
        """The element at tile-relative positions (C expressions by axis name)."""
        return f"{self.array}[{self.slot}][({pos[self.outer]}) * {self.stride} + {pos[self.inner]}]"

    @property
    def elements(self) -> int:
        return self.rows * self.stride


def padded(cols: int, elem_bytes: int, skew: int) -> int:
    """A row length of at least `cols` elements that is an odd multiple of
    `skew` 4-byte words (4 or 8): rows then start `skew` banks apart modulo
    2*skew, so reads of 32/skew rows at once hit different banks, and rows
    stay 16-byte aligned for 16-byte copies."""
    per_word = 4 // elem_bytes
    words = -(-cols // per_word)
    words += (skew - words) % (2 * skew)
    return words * per_word


# --- engines -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Simt:
    """Exact float32: 16x16 threads, thread (tx, ty) owns outputs m = ty*TM + i,
    n = tx*TN + j; A and B are kept k-major in shared memory, so its TM values
    of A and TN of B at one k are consecutive and load as vectors."""

    bm: int
    bn: int
    kind: InputType
    threads = 256
    kstep = 1
    min_blocks = 2

    @property
    def tm(self) -> int:
        return self.bm // 16

    @property
    def tn(self) -> int:
        return self.bn // 16

    @property
    def accs(self) -> int:
        return self.tm * self.tn

    def summary(self) -> str:
        return f"float32 FMA, 16x16 threads with {self.tm}x{self.tn} outputs each"

    def inner(self, operand: str, global_inner: str | None) -> str:
        """The axis along a row of the operand in shared memory: m and n, whatever the global layout."""
        return {"a": "m", "b": "n"}[operand]

    def stride(self, tile_cols: int, inner: str, elem: Elem) -> int:
        return padded(tile_cols, elem.bytes, 4)

    setup = ("const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;",)

    def step(self, a: SharedTile, b: SharedTile) -> list:
        lines = []
        values = {"a": self._vector_loads(lines, "a", self.tm, a.elem, lambda i: a.at(m=f"ty * {self.tm} + {i}", k="kk")),
                  "b": self._vector_loads(lines, "b", self.tn, b.elem, lambda j: b.at(k="kk", n=f"tx * {self.tn} + {j}"))}
        for name, tile in (("a", a), ("b", b)):
            # the precision's rounding of product inputs, once per value; 16-bit values are already rounded
            if self.kind.rounding and tile.elem.c_type == "float":
                lines += [f"const float {name}{i} = {self.kind.rounding}({v});" for i, v in enumerate(values[name])]
                values[name] = [f"{name}{i}" for i in range(len(values[name]))]
        for i, av in enumerate(values["a"]):
            lines.append(" ".join(f"acc[{i * self.tn + j}] += {av} * {bv};" for j, bv in enumerate(values["b"])))
        return lines

    @staticmethod
    def _vector_loads(lines: list, name: str, count: int, elem: Elem, at) -> list:
        """`count` consecutive floats as float4/float2 loads (16-bit values
        one at a time, converted to float); their C names."""
        if elem.c_type != "float":
            lines += [f"const float {name}{v}_ = {at(v)};" for v in range(count)]
            return [f"{name}{v}_" for v in range(count)]
        width = min(count, 4)
        vector = {4: "float4", 2: "float2", 1: "float"}[width]
        for v in range(count // width):
            lines.append(f"const {vector} {name}{v}_ = *reinterpret_cast<const {vector}*>(&{at(v * width)});")
        if width == 1:
            return [f"{name}{v}_" for v in range(count)]
        return [f"{name}{i // width}_.{'xyzw'[i % width]}" for i in range(count)]

    @property
    def acc_m(self) -> str:
        return f"ty * {self.tm} + i / {self.tn}"

    @property
    def acc_n(self) -> str:
        return f"tx * {self.tn} + i % {self.tn}"


@dataclass(frozen=True)
class Mma:
    """Tensor cores: WM x WN warps, each a (BM/WM) x (BN/WN) tile of 16x8 mma
    products. Shared memory keeps each operand in its global layout (so the
    copies are 16-byte vectors); fragments are read from it in the PTX ISA's
    layout, lane = 4 * group + quad."""

    bm: int
    bn: int
    kind: InputType
    warps_m: int
    warps_n: int
    min_blocks = 1

    @property
    def threads(self) -> int:
        return WARP * self.warps_m * self.warps_n

    @property
    def kstep(self) -> int:
        return self.kind.mma_k

    @property
    def mi(self) -> int:  # 16-row products per warp
        return self.bm // self.warps_m // 16

    @property
    def ni(self) -> int:  # 8-column products per warp
        return self.bn // self.warps_n // 8

    @property
    def accs(self) -> int:
        return 4 * self.mi * self.ni

    def summary(self) -> str:
        shape = "m16n8k8" if self.kind.mma_k == 8 else "m16n8k16"
        return (f"tensor cores ({shape} mma.sync, {self.kind.name} inputs, float32 sums), "
                f"{self.warps_m}x{self.warps_n} warps with {self.mi}x{self.ni} products each")

    def inner(self, operand: str, global_inner: str | None) -> str:
        """The axis along a row of the operand in shared memory: the one it is contiguous along in memory."""
        return global_inner or {"a": "k", "b": "n"}[operand]

    def stride(self, tile_cols: int, inner: str, elem: Elem) -> int:
        # a fragment read takes 8 groups (along m or n) x 4 quads (along k): rows of
        # 4 odd words put 8 rows on different banks when k runs along the row, of 8 odd
        # words 4 rows when it runs across
        return padded(tile_cols, elem.bytes, 4 if inner == "k" else 8)

    @property
    def setup(self) -> tuple:
        return ("const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;",
                "const int group = lane / 4, quad = lane % 4;  // the PTX ISA's groupID, threadID_in_group",
                f"const int wm = warp / {self.warps_n} * {16 * self.mi}, "
                f"wn = warp % {self.warps_n} * {8 * self.ni};")

    def step(self, a: SharedTile, b: SharedTile) -> list:
        lines = [f"unsigned a_[{self.mi}][4], b_[{self.ni}][2];"]
        for i in range(self.mi):
            for r in range(4):  # rows group (+8 for r odd); k per the type's table
                m = f"wm + {16 * i + 8 * (r % 2)} + group"
                lines.append(f"a_[{i}][{r}] = {self.fragment(a, m, 'm', r // 2)};")
        for j in range(self.ni):
            for r in range(2):
                n = f"wn + {8 * j} + group"
                lines.append(f"b_[{j}][{r}] = {self.fragment(b, n, 'n', r)};")
        lines += [f"{self.kind.mma}(&acc[{4 * (i * self.ni + j)}], a_[{i}], b_[{j}]);"
                  for i in range(self.mi) for j in range(self.ni)]
        return lines

    def fragment(self, tile: SharedTile, free: str, axis: str, half: int) -> str:
        """One fragment register of A (axis m) or B (axis n) at row/column `free`:
        TF32, k = quad + 4*half; 16-bit types, k = 2*quad + 8*half and the next
        (a float operand's values converted to the type, to nearest even)."""
        if self.kind.mma_k == 8:
            return f"{self.kind.convert}({tile.at(**{axis: free, 'k': f'kk + quad + {4 * half}'})})"
        k = f"kk + 2 * quad + {8 * half}"
        if tile.inner == "k" and tile.elem.c_type == self.kind.elem:  # neighbours: one 32-bit load
            return f"*reinterpret_cast<const unsigned*>(&{tile.at(**{axis: free, 'k': k})})"
        pair = [tile.at(**{axis: free, "k": f"{k} + {h}"}) for h in range(2)]
        if tile.elem.c_type != self.kind.elem:
            pair = [f"{self.kind.elem}({v})" for v in pair]
        return f"rnnc_pack({pair[0]}.bits, {pair[1]}.bits)"

    @property
    def acc_m(self) -> str:  # accumulator i: product i / 4 (row-major over mi x ni), element i % 4
        return f"wm + i / {4 * self.ni} * 16 + i / 2 % 2 * 8 + group"

    @property
    def acc_n(self) -> str:
        return f"wn + i / 4 % {self.ni} * 8 + quad * 2 + i % 2"


# tiles, largest first: (BM, BN) for Simt, (BM, BN, warps along m, along n) for Mma
SIMT_TILES = ((128, 128), (128, 64), (64, 128), (64, 64), (64, 32), (32, 64), (32, 32))
MMA_TILES = ((128, 128, 2, 4), (128, 64, 4, 2), (64, 128, 2, 4), (64, 64, 2, 2), (64, 32, 2, 2),
             (32, 64, 2, 2), (32, 32, 2, 2))


# the smaller tiles on 8 warps, for a product that shares a launch with kernels of 256 threads
MMA_TILES_8_WARPS = ((64, 64, 2, 4), (64, 32, 2, 4), (32, 64, 2, 4), (32, 32, 2, 4))


def engines(kind: InputType, tensor_cores: bool, threads: int | None = None):
    """Every engine a product of `kind` may run on (on blocks of `threads`
    threads, where given), largest tile first."""
    if tensor_cores:
        tiles = MMA_TILES if threads is None else MMA_TILES + MMA_TILES_8_WARPS
        options = [Mma(bm, bn, kind, wm, wn) for bm, bn, wm, wn in tiles]
        return sorted([e for e in options if threads in (None, e.threads)], key=lambda e: -e.bm * e.bn)
    return [Simt(bm, bn, kind) for bm, bn in SIMT_TILES]


def choose_tile(options: list, m: int, n: int, g: int):
    """The largest tile with at least a block per multiprocessor, else the
    smallest; a tile is never much larger than the product (BM at most M
    rounded up to a power of two, at least 32; BN likewise)."""
    fitting = [e for e in options
               if e.bm <= max(32, 1 << (m - 1).bit_length()) and e.bn <= max(32, 1 << (n - 1).bit_length())]
    return next((e for e in fitting if blocks(e, m, n, g) >= GPU_SMS), fitting[-1])


def blocks(engine, m: int, n: int, g: int) -> int:
    """Blocks of a launch of `engine`'s tiles over g products of m x n."""
    return -(-m // engine.bm) * -(-n // engine.bn) * g


def slice_depth(engine, inner: dict, elems: dict, k: int, shared: int) -> int:
    """BK: 32 when k is longer than 16 and both stages of both operands fit in
    `shared` bytes, else 16."""
    return next(bk for bk in (32, 16) if (bk == 16 or k > 16)
                and shared_bytes(shared_tiles(engine, inner, elems, bk)) <= shared)


def shared_tiles(engine, inner: dict, elems: dict, bk: int) -> dict:
    """Each operand's SharedTile for slices of depth `bk`, its rows along
    `inner[operand]`, of its elements `elems[operand]`."""
    tiles = {}
    for operand, array, free, width in (("a", "As", "m", engine.bm), ("b", "Bs", "n", engine.bn)):
        size = {"k": bk, free: width}
        across = inner[operand]
        outer = free if across == "k" else "k"
        tiles[operand] = SharedTile(array, outer, across, size[outer], size[across],
                                    engine.stride(size[across], across, elems[operand]), elems[operand])
    return tiles


def tile_bytes(tile: SharedTile) -> int:
    """The bytes of one operand's SharedTile in its two stages."""
    return 2 * tile.elements * tile.elem.bytes


def shared_bytes(tiles: dict) -> int:
    return sum(map(tile_bytes, tiles.values()))


# --- a product's kernel --------------------------------------------------------------------------
@dataclass(frozen=True)
class Contraction:
    """A `dot` spec as out[g, m, n] = sum_k A[g, m, k] B[g, k, n]: each of g, m,
    n, k a group of letters (the batch letter first), its sizes (None for the
    rows), and for each operand (a, b, c) the index expression and stride of
    each letter."""

    sizes: dict  # group -> [size or None]
    terms: dict  # operand -> group -> [(C expression, stride)]
    numel: dict  # operand -> elements per row (batched) or in all
    # a concatenation read where its parts are (kernels.joined_pieces): operand ->
    # [(param, index along the joined axis, where the part ends, its offset, numbers copies divide)]
    pieces: dict = field(default_factory=dict)

    GROUPS = {"a": "gmk", "b": "gkn", "c": "gmn"}

    def offset(self, operand: str) -> str:
        return offset([t for group in self.GROUPS[operand] for t in self.terms[operand][group]])

    def size(self, group: str, rows: int) -> int:
        return math.prod(rows if s is None else s for s in self.sizes[group])

    def global_inner(self, operand: str) -> str | None:
        """The axis (m, n or k) along which the operand is contiguous in memory:
        the one whose innermost letter has unit stride."""
        for group in self.GROUPS[operand][1:]:
            terms = self.terms[operand][group]
            if terms and terms[-1][1] == 1 and self.sizes[group][-1] is not None:
                return group
        return None

    def vector(self, operand: str, axis: str, elem: Elem) -> int:
        """Elements one copy may move along `axis` (16, 8 or 4 bytes): every
        stride of the operand but the unit one, its size per row and the
        innermost letter's size along `axis` are multiples of it, so no vector
        straddles a row or leaves 16-byte alignment."""
        if self.global_inner(operand) != axis:
            return 1
        strides = [s for group in self.GROUPS[operand] for _, s in self.terms[operand][group] if s != 1]
        strides += [x for *_, numbers in self.pieces.get(operand, ()) for x in numbers]  # and each part's
        for vec in (16 // elem.bytes, 8 // elem.bytes, 4 // elem.bytes):
            if all(x % vec == 0 for x in strides + [self.numel[operand], self.sizes[axis][-1]]):
                return max(vec, 1)
        return 1


@dataclass(frozen=True)
class ProductKernel:
    """Everything contract.cu.j2 needs about one product, but names."""

    engine: object  # Simt or Mma
    bk: int
    splits: int
    tiles: dict  # operand -> SharedTile
    contraction: Contraction
    # (groups, per_row, units): a tile's columns are `units` of each of `groups` groups of
    # `per_row` columns (`owning`); None: BN consecutive columns
    columns: tuple | None = None

    @property
    def block(self) -> int:
        return self.engine.threads

    def copies(self, operand: str) -> tuple:
        """(the axis consecutive threads copy `operand` along, the elements each copies at once):
        its contiguous axis, in vectors where it is the tile's rows' too."""
        tile, c = self.tiles[operand], self.contraction
        along = c.global_inner(operand) or tile.inner
        return along, c.vector(operand, along, tile.elem) if along == tile.inner else 1

    @property
    def n_step(self) -> int:
        """What n0, the tile's origin along n, counts: BN columns a tile, or, for
        tiles owning units (`owning`), their units."""
        return self.columns[2] if self.columns else self.engine.bn

    def column(self, x: str) -> str:
        """The column n of the output (and of B) that the tile's column `x` (C) is:
        n0 + x, or for a tile owning units of groups (`owning`), x's unit (from
        unit n0) of its group, N (out of range) past the last unit or group."""
        if not self.columns:
            return f"n0 + {x}"
        groups, per_row, units = self.columns
        group, unit = f"({x}) / {units}", f"n0 + ({x}) % {units}"
        return f"({group} < {groups} && {unit} < {per_row} ? {group} * {per_row} + {unit} : N)"

    def owning(self, groups: int, per_row: int):
        """This product with tiles that each hold the same units (columns j, j +
        per_row, ..., for `units` consecutive j) of each of `groups` groups of
        `per_row` output columns, so that work reading those columns of a row
        needs no other tile: BN / groups units a tile, fewer where B's vector
        copies would straddle two (the columns left over in a tile are idle);
        None where a tile is narrower than the groups."""
        along, vec = self.copies("b")
        units = self.engine.bn // groups // vec * vec if along == "n" else self.engine.bn // groups
        return replace(self, columns=(groups, per_row, units)) if units else None

    def loader(self, operand: str, param: str) -> dict:
        """How the block's threads copy a slice of `operand` into its SharedTile:
        consecutive threads take consecutive addresses of the operand (its
        contiguous axis), each `vec` elements at once; (r_, c_) is the copy's
        place in the tile, across and along."""
        tile = self.tiles[operand]
        along, vec = self.copies(operand)
        across = tile.outer if along == tile.inner else tile.inner
        dims = {tile.outer: tile.rows, tile.inner: tile.cols}
        at = {"m": lambda x: f"m0 + {x}", "n": self.column, "k": lambda x: f"k0 + {x}"}
        return {"elements": tile.elements, "vec": vec,
                "note": f"[{tile.outer}][{tile.inner}], rows {tile.stride} apart",
                "row_copies": dims[along] // vec, "copies": dims[across] * dims[along] // vec,
                "map": f"{along} = {at[along]('c_')}, {across} = {at[across]('r_')}",
                "elem": tile.elem.c_type, "copier": f"rnnc_cp_async<{vec * tile.elem.bytes}>",
                "store": tile.at(**{along: "c_", across: "r_"}),
                **self.source(operand, param)}

    def source(self, operand: str, param: str) -> dict:
        """Where a copy of `operand` reads: its pointers (declarations) and the
        address of element (m, n, k) as C, the operand's first element where
        the element is out of range (`in_` false; the copy then writes zeros).
        A concatenation read where its parts are takes the part the index
        along its joined axis falls in."""
        elem, name = self.tiles[operand].elem.c_type, operand.upper()
        pieces = self.contraction.pieces.get(operand)
        if not pieces:
            return {"pointers": [f"const {elem}* {name}_ = {param};"],
                    "source": f"{name}_ + (in_ ? {self.contraction.offset(operand)} : 0)"}
        pointers = [f"const {elem}* {name}{i}_ = {p};" for i, (p, *_) in enumerate(pieces)]
        source = f"{name}{len(pieces) - 1}_ + ({pieces[-1][3]})"
        for i, (_, index, stop, offset_, _) in reversed(list(enumerate(pieces[:-1]))):
            source = f"{index} < {stop} ? {name}{i}_ + ({offset_}) : {source}"
        return {"pointers": pointers, "source": f"!in_ ? {name}0_ : {source}"}

    @property
    def kept_slices(self) -> int:
        """The BK slices of B one block multiplies: all of its split's k."""
        return -(-self.contraction.size("k", 0) // (self.splits * self.bk))

    @property
    def kept_bytes(self) -> int:
        """Shared memory a block needs to keep its slice of B (`kept`): a flag
        (16 bytes, so the slices stay aligned), then every slice of its k."""
        b = self.tiles["b"]
        return 16 + self.kept_slices * b.elements * b.elem.bytes

    def values(self, a_param: str, b_param: str, b_at: int, kept: bool = False) -> dict:
        """contract.cu.j2's values. `kept`: the body of a persistent kernel's
        product whose B (a param) is the same at every step: each block keeps
        its slice of B, every slice along k, in shared memory of its own
        (`held_`, `kept_bytes`), and copies it only when its tile is not the
        one it did last (the first step, or a grid too small to give each
        tile a block of its own); else B's slices go through two stages
        beside A's."""
        e = self.engine
        b_tile = self.tiles["b"]
        if kept:
            b_tile = replace(b_tile, slot=f"(k0 - k_begin) / {self.bk}")
        kernel = replace(self, tiles={**self.tiles, "b": b_tile})
        return {"summary": e.summary(), "bm": e.bm, "bn": e.bn, "n_step": self.n_step, "bk": self.bk,
                "kstep": e.kstep, "splits": self.splits, "all_splits_bk": self.splits * self.bk, "accs": e.accs, "acc_m": e.acc_m, "acc_n": self.column(e.acc_n),
                "setup": list(e.setup), "step": e.step(self.tiles["a"], b_tile),
                "min_blocks": 2 if e.accs <= 16 else 1, "c_offset": self.contraction.offset("c"),
                "a": kernel.loader("a", a_param),
                "b": {**kernel.loader("b", b_param), "slots": self.kept_slices if kept else 2,
                      "base": "held_ + 16" if kept else f"shared_ + {b_at}"},
                "kept": kept, "fetch_b": "held_tile_ != kept_tile_" if kept else "true",
                "epilogue": "contract_split.cu.j2" if self.splits > 1 else "contract_store.cu.j2"}


def product_kernel(c: Contraction, kind: InputType, rows: int, elems: dict,
                   threads: int | None = None) -> ProductKernel:
    """The kernel of one product of inputs `kind` reading operands of
    `elems` (operand -> Elem), sized for `rows` rows (the region's nominal
    rows): tensor cores where the kind has them and the product has more than
    one row, column and summand, else SIMT. A product that shares its blocks
    with other kernels takes blocks of `threads` threads; its tiles take at
    most TILE_BYTES of shared memory."""
    for operand, elem in elems.items():
        if elem.c_type not in ("float", kind.elem):
            raise ValueError(f"a {kind.name} product cannot read {elem.c_type} operand {operand}")
    m, n, k, g = (c.size(group, rows) for group in "mnkg")

    def inner(engine) -> dict:
        return {operand: engine.inner(operand, c.global_inner(operand)) for operand in "ab"}
    tensor_cores = kind.mma is not None and min(m, n, k) > 1
    options = [e for e in engines(kind, tensor_cores, threads)
               if threads in (None, e.threads) and shared_bytes(shared_tiles(e, inner(e), elems, 16)) <= TILE_BYTES]
    engine = choose_tile(options, m, n, g)
    bk = slice_depth(engine, inner(engine), elems, k, TILE_BYTES)
    tiles, splits = blocks(engine, m, n, g), 1
    if g == 1 and tiles < GPU_SMS // 2:  # too few tiles for the GPU: split k where it is long
        splits = max(1, min(-(-GPU_SMS // tiles), k // (MIN_K_TILES * bk)))
    return ProductKernel(engine, bk, splits, shared_tiles(engine, inner(engine), elems, bk), c)
