"""Elementwise lowering: the fused loops of a phase kernel.

A phase stores some values; every op they are computed from that is not a
kernel of its own is inlined into their expressions, as the op registry
says: an elementwise op as its C expression (`ops.CExpr`), a slice, pad,
concatenation, transpose or broadcast as index arithmetic (`ops.Inline`,
whose lowering functions use this module's `Loop`), with common
subexpressions shared per element. Values made by earlier kernels are loaded
from their buffers.
"""
from __future__ import annotations

import math
import re

from ...nesting import unnest
from ...ops import OPS, Inline
from ...shapes import concrete_shape
from .cexpr import Ref, c_float, decode, offset, size_expr, strides


class Loop:
    """One grid-stride loop of a phase kernel over the elements of one shape:
    statements (with common subexpressions shared) and the stores."""

    def __init__(self, shape: tuple, batched: bool, resolve, narrow=None, coherent=frozenset()):
        self.shape, self.batched, self.resolve = shape, batched, resolve
        self.narrow = narrow or (lambda name: None)  # node -> the 16-bit type it is stored in
        self.coherent = coherent  # params other blocks of the same launch wrote: read from L2 (__ldcg)
        self.lines: list = []
        self.memo: dict = {}
        self.inlined: dict = {}  # (value, row, index) -> its C expression
        self.refs: dict = {}  # param -> Ref
        self.coherent_reads: list = []  # (param, row, index) of each load of a coherent param
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
        element = self.element(ref, row, index)
        if ref.param in self.coherent:  # from L2: a float, or a 16-bit type's bits
            self.coherent_reads.append((ref.param, row, index))
            element = f"__ldcg(&{element})" if ref.elem == "float" else f"{ref.elem}_value(__ldcg(&{element}.bits))"
        return self.temp("float", element)

    def node(self, n, row, index) -> str:
        """The C expression of node `n`'s result at (row, index), inlining its
        fusible producers. An inlined chain is as deep as the expression it
        came from, so the producers are walked on an explicit stack (`unnest`):
        `_node` and `_value` yield the (value, row, index) each needs."""
        return unnest(self._made(n, row, index), lambda want: self._value(*want))

    def _made(self, n, row, index):
        """Node `n`'s value as everyone reads it: rounded to the 16-bit type it is stored in, if any."""
        expr = yield from self._node(n, row, index)
        elem = self.narrow(n.out)
        return self.temp("float", f"{elem}({expr})") if elem else expr

    def _value(self, name: str, row, index):
        key = (name, row, index)  # a value read twice is walked once
        if key not in self.inlined:
            where = self.resolve(name)
            if isinstance(where, Ref):
                self.inlined[key] = self.load(where, row if where.batched else None, index)
            else:
                self.inlined[key] = yield from self._made(where, row, index)
        return self.inlined[key]

    def _node(self, n, row, index):
        shape = concrete_shape(n.shape)
        lowering = OPS[n.op].cuda
        if isinstance(lowering, Inline):
            return (yield from lowering.lower(self, n, shape, row, index))
        args = []
        for a in n.args:
            args.append((yield a, row, self.broadcast(a, shape, index)))
        expr = lowering.expr.format(*args, **{k: c_float(v) for k, v in n.attrs})
        return self.temp("float", expr) if args else expr  # a literal is spelt where it is read

    def shape_of(self, name: str) -> tuple:
        where = self.resolve(name)
        return where.shape if isinstance(where, Ref) else concrete_shape(where.shape)

    def broadcast(self, name: str, shape: tuple, index: tuple) -> tuple:
        """Value `name`'s index where a result of `shape` is at `index` (NumPy broadcasting)."""
        return broadcast_index(self.shape_of(name), shape, index)

    def store(self, ref: Ref, expr_name: str, op: str = "="):
        """`ref` at this loop's own element gets (`=`) or adds (`+=`) `expr_name`."""
        self.lines.append(f"{self.element(ref, self.row, self.index)} {op} {expr_name};")

    def at(self, ref: Ref) -> str:
        """`ref` loaded at this loop's own element (broadcast the NumPy way)."""
        return self.load(ref, self.row if ref.batched else None,
                         broadcast_index(ref.shape, self.shape, self.index))

    def offsets_read(self, param: str) -> list | None:
        """Where this loop (over one axis, per row) reads coherent `param`: for
        each load, c where it reads [row, j + c] at its own element [row, j];
        None if a load reads anywhere else (another row, an index not j plus
        a constant)."""
        offsets = []
        for read, row, index in self.coherent_reads:
            if read != param:
                continue
            offset = self.offset_from_own(index[0]) if len(index) == len(self.index) == 1 else None
            if row != self.row or offset is None:
                return None
            offsets.append(offset)
        return offsets

    def offset_from_own(self, name: str) -> int | None:
        """c where int `name` is this loop's own index plus the constant c (a slice's start, say), else None."""
        ints = {temp: expr for (ctype, expr), temp in self.memo.items() if ctype == "int"}
        offset = 0
        while name != self.index[0]:
            plus = OWN_PLUS.fullmatch(ints.get(name, ""))
            if not plus:
                return None
            name, offset = plus.group(1), offset + int(plus.group(2))
        return offset

    def clamp(self, expr: str, n: int) -> str:
        return self.temp_int(f"min(max({expr}, 0), {n - 1})")

    def live_lines(self) -> list:
        """The statements without the temporaries nothing reads (a row mask a
        store did not need, say), which nvcc would warn of."""
        read, kept = set(), []
        for line in reversed(self.lines):
            temp = TEMP.match(line)
            if temp and temp.group(1) not in read:
                continue
            read.update(TEMP_NAME.findall(line))
            kept.append(line)
        return kept[::-1]


TEMP = re.compile(r"const \w+ ([jf]\d+) = ")  # a line `temp` makes
TEMP_NAME = re.compile(r"\b[jf]\d+\b")
OWN_PLUS = re.compile(r"(j\d+) \+ (\d+)")  # an int temporary plus a constant


def loop_for(loops: dict, shape: tuple, batched: bool, resolve=None, narrow=None, coherent=frozenset()) -> Loop:
    """The loop of `loops` over the elements of (shape, batched), made on first
    use: a kernel runs one grid-stride loop per shape it writes. Without
    `resolve` the loop only loads and stores buffers (`Loop.at`, `Loop.store`)."""
    key = (shape, batched)
    if key not in loops:
        loops[key] = Loop(shape, batched, resolve, narrow, coherent)
    return loops[key]


def broadcast_index(arg_shape: tuple, out_shape: tuple, index: tuple) -> tuple:
    """An argument's index under right-aligned NumPy broadcasting (size-1 axes read index 0)."""
    lead = len(out_shape) - len(arg_shape)
    return tuple("0" if a == 1 and out_shape[lead + k] != 1 else index[lead + k]
                 for k, a in enumerate(arg_shape))
