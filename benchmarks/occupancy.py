"""How the persistent kernels fit on the GPU, from ptxas alone (no GPU needed).

    python benchmarks/occupancy.py [--precision fp32 tf32] [--examples lstm gru milstm attention_lstm]

For each example at benchmarks/gpu.py's sizes (D=H=512; attention: E=256,
S=32), each precision and each architecture the tests build (sm_80 for the
A100, sm_90 for the H100 and H200): every persistent kernel's registers
(ptxas -v) and shared memory (its pool and the params its products keep,
given at launch), the blocks the GPU holds at once
(rnnc/backends/cuda/occupancy.py), the grid the runtime launches at B=64
and B=4, and the blocks of each launch that keeps params (all of its
kernels' blocks, for a launch of several): where those are no more than the
grid, every tile has a block of its own and the params come from global
memory once a call. Without nvcc it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import rnnc
from rnnc.backends.cuda import build, occupancy
from rnnc.backends.cuda.executor import work_blocks
from rnnc.backends.cuda.lowering import generate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CELL_DIMS = {"D": 512, "H": 512}  # benchmarks/gpu.py's sizes
DIMS_OF = {"lstm": CELL_DIMS, "gru": CELL_DIMS, "milstm": CELL_DIMS, "attention_lstm": {**CELL_DIMS, "E": 256, "S": 32}}
GPUS_OF = {"sm_80": ("A100",), "sm_90": ("H100", "H200")}
BATCHES = (64, 4)


def rows(name: str, precision: str, cache: Path):
    """A line per (architecture, persistent kernel, GPU); the cubins built into
    `cache` (an empty one: a cached cubin has no ptxas report)."""
    generated = generate(rnnc.compile(EXAMPLES / f"{name}.cell", dims=DIMS_OF[name]), precision)
    launches = generated.launches
    for arch, gpus in GPUS_OF.items():
        used = build.kernel_resources(build.compile_cubin(generated.source, arch, cache).log)
        for kind, persistent in launches.persistent.items():
            registers, static = used[persistent.kernel]
            shared = static + persistent.shared
            steps = getattr(launches, kind)
            for gpu in gpus:
                capacity = occupancy.co_resident(occupancy.GPUS[gpu], persistent.block, registers, shared)
                grids = []
                for batch in BATCHES:
                    grid = occupancy.persistent_grid(capacity, max(work_blocks(launch, batch) for launch in steps))
                    kept = [work_blocks(launch, batch) for launch in steps if launch.kernel in persistent.kept]
                    grids.append(f"B={batch}: grid {grid:4}, blocks of launches keeping params {kept or '-'}")
                yield (f"{name:15} {precision} {arch} {kind:14} {registers:3} registers {shared:7,} B shared  "
                       f"{gpu}: {capacity:4} at once;  " + ";  ".join(grids))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "tf32"], choices=["fp32", "tf32"])
    parser.add_argument("--examples", nargs="+", default=list(DIMS_OF), choices=list(DIMS_OF))
    args = parser.parse_args(argv)
    try:
        build.nvcc_path()
    except build.BuildError as err:
        print(f"benchmarks/occupancy.py: skipped: {err}")
        return 0
    with tempfile.TemporaryDirectory() as cache:
        for name in args.examples:
            for precision in args.precision:
                for line in rows(name, precision, Path(cache)):
                    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
