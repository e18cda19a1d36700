"""Memory against time for recompute plans, on the NumPy backend, in one process.

    python benchmarks/memory.py [--seq-len 1000] [--batch 16] [--repeats 3] [--dtype-seq-len 100]

Table 1: the LSTM (D=H=128, float32) under `none`, `auto`, `all` and memory
budgets of 20%, 10% and 5% of `none`'s peak: peak bytes (measured by the
backend, equal to the plan's prediction) and forward+backward time, each as a
ratio to `none`. Then inference's forward time against training's.

Table 2: every example under `none`, `auto`, `all` and the manual choice of
Caffe2's `recurrent_net` in its memory mode (its `recompute_blobs_on_backward`
names the gate pre-activations): peak bytes and time, and whether
`auto` lies on the front (no tested plan has both fewer bytes and less time).

Table 3: every example under `none`, `auto` and `all` in float32, bfloat16
and float16: the bytes the forward stores and the peak of forward+backward,
measured, and the 16-bit ones as a ratio to float32's. The hoisted rows, the
stored values and their cotangents halve; the states (in the tape and the
checkpoints), the once-per-sequence values and the gradient sums stay float32.

Table 4: the masks of dropout and zoneout. The zoneout LSTM and the
variational-dropout GRU against the LSTM and GRU they regularise: bytes the
forward stores for the backward (planned, and measured on the regularised
one) under `none`, `auto` and `all`, and what keeping their masks would add
(float32, one per element drawn: per step for zoneout, per sequence for the
variational mask), which rnnc never does: the backward draws them again.

Times are the best of --repeats runs, the plans of a table taken in turn so
that drift in the machine's speed falls on all of them alike.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path

# one BLAS thread: the plans are compared with each other, and a thread pool
# fighting other processes for the cores makes single runs slower at random
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

import rnnc  # noqa: E402
from rnnc.gradcheck import random_arguments  # noqa: E402
from rnnc.shapes import concrete_shape  # noqa: E402

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.cell"))
DIMS = {"D": 128, "H": 128, "E": 64, "S": 16, "P": 64}
DTYPE = "float32"
# Caffe2's recurrent_net in its memory mode: recompute the gate pre-activations (and what follows from them)
CAFFE2_CHOICE = {"gru": ["hu"], "variational_gru": ["hu"], "indrnn": ["h_new"], "elman": ["pre"],
                 "elman_relu": ["pre"]}
REGULARISED = {"zoneout_lstm": "lstm", "variational_gru": "gru"}  # regularised example -> its plain cell
BUDGETS = (20, 10, 5)  # percent of none's peak


def dims_of(path: Path) -> dict:
    declared = re.search(r"^\s*dim\s+([^\n#]+)", path.read_text(), re.M).group(1)
    return {d.strip(): DIMS[d.strip()] for d in declared.split(",")}


def compile_plan(path: Path, T: int, B: int, recompute="auto", budget_percent=None):
    dims = dims_of(path)
    if budget_percent is None:
        return rnnc.compile(path, dims=dims, recompute=recompute)
    none = rnnc.compile(path, dims=dims, recompute="none").plan
    budget = none.peak_bytes(T, B, DTYPE) * budget_percent // 100
    return rnnc.compile(path, dims=dims, memory_budget=budget, seq_len=T, batch=B, dtype=DTYPE)


class Case:
    """One plan, loaded, with its arguments; `run` times forward plus backward."""

    def __init__(self, label: str, program, T: int, B: int):
        self.label, self.program = label, program
        self.module = program.load(dtype=DTYPE)
        self.args = random_arguments(self.module, T=T, B=B, seed=0)
        self.T, self.B = T, B
        self.times, self.peak = [], None

    def run(self):
        start = time.perf_counter()
        result = self.module.forward(**self.args)
        d_outputs = {k: np.ones_like(v) for k, v in result.outputs.items()}
        grads = self.module.backward(result, d_outputs)
        self.times.append(time.perf_counter() - start)
        predicted = self.program.plan.peak_bytes(self.T, self.B, DTYPE)
        assert grads.peak_bytes == predicted, (self.label, grads.peak_bytes, predicted)
        self.peak = grads.peak_bytes

    @property
    def time(self) -> float:
        return min(self.times)


def measure(cases: list, repeats: int) -> list:
    for _ in range(repeats):
        for case in cases:
            case.run()
    return cases


def table(rows: list, header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def lstm_table(T: int, B: int, repeats: int) -> str:
    path = next(p for p in EXAMPLES if p.stem == "lstm")
    cases = [Case(p, compile_plan(path, T, B, recompute=p), T, B) for p in ("none", "auto", "all")]
    cases += [Case(f"budget {b}%", compile_plan(path, T, B, budget_percent=b), T, B) for b in BUDGETS]
    measure(cases, repeats)
    none = cases[0]
    rows = [(c.label, c.program.plan.describe().split(", memory_budget")[0].replace("recompute=", ""),
             len(c.program.plan.segments_for(T)), mib(c.peak), f"{100 * c.peak / none.peak:.1f}%",
             f"{c.time:.2f} s", f"{c.time / none.time:.2f}x") for c in cases]
    header = ("plan", "per step", "segments", "peak", "% of none", "fwd+bwd", "time / none")
    return (f"LSTM D=H=128, T={T}, B={B}, {DTYPE}, numpy backend (best of {repeats})\n"
            + table(rows, header) + "\n\n" + inference_line(none, repeats))


def inference_line(case: Case, repeats: int) -> str:
    """Training's forward keeps values for the backward; inference's keeps none."""
    timings = {True: [], False: []}
    for _ in range(repeats):
        for train in (True, False):
            start = time.perf_counter()
            case.module.forward(**case.args, train=train)
            timings[train].append(time.perf_counter() - start)
    train, infer = min(timings[True]), min(timings[False])
    return (f"forward only ({case.label}): training {train:.3f} s, inference (train=False, 0 bytes kept) "
            f"{infer:.3f} s ({infer / train:.2f}x)")


def examples_table(T: int, B: int, repeats: int) -> str:
    rows = []
    for path in EXAMPLES:
        caffe2 = CAFFE2_CHOICE.get(path.stem, ["gates"])
        cases = [Case(p, compile_plan(path, T, B, recompute=p), T, B) for p in ("none", "auto", "all")]
        cases.append(Case("caffe2 " + ",".join(caffe2), compile_plan(path, T, B, recompute=caffe2), T, B))
        measure(cases, repeats)
        auto = cases[1]
        dominated = [c.label for c in cases if c.peak < auto.peak and c.time < auto.time]
        cells = [f"{mib(c.peak)} {c.time:.2f}s" for c in cases]
        rows.append((path.stem, *cells, "yes" if not dominated else "no: " + ", ".join(dominated)))
    header = ("cell", "none", "auto", "all", "caffe2 (gates)", "auto on front")
    return (f"Every example, D=H=128 E=64 S=16, T={T}, B={B}, {DTYPE}: peak and fwd+bwd time "
            f"(best of {repeats})\n" + table(rows, header))


def dtype_table(T: int, B: int) -> str:
    rows = []
    for path in EXAMPLES:
        for policy in ("none", "auto", "all"):
            program = compile_plan(path, T, B, recompute=policy)
            measured = {}
            for dtype in ("float32", "bfloat16", "float16"):
                module = program.load(dtype=dtype)
                args = random_arguments(module, T=T, B=B, seed=0)
                result = module.forward(**args)
                stored = result.stored_bytes
                peak = module.backward(result, {k: np.ones_like(v) for k, v in result.outputs.items()}).peak_bytes
                assert (stored, peak) == (program.plan.stored_bytes(T, B, dtype), program.plan.peak_bytes(T, B, dtype))
                measured[dtype] = (stored, peak)
            f32 = measured["float32"]
            rows.append((path.stem, policy, mib(f32[0]), mib(f32[1]),
                         *(f"{measured[d][i] / f32[i]:.2f}" for d in ("bfloat16", "float16") for i in (0, 1))))
    header = ("cell", "plan", "stored f32", "peak f32", "stored bf16/f32", "peak bf16/f32",
              "stored f16/f32", "peak f16/f32")
    return (f"Bytes by dtype, D=H=128 E=64 S=16, T={T}, B={B}, measured by the numpy backend\n"
            + table(rows, header))


def mask_bytes(program, T: int, B: int) -> int:
    """What keeping every mask of a call would take in float32: each random
    call's elements, per step or once per sequence."""
    values = program.hoisted.values()
    total = 0
    for value, _, per in program.plan.draws:
        elements = math.prod(concrete_shape(values[value].shape)) * (B if per != "batch" else 1)
        total += elements * (T if per == "step" else 1) * 4
    return total


def masks_table(T: int, B: int) -> str:
    rows = []
    for regularised, plain in REGULARISED.items():
        path = next(p for p in EXAMPLES if p.stem == regularised)
        for policy in ("none", "auto", "all"):
            programs = [compile_plan(next(p for p in EXAMPLES if p.stem == name), T, B, recompute=policy)
                        for name in (plain, regularised)]
            planned = [p.plan.stored_bytes(T, B, DTYPE) for p in programs]
            module = programs[1].load(dtype=DTYPE)
            measured = module.forward(**random_arguments(module, T=T, B=B, seed=0)).stored_bytes
            assert measured == planned[1], (regularised, policy, measured, planned[1])
            rows.append((f"{regularised} / {plain}", policy, mib(planned[0]), mib(measured),
                         f"{planned[1] - planned[0]:+d} B", mib(mask_bytes(programs[1], T, B))))
    header = ("cell / plain cell", "plan", "plain stores", "regularised stores (measured)", "difference",
              "masks, if kept")
    return (f"Masks, D=H=128, T={T}, B={B}, {DTYPE}: stored bytes of the regularised examples and of the cells "
            f"they regularise\n" + table(rows, header) + "\n(a difference is a dropped value a product reads, "
            "`dropout(h) @ U`: an activation `none` stores as any other, not a mask; `rnnc plan` of "
            f"{path.stem}: {str(programs[1].plan).splitlines()[-1].strip()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples-seq-len", type=int, default=None,
                        help="T of the second table (default: --seq-len)")
    parser.add_argument("--dtype-seq-len", type=int, default=100, help="T of the third table (default 100)")
    parser.add_argument("--only-dtypes", action="store_true", help="only the third table")
    args = parser.parse_args()
    if not args.only_dtypes:
        print(lstm_table(args.seq_len, args.batch, args.repeats))
        print()
        print(examples_table(args.examples_seq_len or args.seq_len, args.batch, args.repeats))
        print()
    print(dtype_table(args.dtype_seq_len, args.batch))
    if not args.only_dtypes:
        print()
        print(masks_table(args.seq_len, args.batch))


if __name__ == "__main__":
    main()
