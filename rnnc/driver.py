"""The pipeline, one named stage after another.

    source --parse--> AST --check--> step IR --hoist--> regions
           --autodiff--> backward regions --plan--> Plan --backend--> module

`compile` runs the stages in order; `emit` prints any one of them
(`rnnc emit --stage NAME`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CellError, Source
from .frontend import check as checker
from .frontend import parse as parser
from .ir import Cell, format_cell
from .passes.autodiff import vjp
from .passes.hoist import Hoisted, hoist
from .passes.plan import Plan, make_plan
from .precision import DEFAULT as DEFAULT_PRECISION
from .precision import precision as find_precision

STAGES = ("ast", "ir", "hoist", "grad", "plan", "cuda")
MAX_SOURCE = 1 << 20  # bytes: more is not a .cell file (and /dev/zero never ends)


def read_source(path_or_text: str | os.PathLike | Source) -> Source:
    """A `.cell` file by path, or the program itself: a Source, or a string with
    a '{' and a line break (a cell takes several lines, so a one-line string is
    always a path). UTF-8, with or without a byte order mark."""
    if isinstance(path_or_text, Source):
        return path_or_text
    if isinstance(path_or_text, str) and "{" in path_or_text and "\n" in path_or_text:
        return Source("<cell>", path_or_text.removeprefix("\ufeff"))
    path = Path(path_or_text)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE + 1)
        if len(data) > MAX_SOURCE:
            raise CellError(f"cannot read {path}: more than {MAX_SOURCE >> 20} MiB, too large for a .cell file")
        text = data.decode("utf-8-sig")
    except OSError as err:
        raise CellError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise CellError(f"cannot read {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    return Source(str(path), text.replace("\r\n", "\n").replace("\r", "\n"))


def check_source(source: Source, cell: str | None = None, dims: dict | None = None) -> checker.Checked:
    """Parse and check: the step IR of one cell (the first unless `cell` names one)."""
    return checker.check(parser.parse(source), source, cell, dims)


def differentiate(hoisted: Hoisted) -> dict:
    """The backward region of each forward region, w.r.t. everything it reads."""
    return {name: vjp(graph, tuple(v.name for v in graph.inputs), prefix=f"%{name}:")
            for name, graph in (("seq", hoisted.seq), ("pre", hoisted.pre), ("step", hoisted.step))}


@dataclass(frozen=True)
class Program:
    """A checked, differentiated and planned cell, ready to load on a backend."""

    source: Source
    cell: Cell
    warnings: tuple
    hoisted: Hoisted
    grads: dict  # region name -> Backward
    plan: Plan
    precision: str = DEFAULT_PRECISION  # of products (rnnc/precision.py): what `load` runs unless told otherwise

    def load(self, backend: str = "numpy", dtype: str | None = None, precision: str | None = None):
        precision = find_precision(precision or self.precision).name
        if backend == "numpy":
            from .backends.numpy import NumpyModule
            return NumpyModule(self, dtype or "float64", precision)
        if backend == "cuda":
            from .backends.cuda.runtime import load as load_cuda
            return load_cuda(self, dtype or "float32", precision=precision)
        raise ValueError(f"backend: unknown backend {backend!r} (backends: numpy, cuda)")


def require_dims(cell: Cell, source: Source):
    """Refuse a cell with an unbound dim: plans and kernels need every size."""
    unbound = [name for name, value in cell.dims if value is None]
    if unbound:
        raise checker.BindError(f"dims {', '.join(unbound)} of cell '{cell.name}' need values "
                                f"(dims={{'{unbound[0]}': ...}} or -D {unbound[0]}=...)", None, source)


def compile(path_or_text, dims: dict | None = None, cell: str | None = None,
            recompute="auto", memory_budget: int | None = None, seq_len: int | None = None,
            batch: int | None = None, dtype: str = "float32", precision: str | None = None) -> Program:
    """Run the whole pipeline on a `.cell` file (or its text).

    `recompute`: "none", "all", "auto" or a list of value names to recompute.
    `precision`: of products, "fp32" (exact, the default) or "tf32" (rnnc/precision.py).
    `memory_budget`: bytes of `dtype` that forward plus backward may hold for
    `seq_len` steps of batch `batch`; the plan then checkpoints states across
    time (see rnnc/passes/plan.py)."""
    precision = find_precision(precision).name
    source = read_source(path_or_text)
    checked = check_source(source, cell, dims)
    require_dims(checked.cell, source)
    hoisted = hoist(checked.cell)
    grads = differentiate(hoisted)
    plan = make_plan(hoisted, grads, recompute, memory_budget, seq_len, batch, dtype)
    return Program(source, checked.cell, checked.warnings, hoisted, grads, plan, precision)


def emit(source: Source, stage: str, cell: str | None = None, dims: dict | None = None,
         recompute="auto", precision: str | None = None) -> str:
    """The text of one pipeline stage, as `rnnc emit --stage` prints it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if stage == "ast":
        return parser.format_ast(parser.parse(source))
    checked = check_source(source, cell, dims)
    if stage == "ir":
        return format_cell(checked.cell)
    hoisted = hoist(checked.cell)
    if stage == "hoist":
        return hoisted.format()
    grads = differentiate(hoisted)
    if stage == "grad":
        return "\n\n".join(b.format(f"backward of {name}") for name, b in grads.items())
    require_dims(checked.cell, source)  # costs and kernel sizes need real sizes
    plan = make_plan(hoisted, grads, recompute)
    if stage == "cuda":
        from .backends.cuda.lowering import generate
        precision = find_precision(precision).name
        return generate(Program(source, checked.cell, checked.warnings, hoisted, grads, plan, precision)).source
    return plan.format()
