"""The op registry: every fact about an op, declared together by `defop`.

`registry.py` says what an op's facts are; each family declares its ops in a
module of its own, as JAX defines each primitive with its rules:
`elementwise.py` (arithmetic, comparisons, activations), `contraction.py`
(`@`), `reductions.py` (sum, mean, softmax), `structure.py` (split,
concat, transpose and the padding and broadcasting of derivatives) and
`random.py` (dropout and zoneout, drawn by a counter-based generator).
`builder.py` is how the checker and derivative rules add nodes; `rules.py`
holds the shape rules and helpers several ops share.

Conventions: shapes are per example (no batch axis); a NumPy rule receives
arrays with a leading batch axis when the value is batched; `flops` is the
cost per example.

Adding an op is one `defop` in its family's module, with every fact (the
checker, planner and backends find it there); a literal argument of a new
kind (a probability, say) is one `LiteralKind` in registry.py, and a kernel
template of a new kind one builder in rnnc/backends/cuda/kernels.py
(`BUILDERS`). tests/test_ops.py fails on a missing fact and on a derivative
no finite-difference cell checks; tests/test_ops_emulated.py runs the new op
on the emulated CUDA backend in every form its rules accept, literal
arguments included (each value of NUMBERS its kind reads and allows).
"""
from . import contraction, elementwise, random, reductions, structure  # noqa: F401  (each registers its ops)
from .builder import Builder
from .contraction import BATCH, matmul_spec
from .random import COUNTER_KINDS, counter_args, counter_values, per_of
from .registry import (FUNCTIONS, OPERATORS, OPS, CExpr, Function, Inline, Internal, Kernel, LiteralKind,
                       Number, OpDef, Operator, Param, ShapeError, defop)
from .rules import align, numel

__all__ = ["BATCH", "Builder", "CExpr", "COUNTER_KINDS", "FUNCTIONS", "Function", "Inline", "Internal", "Kernel",
           "LiteralKind", "Number", "OPERATORS", "OPS", "OpDef", "Operator", "Param", "ShapeError", "align",
           "counter_args", "counter_values", "defop", "matmul_spec", "numel", "per_of"]
