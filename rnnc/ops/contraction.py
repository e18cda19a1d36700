"""The product `a @ b`: one `dot` op, an einsum spec over per-example axes.

`a @ b` follows NumPy's matmul on vectors and matrices per example; the hidden
batch axis is a letter of its own (`BATCH`) in the spec, so the derivative
rules (products again, with other specs) and the CUDA backend see which
operand has it. Products are never recomputed: their cost grows with the
fan-in, which the planner's per-element price of storing hides (AOTAutograd
never recomputes a matmul either).
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import Value
from ..shapes import shape_str
from .registry import Kernel, Operator, ShapeError, defop

BATCH = "z"  # the letter of the hidden batch axis in `dot` specs


def matmul_spec(a: Value, b: Value) -> str:
    """The `dot` spec of `a @ b` under NumPy matmul rules on per-example shapes
    (vectors and matrices); the batch axis is a letter of its own, so it never
    mixes with the others."""
    ra, rb = len(a.shape), len(b.shape)
    if not (1 <= ra <= 2 and 1 <= rb <= 2):
        raise ShapeError(f"'@' takes vectors and matrices, not shapes {shape_str(a.shape)} "
                         f"and {shape_str(b.shape)}")
    la = "ik"[2 - ra:]
    lb = "kj"[: rb]
    out = la[:-1] + lb[1:]
    z = BATCH if a.batched or b.batched else ""
    return (BATCH if a.batched else "") + la + "," + (BATCH if b.batched else "") + lb + "->" + z + out


def letters(spec):
    """The per-example letters of a spec's operands and result (no batch letter)."""
    ins, out = spec.split("->")
    la, lb = ins.split(",")
    return la.replace(BATCH, ""), lb.replace(BATCH, ""), out.replace(BATCH, "")


def dot_shape(shapes, attrs):
    la, lb, out = letters(attrs["spec"])
    sizes = {}
    for chars, shape in ((la, shapes[0]), (lb, shapes[1])):
        for c, s in zip(chars, shape):
            if c in sizes and sizes[c] != s:
                raise ShapeError(f"matmul inner sizes differ: {shape_str(shapes[0])} @ "
                                 f"{shape_str(shapes[1])} ({sizes[c]} vs {s})")
            sizes.setdefault(c, s)
    return tuple(sizes[c] for c in out)


def einsum2(spec: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A two-operand einsum that runs on BLAS (tensordot) when no axis is shared
    by both operands and the result, and on np.einsum otherwise."""
    ins, out = spec.split("->")
    la, lb = ins.split(",")
    shared_kept = set(la) & set(lb) & set(out)
    if shared_kept:
        return np.einsum(spec, a, b, optimize=True)
    summed = [c for c in la if c in lb]
    res = np.tensordot(a, b, axes=([la.index(c) for c in summed], [lb.index(c) for c in summed]))
    order = [c for c in la if c not in summed] + [c for c in lb if c not in summed]
    perm = [order.index(c) for c in out]
    return res if perm == sorted(perm) else res.transpose(perm)


def dot_vjp(B, n, g):
    """d(a) = g contracted with b back to a's letters; likewise for b."""
    ins, out = n.attr("spec").split("->")
    la, lb = ins.split(",")
    a, b = n.args
    da = B.emit("dot", g, b, spec=f"{out},{lb}->{la}")
    db = B.emit("dot", a, g, spec=f"{la},{out}->{lb}")
    return [da, db]


def dot_flops(n, shapes):
    la, lb, _ = letters(n.attr("spec"))
    sizes = dict(zip(la, shapes[0][-len(la):] if la else ()))
    sizes.update(zip(lb, shapes[1][-len(lb):] if lb else ()))
    return 2 * math.prod(sizes.values())


defop("dot", syntax=Operator("@", "matmul", attrs=lambda values: {"spec": matmul_spec(*values)}), shape=dot_shape,
      numpy=lambda n, a, b: einsum2(n.attr("spec"), a, b), vjp=dot_vjp, flops=dot_flops, recompute=False,
      cuda=Kernel("contract.cu.j2", lambda n, a, b: {"spec": n.attr("spec")}), rounds_inputs=True,
      sums_rows=True, batched=lambda flags, attrs: BATCH in attrs["spec"].split("->")[1])
