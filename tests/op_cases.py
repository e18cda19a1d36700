"""Cells that run every op of the registry in every form the checker accepts,
made from the registry itself, so a new op is covered as soon as it is
declared.

For each op a cell writes (a `Function` or an `Operator`), `forms` tries every
combination of operand shapes (vectors, matrices either way round, a column,
a [1] and a [] value), of literal arguments and keywords (every number the
argument's literal kind reads and allows: each axis, keepdims 0 and 1, each
number of parts) and keeps those the op's own rules accept. Operands come
from states (the step), inputs (the hoisted rows), contexts (once per
sequence) and params (shared values, their gradients summed over steps and
examples), in turn, so each op meets each. Besides these:

- the same operand in every argument (`max(a, a)`: a tie, whose derivative is 0);
- a literal for one argument of a binary op (`max(a, 0.5)`);
- a zero operand where the op is finite at 0 (`relu(a * 0)`, `abs(a * 0)`: the tie at 0);
- large operands where the op stays finite in float32 (`softmax(a * 30)`
  overflows `exp` unless the maximum is taken out first).

Where an elementwise op is not finite on every number (log, sqrt, a divisor)
the argument is made positive (`a * a + 0.5`). `cells()` puts every form of
several ops in one cell (`cells`), each result an output; ops only the compiler makes (the
derivatives' `gt`, `pad`, `reduce_to`, `broadcast_in`) are run by the backward
of the others (`ops_run` says which ops a program runs).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from rnnc.ir import Value
from rnnc.ops import OPS, CExpr, Function, Operator, ShapeError
from rnnc.shapes import Size

SIZES = {"S": 4, "N": 6}  # different sizes, each divisible, so a swapped index or axis shows
SLOTS = {"v": ("N",), "m": ("S", "N"), "t": ("N", "S"), "c": ("S", 1), "u": (1,), "s": ()}
SOURCES = ("state", "input", "context", "param")
PREFIX = {"state": "h", "input": "x", "context": "e", "param": "p"}
NUMBERS = (-3, -2, -1, 0, 1, 2, 3, 4, 6, 0.5, 0.25)  # what a literal argument is tried with
MAX_VALUES = 3  # value arguments a variadic op is tried with, at most
SAMPLES = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
LARGE = 30.0
# the largest normal draw of the tests' arguments, about: a large operand is LARGE times it
DRAW = 4.0


@dataclass(frozen=True)
class Operand:
    expr: str  # as the cell writes it
    names: tuple  # the declared names it reads
    shape: tuple  # per example, in ints
    batched: bool


def declared(slot: str, source: str) -> Operand:
    name = f"{PREFIX[source]}_{slot}"
    shape = tuple(SIZES.get(s, s) for s in SLOTS[slot])
    return Operand(name, (name,), shape, source != "param")


def wrapped(o: Operand, template: str) -> Operand:
    return Operand(template.format(o.expr), o.names, o.shape, o.batched)


LITERAL = Operand("0.5", (), (), False)


def value(o: Operand) -> Value:
    return Value(o.expr, tuple(Size.const(s) for s in o.shape), o.batched)


# --- what the registry accepts ---------------------------------------------------------------
def literal_choices(kind) -> list:
    """The values a literal of `kind` is tried with: every one of NUMBERS it reads and allows."""
    read = [kind.read(float(n)) for n in NUMBERS]
    return list(dict.fromkeys(v for v in read if v is not None and kind.allows(v)))


def accepted(op, operands, given) -> list | None:
    """The attrs of each node the checker would make of `op` on `operands`
    with literals `given`, or None where the op's rules refuse them."""
    values = [value(o) for o in operands]
    syntax = op.syntax
    try:
        if isinstance(syntax, Operator):
            attrs = syntax.attrs(values) if syntax.attrs else {}
        else:
            attrs = syntax.attrs(values, given) if syntax.attrs else given
        for a in attrs if isinstance(attrs, list) else [attrs]:
            op.shape([v.shape for v in values], a)
    except ShapeError:
        return None
    return attrs if isinstance(attrs, list) else [attrs]


def given_choices(syntax) -> list:
    """Every combination of the literal arguments and keywords of a function."""
    if not isinstance(syntax, Function):
        return [{}]
    params = syntax.literals + syntax.keywords
    return [dict(zip((p.name for p in params), combo))
            for combo in itertools.product(*(literal_choices(p.kind) for p in params))]


def arities(op) -> list:
    return list(range(1, MAX_VALUES + 1)) if op.arity is None else [op.arity]


# --- the forms of an op ----------------------------------------------------------------------
@dataclass(frozen=True)
class Form:
    operands: tuple
    given: dict
    results: int  # nodes it makes (parts of a split)
    note: str


def sources_for(i: int, count: int) -> list:
    """The sources of form i's operands: in turn, mixed in even forms and all
    the same in odd ones (so some forms are params only: shared results)."""
    step = 1 if i % 2 == 0 else 0
    return [SOURCES[(i // 2 + j * step) % len(SOURCES)] for j in range(count)]


def forms(op) -> list:
    """Every form of a language op its rules accept, and the extra ones of the module doc."""
    found = []
    for count in arities(op):
        for slots in itertools.product(SLOTS, repeat=count):
            for given in given_choices(op.syntax):
                operands = [declared(s, src) for s, src in zip(slots, sources_for(len(found), count))]
                attrs = accepted(op, operands, given)
                if attrs is not None:
                    found.append(Form(tuple(operands), given, len(attrs), "shapes " + " ".join(slots)))
    return [positive(op, f) for f in found + extras(op, found)]


def extras(op, found: list) -> list:
    more = []
    first = found[0]
    if len(first.operands) > 1:  # the same value in every argument: a tie
        for f in found:
            if len({o.shape for o in f.operands}) == 1:
                same = (f.operands[0],) * len(f.operands)
                if accepted(op, same, f.given) is not None:
                    more.append(Form(same, f.given, f.results, "one operand in every argument"))
                    break
    if isinstance(op.cuda, CExpr) and op.arity == 2:
        a, b = first.operands
        more += [Form((LITERAL, b), {}, 1, "a literal first"), Form((a, LITERAL), {}, 1, "a literal second")]
    if isinstance(op.cuda, CExpr) and op.arity == 1 and finite(op, 0.0):
        more.append(Form((wrapped(first.operands[0], "({} * 0)"),), {}, 1, "zero: the tie at 0"))
    if not isinstance(op.cuda, CExpr) or finite(op, LARGE * DRAW) and finite(op, -LARGE * DRAW):
        for f in found[:4]:
            large = tuple(wrapped(o, f"({{}} * {LARGE:g})") for o in f.operands)
            more.append(Form(large, f.given, f.results, f"large operands, {f.note}"))
    return more


def finite(op, x: float, position: int | None = None) -> bool:
    """Whether an elementwise op's NumPy rule is finite in float32 at x (in
    argument `position`, the others 1; in all of them when None)."""
    args = [np.float32(1.0)] * op.arity
    for j in range(op.arity):
        if position is None or j == position:
            args[j] = np.float32(x)
    with np.errstate(all="ignore"):
        return bool(np.all(np.isfinite(np.asarray(op.numpy(None, *args), np.float32))))


def positive(op, form: Form) -> Form:
    """The form with positive operands where the elementwise op is not finite on every sample."""
    if not isinstance(op.cuda, CExpr):
        return form
    operands = tuple(o if o is LITERAL or all(finite(op, x, j) for x in SAMPLES)
                     else wrapped(o, "({0} * {0} + 0.5)") for j, o in enumerate(form.operands))
    return Form(operands, form.given, form.results, form.note)


# --- the cell of an op ------------------------------------------------------------------------------
def call_text(op, form: Form) -> str:
    exprs = [o.expr for o in form.operands]
    syntax = op.syntax
    if isinstance(syntax, Operator):
        return f"(-{exprs[0]})" if len(exprs) == 1 else f"({exprs[0]} {syntax.symbol} {exprs[1]})"
    args = exprs + [repr(form.given[p.name]) for p in syntax.literals]
    args += [f"{k.name}={form.given[k.name]!r}" for k in syntax.keywords if form.given[k.name] != k.default]
    return f"{syntax.name}({', '.join(args)})"


def shape_text(slot: str) -> str:
    return "[" + ", ".join(str(s) for s in SLOTS[slot]) + "]"


def cell_of(name: str, ops) -> str:
    """One cell with every form of each op of `ops`, each result an output (a
    shared one made per example by adding `0 * x_s`), named after the op."""
    lines, outputs, used = [], [], set()
    for op in ops:
        for i, form in enumerate(forms(op)):
            names = [f"{op.name}_{i}_{k}" for k in range(form.results)]
            lines.append(f"    # {op.name}: {form.note}")
            lines.append(f"    {', '.join(names)} = {call_text(op, form)}")
            shared = not any(o.batched for o in form.operands)
            outputs += [f"    output y_{n} = {n}" + (" + 0 * x_s" if shared else "") for n in names]
            used |= {name for o in form.operands for name in o.names} | ({"x_s"} if shared else set())
    decls = {src: [] for src in SOURCES}
    nexts = []
    for slot in SLOTS:
        for src in SOURCES:
            name = f"{PREFIX[src]}_{slot}"
            if name in used or (src == "input" and f"h_{slot}" in used):
                decls[src].append(f"{name}{shape_text(slot)}")
        if f"h_{slot}" in used:
            nexts.append(f"    next h_{slot} = h_{slot} * 0.5 + x_{slot}")
    header = [f"    dim {', '.join(SIZES)}"]
    header += [f"    {src} {', '.join(d)}" for src, d in decls.items() if d]
    return f"cell {name} {{\n" + "\n".join(header + lines + nexts + outputs) + "\n}\n"


def cells() -> dict:
    """The cells that run every language op, a few ops to a cell: the
    elementwise ops, the index-arithmetic ones, and kernels of their own, the
    products (which run at every precision) apart: cell name -> (text, ops)."""
    groups: dict = {}
    for name in language_ops():
        op = OPS[name]
        groups.setdefault(f"{type(op.cuda).__name__.lower()}{'_products' if op.rounds_inputs else ''}", []).append(op)
    return {key: (cell_of(key, ops), [op.name for op in ops]) for key, ops in groups.items()}


def language_ops() -> list:
    """The ops a cell writes by name or operator (the others only the compiler makes)."""
    return [name for name, op in OPS.items() if isinstance(op.syntax, (Function, Operator))]


def ops_run(program) -> set:
    """Every op a compiled program runs, forward and backward."""
    graphs = [program.cell.graph] + [b.graph for b in program.grads.values()]
    return {n.op for g in graphs for n in g.nodes}
