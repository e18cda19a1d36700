"""Check an AST and lower it to the step IR.

One pass over the cell's statements, in order: declarations enter a scope,
expressions are lowered to IR nodes through the op registry (rnnc/ops/: which
function or operator is which op, its arguments, keywords and their literal
kinds, and its shape rule), and every mistake becomes a `CellError` at the
place it was made. Dims given by the caller are substituted as the shapes are built, so
`split` divisibility and size clashes are decided on the real sizes.
Elementwise work on literals only (`1 - 0.5`, `-3.0`) is folded into one
literal of its value, refused where float32 cannot hold it (`1e30 * 1e30`).
A random op (dropout, zoneout) gets its site and the counter values it draws
by (rnnc/ops/random.py), declared by the checker as they are first needed.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..errors import CellError, CellWarning, Pos, Source
from ..ir import Cell, Decl, live_nodes
from ..nesting import unnest
from ..shapes import Size, shape_str
from . import parse as ast

FLOAT32_MAX = float(np.finfo(np.float32).max)


def fits_float32(value: float) -> bool:
    """Finite, and finite once rounded to float32."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))


class BindError(CellError, ValueError):
    """A `-D NAME=VALUE` / `dims=` entry that is not a positive integer or names no dim."""


@dataclass(frozen=True)
class Checked:
    cell: Cell
    warnings: tuple  # of CellWarning


def select_cell(module: ast.Module, name: str | None, source: Source) -> ast.Cell:
    if name is None:
        return module.cells[0]
    for cell in module.cells:
        if cell.name == name:
            return cell
    names = ", ".join(c.name for c in module.cells)
    raise BindError(f"no cell named {name!r} in this file (cells: {names})",
                    module.cells[0].pos, source)


def check(module: ast.Module, source: Source, cell: str | None = None,
          dims: dict | None = None) -> Checked:
    """Check one cell of a parsed file (the first unless `cell` names one)."""
    try:
        return _Checker(source, select_cell(module, cell, source), _plain_ints(dims, source)).run()
    except CellError as err:
        raise err.located(source) from None


def _plain_ints(dims, source: Source) -> dict:
    """`dims` with NumPy integers as Python ints (every value is checked later)."""
    if dims is not None and not isinstance(dims, Mapping):
        raise BindError(f"dims: expected a dict of dim name -> positive integer, got {type(dims).__name__}",
                        None, source)
    return {k: int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
            for k, v in (dims or {}).items()}


class _Checker:
    def __init__(self, source: Source, cell: ast.Cell, binding: dict):
        self.source = source
        self.cell = cell
        self.binding = binding
        self.dims: dict[str, Pos] = {}
        self.scope: dict[str, tuple] = {}  # user name -> (kind, pos, IR value name)
        self.decls: list[Decl] = []
        self.builder = ops.Builder({})
        self.constants: dict[str, float] = {}  # literal value name -> its value
        self.nexts: dict[str, tuple] = {}  # state -> (value, pos)
        self.outputs: list[tuple] = []
        self.defined_later = self._all_bound_names()
        self.in_time: set = set()  # values that change from step to step (they read an input, a state or the step)
        self.sites = 0  # random calls so far
        # the step index's name: the cell's `step` declaration's, else one no cell can write
        self.step_name = next((s.items[0].id for s in cell.body if isinstance(s, ast.Decl) and s.kind == "step"),
                              ops.random.STEP)

    # --- driver -----------------------------------------------------------
    def run(self) -> Checked:
        self._check_binding()
        for stmt in self.cell.body:
            getattr(self, "_" + type(stmt).__name__.lower())(stmt)
        return self._finish()

    def _finish(self) -> Checked:
        c = self.cell
        if not any(d.kind == "input" for d in self.decls):
            raise CellError(f"cell '{c.name}' has no input (declare one with 'input x[...]'; "
                            "it fixes the sequence length)", c.pos)
        for d in self.decls:
            if d.kind == "state" and d.name not in self.nexts:
                raise CellError(f"state '{d.name}' has no 'next {d.name} = ...'", d.pos)
        nexts = tuple((d.name, self.nexts[d.name][0]) for d in self.decls if d.kind == "state")
        roots = [v for _, v in nexts] + [v for _, v in self.outputs]
        nodes = live_nodes(self.builder.nodes, roots)
        # A value read only by unused values is not reported: they are.
        used = set(roots) | {a for n in self.builder.nodes for a in n.args}
        warnings = self._unused_warnings(used)
        dims = tuple((name, self.binding.get(name)) for name in self.dims)
        return Checked(Cell(c.name, dims, tuple(self.decls), tuple(nodes), nexts,
                            tuple(self.outputs)), warnings)

    def _unused_warnings(self, used: set) -> tuple:
        found = []
        for name, (kind, pos, value) in self.scope.items():
            if kind in ("value", "input", "context", "param", "step") and value not in used:
                what = "value" if kind == "value" else kind
                found.append(CellWarning(f"{what} '{name}' is never used", pos, self.source))
        return tuple(sorted(found, key=lambda w: (w.pos.line, w.pos.col)))

    # --- names --------------------------------------------------------------
    def _all_bound_names(self) -> dict:
        names = {}
        for stmt in self.cell.body:
            if isinstance(stmt, ast.Decl):
                for item in stmt.items:
                    names.setdefault(item.id if isinstance(item, ast.Name) else item.name, item.pos)
            elif isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    names.setdefault(t.id, t.pos)
        return names

    def _bind(self, name: str, pos: Pos, kind: str, value: str | None = None):
        if name in ast.KEYWORDS:
            raise CellError(f"'{name}' is a reserved keyword and cannot be used as a name", pos)
        if name in ops.FUNCTIONS:
            raise CellError(f"'{name}' is a built-in function and cannot be used as a name", pos)
        if name in self.scope or name in self.dims:
            prev = self.scope[name][1] if name in self.scope else self.dims[name]
            raise CellError(f"'{name}' is already defined at line {prev.line}:{prev.col}", pos)
        if kind == "dim":
            self.dims[name] = pos
        else:
            self.scope[name] = (kind, pos, value or name)

    def _lookup(self, ref: ast.Name) -> str:
        if ref.id in self.scope:
            return self.scope[ref.id][2]
        if ref.id in self.dims:
            raise CellError(f"'{ref.id}' is a dim; dims can only be used in shapes", ref.pos)
        if ref.id in ast.KEYWORDS:
            raise CellError(f"'{ref.id}' is a reserved keyword and cannot be used as a name",
                            ref.pos)
        if ref.id in ops.FUNCTIONS:
            raise CellError(f"'{ref.id}' is a built-in function; call it, as in "
                            f"'{ref.id}(x)'", ref.pos)
        if ref.id in self.defined_later:
            p = self.defined_later[ref.id]
            raise CellError(f"'{ref.id}' is used before it is defined (at line {p.line}:{p.col})",
                            ref.pos)
        raise CellError(f"unknown name '{ref.id}'", ref.pos)

    # --- dims and shapes ------------------------------------------------------
    def _check_binding(self):
        """Every bound dim is declared and a positive integer. The error points
        at the dim's declaration (or the first dim list, or the cell's name)."""
        dim_decls = [s for s in self.cell.body if isinstance(s, ast.Decl) and s.kind == "dim"]
        declared = {item.id: item.pos for s in dim_decls for item in s.items}
        for name, value in self.binding.items():
            if name not in declared:
                where = dim_decls[0].pos if dim_decls else self.cell.pos
                raise BindError(f"-D {name}={value}: cell '{self.cell.name}' has no dim {name!r} "
                                f"(dims: {', '.join(declared) or 'none'})", where)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BindError(f"-D {name}={value}: a dim must be a positive integer",
                                declared[name])

    def _with_binding(self) -> str:
        """' (with H=5, ...)' when dims are bound: sizes in messages are numbers then."""
        if not self.binding:
            return ""
        return " (with " + ", ".join(f"{k}={v}" for k, v in self.binding.items()) + ")"

    def _size(self, e) -> Size:
        return unnest(self._size_of(e), self._size_of)

    def _size_of(self, e):
        """The Size of a shape expression (a generator for `unnest`: it yields
        the operands of `+ - * /` and receives their Sizes)."""
        if isinstance(e, ast.Number):
            if not math.isfinite(e.value) or e.value != int(e.value) or e.value < 1:
                raise CellError(f"a size must be a positive integer, not {e.value:g}", e.pos)
            return Size.const(int(e.value))
        if isinstance(e, ast.Name):
            if e.id in self.scope:
                kind = self.scope[e.id][0]
                raise CellError(f"'{e.id}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a "
                                "dim; a shape is built from dims and integers", e.pos)
            if e.id not in self.dims:
                raise CellError(f"undeclared dim '{e.id}' (declare it with 'dim {e.id}')", e.pos)
            return Size.const(self.binding[e.id]) if e.id in self.binding else Size.dim(e.id)
        if isinstance(e, ast.Binary) and e.op in ("add", "sub", "mul", "div"):
            a = yield e.left
            b = yield e.right
            if e.op == "div":
                q = a.divide(b)
                if q is None or (not q.symbols and q.value is None):
                    raise CellError(f"shape expression {a} / {b} is not an exact division"
                                    f"{self._with_binding()}", e.pos)
                return q
            return {"add": a + b, "sub": a - b, "mul": a * b}[e.op]
        raise CellError("a shape is built from dims, integers, + - * / and parentheses", e.pos)

    def _shape(self, var: ast.Var) -> tuple:
        shape = tuple(self._size(e) for e in var.shape)
        for s, e in zip(shape, var.shape):
            if not s.symbols and (s.value is None or s.value < 1):
                raise CellError(f"size {s} of '{var.name}' is not a positive integer"
                                f"{self._with_binding()}", _start(e))
        return shape

    # --- statements -------------------------------------------------------------
    def _decl(self, d: ast.Decl):
        for item in d.items:
            if d.kind == "dim":
                self._bind(item.id, item.pos, "dim")
                continue
            if d.kind == "step":
                if item.id != self.step_name:
                    raise CellError(f"the step index is already declared as '{self.step_name}'; a cell has one",
                                    item.pos)
                self._bind(item.id, item.pos, "step")
                self._counter("step", item.pos)
                continue
            init = None if item.init is None else _param_init(item.init)
            self._bind(item.name, item.pos, d.kind)
            self._declare(Decl(d.kind, item.name, self._shape(item), init, item.pos))

    def _declare(self, decl: Decl) -> str:
        self.decls.append(decl)
        self.builder.values[decl.name] = decl.value
        if decl.kind in ("input", "state", "step"):
            self.in_time.add(decl.name)
        return decl.name

    def _counter(self, kind: str, pos: Pos | None = None) -> str:
        """The name of a counter value of a random draw (`kind`: key, example or
        step), declared when first needed (the step where the cell declares it)."""
        name = {"key": ops.random.KEY, "example": ops.random.EXAMPLE, "step": self.step_name}[kind]
        if name in self.builder.values:
            return name
        shape = (Size.const(3),) if kind == "key" else ()
        return self._declare(Decl(kind, name, shape, None, pos))

    def _assign(self, s: ast.Assign):
        op = ops.FUNCTIONS.get(s.value.func) if isinstance(s.value, ast.Call) else None
        if op is not None and op.syntax.results:
            values = self._several(s.value, [t.id for t in s.targets])
        elif len(s.targets) > 1:
            several = ", ".join(f"{f}(...)" for f, op in ops.FUNCTIONS.items() if op.syntax.results)
            raise CellError(f"{len(s.targets)} names on the left but the right side gives one "
                            f"value (only {several} gives several)", s.targets[1].pos)
        else:
            values = [self._expr(s.value, s.targets[0].id)]
        for target, value in zip(s.targets, values):
            self._bind(target.id, target.pos, "value", value)

    def _next(self, s: ast.Next):
        name = s.target.id
        kind = self.scope.get(name, ("",))[0]
        if kind != "state":
            what = f"a {kind}" if kind else "not declared"
            raise CellError(f"'next {name}': '{name}' is not a state ({what})", s.target.pos)
        if name in self.nexts:
            p = self.nexts[name][1]
            raise CellError(f"state '{name}' already has a next (at line {p.line}:{p.col})", s.pos)
        value = self._expr(s.value, None)
        have, want = self.builder.values[value].shape, self.builder.values[name].shape
        if have != want:
            raise CellError(f"'next {name}' has shape {shape_str(have)} but state '{name}' is "
                            f"{shape_str(want)}", _start(s.value))
        self.nexts[name] = (value, s.pos)

    def _output(self, s: ast.Output):
        name = s.target.id
        for other, _ in self.outputs:
            if other == name:
                raise CellError(f"output '{name}' is given twice", s.target.pos)
        # `output h` and `output y = h` of a state would both lag one step
        ref = s.target if s.value is None else s.value
        if isinstance(ref, ast.Name) and self.scope.get(ref.id, ("",))[0] == "state":
            raise CellError(f"'output {name}' would lag one step: inside the step '{ref.id}' is the "
                            f"state before it; output the value given to 'next {ref.id}'", ref.pos)
        if s.value is None:
            value = self._lookup(s.target)
        else:
            self._bind(name, s.target.pos, "output")
            value = self._expr(s.value, name)
        self.outputs.append((name, value))

    # --- expressions ------------------------------------------------------------------
    def _emit(self, op, *args, where, name=None, **attrs) -> str:
        """Add a node for the AST node `where`. An elementwise op on literals
        only is folded: the node is made (its arguments count as used) but the
        value is a literal of its result."""
        foldable = ops.OPS[op].elementwise and args and all(a in self.constants for a in args)
        out = self._rule(self.builder.emit, where, op, *args, name=None if foldable else name, pos=where.pos,
                         **attrs)
        if any(a in self.in_time for a in args):
            self.in_time.add(out)
        if not foldable:
            return out
        with np.errstate(all="ignore"):  # 1/0 and log(-1) are reported below
            value = ops.OPS[op].numpy(self.builder.nodes[-1], *(np.float64(self.constants[a]) for a in args))
        return self._constant(float(value), name, where.pos, folded=True)

    def _constant(self, value: float, name: str | None, pos: Pos, folded: bool = False) -> str:
        """A literal, refused where float32 (the CUDA backend's type) cannot hold it."""
        if math.isnan(value):  # only folding makes one: 0/0, log(-1)
            raise CellError("this constant expression is not a number (NaN)", pos)
        if not fits_float32(value):
            what = f"this constant expression is {value:g}," if folded else "this number is"
            raise CellError(f"{what} too large for float32 (magnitudes up to {FLOAT32_MAX:.8g})", pos)
        out = self.builder.emit("const", name=name, pos=pos, value=value)
        self.constants[out] = value
        return out

    def _expr(self, e, name: str | None) -> str:
        """Lower an expression; the outermost node takes the user's name, if any."""
        return unnest(self._lower(e, name), lambda child: self._lower(child, None))

    def _lower(self, e, name: str | None):
        """The IR value of expression `e` (a generator for `unnest`: it yields
        sub-expressions and receives their values)."""
        if isinstance(e, ast.Name):
            return self._lookup(e)
        if isinstance(e, ast.Number):
            return self._constant(e.value, name, e.pos)
        if isinstance(e, ast.Unary):
            operand = yield e.operand
            return self._operator(e, [operand], name)
        if isinstance(e, ast.Binary):
            left = yield e.left
            right = yield e.right
            return self._operator(e, [left, right], name)
        if isinstance(e, ast.Call):
            return (yield from self._call(e, name))
        raise CellError(f"unexpected {type(e).__name__}", e.pos)  # keyword outside a call

    def _operator(self, e, args: list, name: str | None) -> str:
        op = ops.OPERATORS[e.op]
        attrs = self._rule(op.syntax.attrs, e, [self.builder.values[a] for a in args]) if op.syntax.attrs else {}
        return self._emit(op.name, *args, where=e, name=name, **attrs)

    def _rule(self, rule, where, *args, **kwargs):
        """`rule(*args, **kwargs)` of the registry, its ShapeError a CellError
        at the AST node `where` (at the keyword it names, for a call)."""
        try:
            return rule(*args, **kwargs)
        except ops.ShapeError as err:
            raise self._shape_error(err, where) from None

    def _shape_error(self, err: ops.ShapeError, where) -> CellError:
        if isinstance(where, ast.Call):
            return CellError(err.describe(f"{where.func}()") + self._with_binding(),
                             _keyword_pos(where, err.argument))
        return CellError(f"{err}{self._with_binding()}", where.pos)

    # --- calls ------------------------------------------------------------------------------
    def _function(self, c: ast.Call) -> ops.OpDef:
        if c.func not in ops.FUNCTIONS:
            raise CellError(f"unknown function '{c.func}' (functions: {', '.join(ops.FUNCTIONS)})", c.pos)
        return ops.FUNCTIONS[c.func]

    def _arguments(self, c: ast.Call, fn: ops.Function):
        """The value arguments of a call (expressions, not yet lowered) and the
        literals it gives by name, checked, with the keywords' defaults."""
        positional, keywords = [], {}
        allowed = {p.name: p for p in fn.keywords}
        for a in c.args:
            if not isinstance(a, ast.Keyword):
                if keywords:
                    raise CellError("a positional argument cannot follow a keyword argument", a.pos)
                positional.append(a)
                continue
            if a.name not in allowed:
                valid = ", ".join(allowed) or "none"
                raise CellError(f"{c.func}() has no argument '{a.name}' (keywords: {valid})", a.pos)
            if a.name in keywords:
                raise CellError(f"{c.func}() got argument '{a.name}' twice", a.pos)
            keywords[a.name] = self._literal(a.value, allowed[a.name], a.pos)
        n, want = len(positional), len(fn.params)
        if fn.variadic and n < want:
            raise CellError(f"{c.func}() takes {want} or more arguments, got {n}", c.pos)
        if not fn.variadic and n != want:
            names = ", ".join(p.name for p in fn.params)
            raise CellError(f"{c.func}() takes {want} argument{'s' if want != 1 else ''} ({names}), got {n}",
                            c.pos)
        split = n - len(fn.literals)
        given = {p.name: self._literal(e, p, _start(e)) for p, e in zip(fn.literals, positional[split:])}
        given.update((p.name, keywords.get(p.name, p.default)) for p in fn.keywords)
        return positional[:split], given

    def _attrs(self, c: ast.Call, fn: ops.Function, values: list, given: dict):
        """The node attrs (a list of them for several results) of a call."""
        if fn.attrs is None:
            return given
        return self._rule(fn.attrs, c, [self.builder.values[v] for v in values], given)

    def _call(self, c: ast.Call, name: str | None):
        """The value of a call (a generator, as `_lower`)."""
        op = self._function(c)
        if op.syntax.results:
            raise CellError(f"{c.func}(...) gives several values: assign it to as many names, "
                            f"as in 'a, b = {c.func}(x, 2)'", c.pos)
        args, given = self._arguments(c, op.syntax)
        values = []
        for a in args:
            values.append((yield a))
        attrs = self._attrs(c, op.syntax, values, given)
        if op.draws:
            values, attrs = self._draw(values, attrs, given)
        return self._emit(op.name, *values, where=c, name=name, **attrs)

    def _draw(self, values: list, attrs: dict, given: dict) -> tuple:
        """A random call's arguments and attrs: its counter values after its own
        arguments, its site and what it is drawn once per (rnnc/ops/random.py)."""
        batched = any(self.builder.values[v].batched for v in values)
        per = ops.per_of(batched, any(v in self.in_time for v in values), given)
        counter = ops.counter_args(per, self.step_name)
        for kind, _ in zip(ops.COUNTER_KINDS, counter):
            self._counter(kind)
        self.sites += 1
        return values + list(counter), {**attrs, "per": per, "site": self.sites - 1}

    def _literal(self, e, param: ops.Param, pos: Pos):
        """The value of literal argument `e` for `param`: a number of its kind's
        form, or for a kind that folds, an expression of numbers (else an error
        at the argument), and one it allows (else at `pos`, the keyword's place
        for a keyword)."""
        number = _number(e)
        if number is None and param.kind.folded:
            value = self._expr(e, None)  # dims and values are refused or left unfolded
            number = self.constants.get(value)
        value = None if number is None else param.kind.read(number)
        if value is None:
            raise CellError(f"'{param.name}' must be {param.kind.what}", _start(e))
        if not param.kind.allows(value):
            raise CellError(f"'{param.name}' must be {param.kind.allowed}, not {value:g}", pos)
        return value

    def _several(self, c: ast.Call, names: list) -> list:
        """The values of a call that gives several (`a, b = split(x, 2)`), one node each."""
        op = self._function(c)
        args, given = self._arguments(c, op.syntax)
        count = given[op.syntax.results]
        if len(names) != count:
            raise CellError(f"{c.func} into {count} {op.syntax.results} but {len(names)} names on the left", c.pos)
        values = [self._expr(a, None) for a in args]
        return [self._emit(op.name, *values, where=c, name=nm, **attrs)
                for nm, attrs in zip(names, self._attrs(c, op.syntax, values, given))]


def _number(e) -> float | None:
    """The value of a number literal, optionally negated (`-1`); None for anything else."""
    if isinstance(e, ast.Number):
        return e.value
    if isinstance(e, ast.Unary) and isinstance(e.operand, ast.Number):
        return -e.operand.value
    return None


def _param_init(e) -> float:
    value = _number(e)
    if value is None:
        raise CellError("a param's initial value must be a number", e.pos)
    if not fits_float32(value):
        raise CellError("a param's initial value must be a finite number that float32 holds "
                        f"(magnitudes up to {FLOAT32_MAX:.8g})", e.pos)
    return value




def _keyword_pos(c: ast.Call, name: str) -> Pos:
    """Where the `name=` argument of a call is, or the call's own place without one."""
    return next((a.pos for a in c.args if isinstance(a, ast.Keyword) and a.name == name), c.pos)


def _start(e) -> Pos:
    """Where an expression begins (a binary node's own position is its operator)."""
    while isinstance(e, ast.Binary):
        e = e.left
    return e.pos
