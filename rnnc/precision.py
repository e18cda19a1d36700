"""The precision of products: how the inputs of every `dot` are rounded.

A precision is a property of a module's arithmetic, not of its storage: under
"tf32" the arrays stay float32 (or float64 on NumPy) and only the operands of
each product are rounded to TF32 (10 explicit mantissa bits) before the
multiply, as NVIDIA's tensor cores do, with the sums in float32. The CUDA
backend runs such products on tensor cores (`mma.sync`); the NumPy backend
rounds the operands the same way, so it is the reference the kernels are
compared with at either precision.

DEFAULT is "fp32", exact products: the CUDA backend then gives the NumPy
reference's answer up to float32 rounding, whatever the cell, which is what
a compiler checked against a reference owes its users; tensor cores are one
argument away (`precision="tf32"`; their peak is several times the float32
units' on A100 and H100). This follows PyTorch's matmul default (exact since
1.12) rather than its cuDNN RNN default (TF32): a silent thousandth of
relative error in every gradient is the user's choice to make.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Precision:
    name: str
    mantissa_bits: int  # explicit mantissa bits of a product input (float32's 23: no rounding)
    tensor_cores: bool  # the CUDA backend's products run on tensor cores

    @property
    def unit_roundoff(self) -> float:
        """The largest relative error of rounding one product input (half an ulp)."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def round_inputs(self, array: np.ndarray) -> np.ndarray:
        """A product input rounded as the hardware rounds it (`cvt.rna.tf32.f32`:
        to nearest, ties away from zero), in the array's own dtype."""
        if self.mantissa_bits >= 23:
            return array
        drop = 23 - self.mantissa_bits
        bits = np.asarray(array, np.float32).view(np.uint32)
        finite = (bits & 0x7F800000) != 0x7F800000
        # adding half of the dropped range to the magnitude bits rounds half away from zero;
        # a carry into the exponent is the correct rounding up to the next binade
        rounded = np.where(finite, (bits + np.uint32(1 << (drop - 1))) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF),
                           bits)
        return rounded.astype(np.uint32).view(np.float32).astype(array.dtype)


PRECISIONS = {p.name: p for p in (Precision("fp32", 23, False), Precision("tf32", 10, True))}
DEFAULT = "fp32"


def precision(name: str | None) -> Precision:
    """The Precision called `name` (None: the default), or a ValueError naming the choices."""
    name = DEFAULT if name is None else name
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {name!r} "
                         "(bf16 and fp16 come with bfloat16 and float16 storage)")
    return PRECISIONS[name]
