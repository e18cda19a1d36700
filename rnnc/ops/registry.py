"""What an op is: the facts `defop` declares, and the table that holds them.

Every op states, in one `defop` call beside its definition (the other modules
of this package, one per family), everything the compiler knows about it:

- `syntax`: how a cell writes it: a `Function` (`sum(x, axis=0)`), an
  `Operator` (`a + b`, `-a`), a `Number` literal, or `Internal` for ops that
  only the compiler makes (derivatives, the lengths mask), with the reason;
- `shape`: (argument shapes, attrs) -> the result's per-example shape, or a
  `ShapeError`;
- `numpy`: (node, *arrays) -> array, the reference implementation;
- `vjp`: (builder, node, cotangent) -> one cotangent name (or None) per
  argument; None only for an `Internal` op that no forward graph holds;
- `flops`: (node, argument shapes as ints) -> flops per example;
- `recompute`: whether the planner may rerun it in the backward instead of
  storing its result;
- `cuda`: its lowering: a `CExpr` (elementwise, fused into phase kernels), an
  `Inline` index-arithmetic function (structural ops, fused too), or a
  `Kernel` of its own (a template and the op's parameters of it);
- `rounds_inputs`: products read their inputs rounded to the module's
  precision (rnnc/precision.py);
- `sums_rows`: a shared result of batched arguments is a sum over the rows
  (a parameter's gradient): the lengths mask zeroes its padded rows'
  operands, and the CUDA backend may run it once over several steps' rows;
- `batched`: (argument batched flags, attrs) -> whether the result has the
  batch axis (default: any argument has it);
- `draws`: a random op (rnnc/ops/random.py): the checker gives each call a
  `site` and appends the counter values it draws by to its arguments.

The checker, the planner and both backends read these facts and keep no
table of ops of their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


class ShapeError(Exception):
    """A shape or syntax rule refused its arguments; the checker adds the
    position (of the keyword `argument` names, when it names one)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument

    def describe(self, call: str) -> str:
        """The message, for an error in `call` (`softmax()`)."""
        return str(self)


class AxisError(ShapeError):
    """An `axis` out of range for the shape."""

    def __init__(self, axis: int, shape: str, rank: int):
        self.axis, self.shape, self.rank = axis, shape, rank
        super().__init__(self.describe(None), "axis")

    def describe(self, call: str | None) -> str:
        of = f"{call} of " if call else ""
        return f"axis {self.axis} is out of range for {of}shape {self.shape} (rank {self.rank})"


# --- what a cell may write as a literal argument ------------------------------------
@dataclass(frozen=True)
class LiteralKind:
    """A kind of literal argument (`axis=-1`, the 2 of `split(x, 2)`): `read`
    gives the value a number stands for, or None when it is not `what`;
    `allows` says which of those values the argument takes (`allowed`)."""

    what: str  # for messages: "'axis' must be an integer literal"
    read: Callable[[float], object]
    allows: Callable[[object], bool] = lambda value: True
    allowed: str = ""  # for messages: "'keepdims' must be 0 or 1, not 2"
    folded: bool = False  # an expression of numbers is taken too (`1 - 0.75`), folded by the checker


def _integer(v: float):
    return int(v) if math.isfinite(v) and v == int(v) else None


INTEGER = LiteralKind("an integer literal", _integer)
FLAG = LiteralKind("an integer literal", _integer, lambda v: v in (0, 1), "0 or 1")
COUNT = LiteralKind("an integer literal", _integer, lambda v: v >= 1, "positive")
PROBABILITY = LiteralKind("a number or an expression of numbers", float, lambda v: 0 <= v < 1, "in [0, 1)",
                          folded=True)

REQUIRED = object()  # a Param without a default


@dataclass(frozen=True)
class Param:
    """One argument of a function: a value (`kind` None: any expression) or a
    literal of `kind`; keywords have a default."""

    name: str
    kind: LiteralKind | None = None
    default: object = REQUIRED


# --- syntax: how a cell writes an op --------------------------------------------------
@dataclass(frozen=True)
class Function:
    """`name(value, ..., literal, ..., keyword=literal)`.

    `params` are positional, values first; `variadic`: the one value param
    takes one or more arguments (concat). `attrs(values, given)` turns the
    argument Values and the literals given (defaults filled in) into the
    node's attrs, or a list of them for an op that gives several results (one
    node each; `results` names the literal that says how many)."""

    name: str
    params: tuple = (Param("x"),)
    keywords: tuple = ()
    variadic: bool = False
    attrs: Callable | None = None
    results: str | None = None

    @property
    def values(self) -> tuple:
        return tuple(p for p in self.params if p.kind is None)

    @property
    def literals(self) -> tuple:
        return tuple(p for p in self.params if p.kind is not None)


@dataclass(frozen=True)
class Operator:
    """An infix (`a + b`) or prefix (`-a`) operator: the symbol a cell writes
    and the name of its rule in grammar/cell.lark (the parser's `op`)."""

    symbol: str
    rule: str
    attrs: Callable | None = None  # (argument Values) -> node attrs


@dataclass(frozen=True)
class Number:
    """A number literal in the source."""


@dataclass(frozen=True)
class Internal:
    """An op no cell writes: the compiler makes it (`why` says where) with
    `arity` value arguments."""

    why: str
    arity: int = 1


# --- CUDA lowerings ------------------------------------------------------------------
@dataclass(frozen=True)
class CExpr:
    """An elementwise op as a float C expression over its arguments `{0}`,
    `{1}`, ... and its attrs as float literals (`{value}`)."""

    expr: str


@dataclass(frozen=True)
class Inline:
    """An op fused into phase kernels as index arithmetic: `lower(loop, node,
    shape, row, index)` is a generator that yields the (value, row, index) it
    reads and returns the C expression of the result at (row, index), using
    the loop's `temp`, `temp_int`, `clamp`, `shape_of` and `broadcast`
    (rnnc/backends/cuda/elementwise.py)."""

    lower: Callable


@dataclass(frozen=True)
class Kernel:
    """An op that is a kernel of its own, from `template` (in templates/),
    whose builder in rnnc/backends/cuda/kernels.py takes the op's part as
    `params(node, *arguments)`, each argument with its `shape` in ints and
    whether it is `batched`."""

    template: str
    params: Callable


# --- the registry ----------------------------------------------------------------------
@dataclass(frozen=True)
class OpDef:
    name: str
    syntax: Function | Operator | Number | Internal
    shape: Callable
    numpy: Callable
    vjp: Callable | None
    flops: Callable
    recompute: bool
    cuda: CExpr | Inline | Kernel
    rounds_inputs: bool = False
    sums_rows: bool = False
    batched: Callable | None = None
    draws: bool = False

    @property
    def elementwise(self) -> bool:
        """Computed element by element from its arguments' elements at the same
        (broadcast) index: the NumPy rule gets them aligned (`align`). A random
        op is too: its counter values are shared or one number per row."""
        return isinstance(self.cuda, CExpr) or self.draws

    @property
    def arity(self) -> int | None:
        """Value arguments (None: one or more)."""
        s = self.syntax
        if isinstance(s, Function):
            return None if s.variadic else len(s.values)
        if isinstance(s, Operator):
            return 1 if s.rule == "neg" else 2
        if isinstance(s, Number):
            return 0
        return s.arity


OPS: dict[str, OpDef] = {}
FUNCTIONS: dict[str, OpDef] = {}  # language function name -> op
OPERATORS: dict[str, OpDef] = {}  # the grammar's rule name of an operator -> op


def defop(name, *, syntax, shape, numpy, vjp, flops, recompute, cuda, rounds_inputs=False, sums_rows=False,
          batched=None, draws=False):
    """Register op `name` with every fact about it (see the module doc)."""
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    op = OpDef(name, syntax, shape, numpy, vjp, flops, recompute, cuda, rounds_inputs, sums_rows, batched, draws)
    OPS[name] = op
    if isinstance(syntax, Function):
        FUNCTIONS[syntax.name] = op
    elif isinstance(syntax, Operator):
        OPERATORS[syntax.rule] = op
    return op
