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

bfloat16 and float16 data (rnnc/dtypes.py) multiply on tensor cores in their
own type: their products' inputs round to it (to nearest, ties to even, as
`cvt.rn.bf16.f32` does; bfloat16 has 7 mantissa bits, float16 10 and a
narrower range), with float32 sums. That is the precision "bf16" or "f16"
of such a module, which `for_dtype` picks; `precision=` chooses among
float32 products only, so with 16-bit data it must be left at "fp32" (its
default, meaning "no rounding of the products' own") and "tf32" is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import storage


@dataclass(frozen=True)
class Precision:
    name: str
    mantissa_bits: int  # explicit mantissa bits of a product input (float32's 23: no rounding)
    tensor_cores: bool  # the CUDA backend's products run on tensor cores
    through: str | None = None  # a NumPy dtype the inputs round through (16-bit types), else by bits

    @property
    def unit_roundoff(self) -> float:
        """The largest relative error of rounding one product input (half an ulp)."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def round_inputs(self, array: np.ndarray) -> np.ndarray:
        """A product input rounded as the hardware rounds it (`cvt.rna.tf32.f32`:
        to nearest, ties away from zero; a 16-bit type's conversion: to nearest
        even), in the array's own dtype."""
        if self.through:
            with np.errstate(over="ignore"):  # float16's range ends at 65504: beyond, inf, as in hardware
                return np.asarray(array, np.float32).astype(storage(self.through)).astype(array.dtype)
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
# the products of 16-bit data, by dtype name: not choices of `precision=`
OF_NARROW = {"bfloat16": Precision("bf16", 7, True, "bfloat16"), "float16": Precision("f16", 10, True, "float16")}


def precision(name: str | None) -> Precision:
    """The Precision called `name` (None: the default), or a ValueError naming the choices."""
    name = DEFAULT if name is None else name
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {name!r} "
                         "(bf16 and fp16 come with bfloat16 and float16 storage)")
    return PRECISIONS[name]


def for_dtype(dtype, name: str | None) -> Precision:
    """The precision of a module of `dtype` asked for `name` (None: the default):
    a 16-bit dtype's own, else `precision(name)`."""
    dtype_name = storage(dtype).name
    if dtype_name not in OF_NARROW:
        return precision(name)
    if precision(name).name != DEFAULT:
        raise ValueError(f"precision: {name!r} rounds the products of float32 data; {dtype_name} data "
                         f"multiplies on tensor cores in {dtype_name} (precision "
                         f"{OF_NARROW[dtype_name].name!r}): leave precision at {DEFAULT!r}")
    return OF_NARROW[dtype_name]
