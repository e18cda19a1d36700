"""The pipeline, one named stage after another, in one table.

    source --parse--> AST --check--> step IR --hoist--> regions --autodiff--> backward regions
           --mask--> masked regions --plan--> Plan --> Program --> CUDA C --nvcc--> cubin
                                              Plan --> schedule (for T steps of batch B)

Each `Stage` names the stage whose result it reads, how it makes its own and
how `rnnc emit --stage NAME` prints it, as Triton lists its compiler's stages.
Everything goes through the table: `compile` runs it up to the Program,
`emit` up to any stage, `Program.build` on from a Program (the CUDA source,
the cubin), and so do writing an artifact (rnnc/artifact.py) and loading the
CUDA runtime. Every stage sees the same `Options`, so `emit` shows exactly
what `compile` builds with the same options, and a Program records the
options it was built with.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import CellError, Source
from .frontend import check as checker
from .frontend import parse as parser
from .ir import Cell, format_cell
from .ops import COUNTER_KINDS
from .passes.autodiff import vjp
from .passes.hoist import Hoisted, hoist
from .passes.mask import format_masked, mask
from .passes.plan import Plan, make_plan
from .dtypes import is_narrow, storage
from .precision import for_dtype
from .precision import precision as find_precision

MAX_SOURCE = 1 << 20  # bytes: more is not a .cell file (and /dev/zero never ends)


@dataclass(frozen=True)
class Options:
    """What the stages are told. `compile` takes these as keywords."""

    cell: str | None = None  # which cell of the file (default: the first)
    dims: dict = field(default_factory=dict)  # dim name -> size
    recompute: str | list | tuple = "auto"  # none, all, auto or value names to recompute
    memory_budget: int | str | None = None  # bytes that forward plus backward may hold ...
    seq_len: int | None = None  # ... for seq_len steps of batch `batch` (the schedule's T and B)
    batch: int | None = None
    dtype: str = "float32"  # the budget's and the schedule's bytes, the CUDA kernels' arrays (rnnc/dtypes.py)
    arch: str | None = None  # the cubin's GPU architecture (default: the local GPU's, else sm_80)
    precision: str | None = None  # of products, fp32 (exact, the default) or tf32 (rnnc/precision.py)

    def __post_init__(self):
        if self.dims is None:  # none given (the checker says what is wrong with anything else)
            object.__setattr__(self, "dims", {})
        object.__setattr__(self, "dtype", storage(self.dtype).name)
        object.__setattr__(self, "precision", find_precision(self.precision).name)
        for_dtype(self.dtype, self.precision)  # tf32 with 16-bit data: an error now, not at load

    def as_dict(self) -> dict:
        return asdict(self)


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
    """The backward region of each forward region, w.r.t. everything it reads
    but the counter of random draws (the step index among it)."""
    counter = {d.name for d in hoisted.cell.decls if d.kind in COUNTER_KINDS}
    return {name: vjp(graph, tuple(v.name for v in graph.inputs if v.name not in counter), prefix=f"%{name}:")
            for name, graph in (("seq", hoisted.seq), ("pre", hoisted.pre), ("step", hoisted.step))}


def require_dims(cell: Cell, source: Source):
    """Refuse a cell with an unbound dim: plans and kernels need every size."""
    unbound = [name for name, value in cell.dims if value is None]
    if unbound:
        raise checker.BindError(f"dims {', '.join(unbound)} of cell '{cell.name}' need values "
                                f"(dims={{'{unbound[0]}': ...}} or -D {unbound[0]}=...)", None, source)


@dataclass(frozen=True)
class Program:
    """A checked, differentiated, masked and planned cell, ready to load on a backend."""

    source: Source
    cell: Cell
    warnings: tuple
    hoisted: Hoisted  # with the lengths mask (rnnc/passes/mask.py)
    grads: dict  # region name -> Backward, with the lengths mask
    plan: Plan
    options: Options  # what it was compiled with

    @property
    def precision(self) -> str:
        """Of products (rnnc/precision.py): what `load` runs unless told otherwise."""
        return self.options.precision

    def build(self, stage: str, results: dict | None = None, **changes) -> dict:
        """The results of the stages up to `stage` (the CUDA source, the cubin)
        made from this program, with `changes` to its options (arch="sm_90");
        `results` already made are reused."""
        made = {"source": self.source, "plan": self.plan, "program": self, **(results or {})}
        return run_stages(stage, replace(self.options, **changes), made)

    def load(self, backend: str = "numpy", dtype: str | None = None, precision: str | None = None):
        """A module of `backend` for arrays of `dtype` (default: the 16-bit dtype
        the program was compiled with, else float64 on numpy and float32 on
        cuda), products at `precision` (default: the program's; see
        rnnc/precision.py for 16-bit dtypes)."""
        precision = find_precision(precision or self.precision).name
        compiled = self.options.dtype if is_narrow(self.options.dtype) else None
        if backend == "numpy":
            from .backends.numpy import NumpyModule
            return NumpyModule(self, dtype or compiled or "float64", precision)
        if backend == "cuda":
            from .backends.cuda.runtime import load as load_cuda
            return load_cuda(self, dtype or compiled or "float32", precision=precision)
        raise ValueError(f"backend: unknown backend {backend!r} (backends: numpy, cuda)")


# --- the stages ------------------------------------------------------------------------------
def _plan(made: dict, o: Options) -> Plan:
    require_dims(made["ir"].cell, made["source"])  # costs and kernel sizes need real sizes
    hoisted, grads = made["mask"]
    return make_plan(hoisted, grads, o.recompute, o.memory_budget, o.seq_len, o.batch, o.dtype)


def _program(made: dict, o: Options) -> Program:
    hoisted, grads = made["mask"]
    return Program(made["source"], made["ir"].cell, made["ir"].warnings, hoisted, grads, made["plan"], o)


def _schedule(made: dict, o: Options):
    """The schedule of one call, and how the CUDA runtime runs its events' steps."""
    if o.seq_len is None or o.batch is None:
        raise ValueError("schedule: the schedule is of one call; give seq_len=T and batch=B "
                         "(--seq-len, --batch)")
    return made["plan"].schedule(o.seq_len, o.batch, o.dtype), cuda_forms(made["program"])


def cuda_forms(program) -> str:
    """How the CUDA runtime runs the steps of each event (`rnnc plan` and the
    schedule stage print it), or why the program has no kernels."""
    try:
        return program.build("cuda")["cuda"].launches.forms()
    except ValueError as err:  # a program the NumPy backend runs, whose sizes the kernels cannot index
        return f"cuda: no kernels ({err})"


def _cuda(made: dict, o: Options):
    from .backends.cuda.lowering import generate
    # float64 counts a plan's bytes; its kernels are float32's
    return generate(made["program"], o.precision, o.dtype if is_narrow(o.dtype) else "float32")


def _cubin(made: dict, o: Options):
    from .backends.cuda.build import compile_cubin
    return compile_cubin(made["cuda"].source, o.arch)


def _format_grads(grads: dict) -> str:
    return "\n\n".join(b.format(f"backward of {name}") for name, b in grads.items())


@dataclass(frozen=True)
class Stage:
    name: str
    after: str  # the stage whose result it reads ("source": the cell's text)
    make: Callable  # (results so far by stage name, Options) -> its result
    show: Callable | None  # its result as `rnnc emit` prints it (None: not printed)


STAGES = (
    Stage("ast", "source", lambda made, o: parser.parse(made["source"]), parser.format_ast),
    Stage("ir", "ast", lambda made, o: checker.check(made["ast"], made["source"], o.cell, o.dims),
          lambda checked: format_cell(checked.cell)),
    Stage("hoist", "ir", lambda made, o: hoist(made["ir"].cell), Hoisted.format),
    Stage("grad", "hoist", lambda made, o: differentiate(made["hoist"]), _format_grads),
    Stage("mask", "grad", lambda made, o: mask(made["hoist"], made["grad"]),
          lambda masked: format_masked(*masked)),
    Stage("plan", "mask", _plan, Plan.format),
    Stage("schedule", "program", _schedule, lambda made: f"{made[0].format()}\n{made[1]}"),
    Stage("program", "plan", _program, None),
    Stage("cuda", "program", _cuda, lambda generated: generated.source),
    Stage("cubin", "cuda", _cubin, None),
)
BY_NAME = {s.name: s for s in STAGES}
PRINTABLE = tuple(s.name for s in STAGES if s.show)


def run_stages(target: str, options: Options, made: dict) -> dict:
    """Make `target` and the stages it reads that `made` (by stage name, the
    source among them) lacks, in order; returns `made` with them."""
    chain, name = [], target
    while name not in made:
        chain.append(BY_NAME[name])
        name = BY_NAME[name].after
    for stage in reversed(chain):
        made[stage.name] = stage.make(made, options)
    return made


def compile(path_or_text, **options) -> Program:
    """Run the pipeline on a `.cell` file (or its text) up to a Program.

    Options (`Options`): `cell`, `dims`, `recompute` ("none", "all", "auto"
    or a list of value names to recompute), `memory_budget` (bytes of `dtype`
    that forward plus backward may hold for `seq_len` steps of batch `batch`;
    the plan then checkpoints states across time, see rnnc/passes/plan.py),
    `precision` of products ("fp32", exact, the default, or "tf32"), `dtype`
    (what the budget counts bytes of and the CUDA kernels are generated for:
    float32, the default, bfloat16 or float16; float64 for plans only)."""
    return run_stages("program", Options(**options), {"source": read_source(path_or_text)})["program"]


def emit(source: Source, stage: str, **options) -> str:
    """The text of one stage, as `rnnc emit --stage` prints it; the same
    options as `compile`."""
    if stage not in PRINTABLE:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(PRINTABLE)})")
    made = run_stages(stage, Options(**options), {"source": source})
    return BY_NAME[stage].show(made[stage])

