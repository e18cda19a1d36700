"""Product kernels one at a time on the CPU emulator (tests/cuda_emulator.py),
for every input type the generator has: exact float32 on CUDA cores, and TF32,
BF16 and FP16 on tensor cores (`mma.sync`, emulated as a warp-wide instruction
in the PTX ISA's fragment layout).

Shapes cover each way an operand can lie in memory (A contiguous along k or
along m, B along n or along k), sizes that are no multiple of a tile, a batch
of per-example products, a product with one row (which stays on CUDA cores
and still rounds as the precision says), and split-K with chunks of k left
empty.

The references: exact float32 products are compared with float64 products of
the same inputs. TF32 products are compared with float64 products of the
inputs rounded as `rnnc.precision` rounds them (as `cvt.rna.tf32.f32` does);
what is left is float32 summation, so the tolerance is float32's, and the
same kernels are shown to differ from the unrounded product by far more (the
rounding is really there). BF16 and FP16 inputs are given in their own type,
so the reference is exact on the same values; a float32 operand of a 16-bit
product (a state, say) is rounded by the kernel to nearest even, which the
reference does with ml_dtypes and NumPy's float16.
"""
from __future__ import annotations

import numpy as np
import pytest

from rnnc.backends.cuda.cexpr import Ref
from rnnc.backends.cuda.kernels import Generator, intrinsics, render
from rnnc.backends.cuda.products import INPUTS
from rnnc.dtypes import storage
from rnnc.backends.cuda.executor import grid, packed
from rnnc.backends.cuda.launches import Generated, Launches
from rnnc.ir import Node
from rnnc.precision import PRECISIONS

import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")

SUMMATION = 1e-5  # float32 summation over a few hundred terms, times the reference's largest magnitude


class Region:
    """What the generator needs of a region: a name, its rows, where launches go."""

    def __init__(self, label: str, rows: str):
        self.label, self.rows, self.launches = label, rows, []
        self.persistent = False  # not a step's: no persistent kernel runs its launches


# (spec, A's per-example shape and batchedness, B's, rows, region rows, op, what it covers)
CASES = [
    ("zk,kj->zj", ((70,), True), ((70, 97), False), 37, "B", "=", "h @ U: A along k, B along n"),
    ("zj,kj->zk", ((388,), True), ((97, 388), False), 37, "B", "=", "dh = dgates @ U^T: B along k, split-K"),
    ("zk,zj->kj", ((40,), True), ((24,), True), 50, "TB", "+=",
     "dU = h^T dgates over the rows: A along m, k the rows, empty splits"),
    ("zik,kj->zij", ((6, 20), True), ((20, 12), False), 5, "TB", "=", "keys = enc @ We: m the rows and S"),
    ("zk,zkj->zj", ((6,), True), ((6, 20), True), 5, "B", "=", "alpha @ enc per example: one row"),
]


def add_case(gen: Generator, i: int, case, float_a: bool = False):
    """Case i's kernel, its operands in buffers a<i>, b<i> and c<i> (float32,
    the inputs in the 16-bit type of a 16-bit generator, but A in float32 with
    `float_a`): its launch."""
    spec, (a_shape, a_b), (b_shape, b_b), _, rows, op, _ = case
    elem = gen.inputs.elem
    refs = [Ref(f"{name}{i}", "base", shape, batched, kind) for name, shape, batched, kind in
            (("a", a_shape, a_b, "float" if float_a else elem), ("b", b_shape, b_b, elem),
             ("c", spec_shape(spec, a_shape, b_shape), True, "float"))]
    region = Region(f"case{i}", rows)
    gen.launch(region, [gen.breaking(region, Node(f"c{i}", "dot", ("a", "b"), (("spec", spec),)), refs[:2], refs[2],
                                     op, spec)])
    return region.launches[0]


def kernel_module(inputs: str, cases, workdir, float_a: bool = False):
    """Every case's kernel in one module for input type `inputs`, on the emulator:
    (device, launches, the kernels' scratch buffers)."""
    gen = Generator(inputs)
    launches = [add_case(gen, i, case, float_a) for i, case in enumerate(cases)]
    source = render("module.cu.j2", cell="products", intrinsics=intrinsics(), kernels=gen.sources)
    return (cuda_emulator.EmulatedDevice(Generated(source, Launches(buffers=dict(gen.scratch), step=launches)), workdir),
            launches, gen.scratch)


def spec_shape(spec: str, a_shape: tuple, b_shape: tuple) -> tuple:
    """The per-example shape of a `dot` spec's result."""
    (la, lb), out = spec.split("->")[0].split(","), spec.split("->")[1]
    sizes = dict(zip(la.replace("z", ""), a_shape)) | dict(zip(lb.replace("z", ""), b_shape))
    return tuple(sizes[c] for c in out.replace("z", ""))


def as_bits(values: np.ndarray, inputs: str) -> tuple:
    """float32 values in the kernel's input type: (what the kernel reads, the values it means)."""
    if inputs == "f16":
        half = values.astype(np.float16)
        return half.view(np.uint16), half.astype(np.float64)
    if inputs == "bf16":  # round to nearest even in the top 16 bits
        bits = values.astype(np.float32).view(np.uint32)
        top = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return top, (top.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return values.astype(np.float32), values.astype(np.float64)


def run_case(device, launch, scratch, i: int, case, inputs: str, seed: int, float_a: bool = False):
    """Case i's kernel's result for random operands, the exact product of what it
    read (rounded as the precision says), and that of the unrounded operands."""
    spec, (a_shape, a_b), (b_shape, b_b), rows, _, op, _ = case
    rng = np.random.default_rng(seed)
    a32 = rng.normal(size=((rows,) if a_b else ()) + a_shape).astype(np.float32)
    b32 = rng.normal(size=((rows,) if b_b else ()) + b_shape).astype(np.float32)
    (a_in, a_val), (b_in, b_val) = as_bits(a32, inputs), as_bits(b32, inputs)
    if float_a:  # given in float32, rounded by the kernel as the type's conversion does
        a_in = a32
        a_val = a32.astype(storage({"bf16": "bfloat16", "f16": "float16"}[inputs])).astype(np.float64)
    if inputs in PRECISIONS:  # float32 operands, rounded (or not) by the kernel itself
        a_val, b_val = (PRECISIONS[inputs].round_inputs(x).astype(np.float64) for x in (a32, b32))
    exact = np.einsum(spec, a32.astype(np.float64), b32.astype(np.float64))
    reference = np.einsum(spec, a_val, b_val)
    before = (rng.normal(size=reference.shape) if op == "+=" else np.full(reference.shape, np.nan))
    c = before.astype(np.float32)
    arrays = {f"a{i}": a_in.ctypes.data, f"b{i}": b_in.ctypes.data, f"c{i}": c.ctypes.data}
    pools = []
    for name, buf in scratch.items():
        if name.endswith(f":{launch.kernel}"):
            nbytes = buf.numel * 4 * (rows if buf.batched else 1)
            arrays[name], pool = device.alloc(nbytes)
            if buf.role == "tickets":
                device.memset0(arrays[name], nbytes)
            pools.append(pool)
    device.launch(launch.kernel, grid(launch, rows), launch.block,
                  packed(rows, [arrays[name] for name, _ in launch.args]))
    added = np.nan_to_num(before) if op == "+=" else 0.0
    return c.astype(np.float64), reference + added, exact + added


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max()) / float(np.abs(want).max())


@pytest.mark.parametrize("inputs, float_a", [("fp32", False), ("tf32", False), ("bf16", False), ("f16", False),
                                             ("bf16", True), ("f16", True)])
def test_products_equal_the_product_of_what_they_read(inputs, float_a, workdir):
    device, launches, scratch = kernel_module(inputs, CASES, workdir, float_a)
    assert any(name.startswith("split:") for name in scratch), "no case ran split-K"
    for i, (case, launch) in enumerate(zip(CASES, launches)):
        got, want, exact = run_case(device, launch, scratch, i, case, inputs, seed=i, float_a=float_a)
        assert relative(got, want) <= SUMMATION, f"{case[-1]}: {relative(got, want):.2e}"
        if inputs == "tf32":  # the inputs really were rounded: far from the unrounded product
            assert relative(got, exact) > 10 * SUMMATION, f"{case[-1]}: {relative(got, exact):.2e}"


@pytest.mark.parametrize("inputs", ["fp32", "tf32", "bf16", "f16"])
def test_kernels_run_on_the_engine_the_precision_asks_for(inputs):
    gen = Generator(inputs)
    for i, case in enumerate(CASES):
        add_case(gen, i, case)
    bodies = [source for source in gen.sources if not source.startswith('extern "C"')]  # not the launch kernels
    on_tensor_cores = ["rnnc_mma_" in source for source in bodies]
    one_row = ["one row" in case[-1] for case in CASES]
    assert on_tensor_cores == [inputs != "fp32" and not single for single in one_row]


def test_float32_products_refuse_16_bit_operands():
    """A float32 module's products have no 16-bit operands; one would be a lowering mistake."""
    gen = Generator("tf32")
    a, b = Ref("a", "base", (70,), True, "rnnc_bf16"), Ref("b", "base", (70, 97), False)
    with pytest.raises(ValueError, match="a tf32 product cannot read rnnc_bf16 operand a"):
        gen.breaking(Region("r", "B"), Node("c", "dot", ("a", "b"), (("spec", "zk,kj->zj"),)),
                     [a, b], Ref("c", "base", (97,), True), "=", "c")
