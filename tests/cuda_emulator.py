"""A CPU emulation of CUDA, enough to run rnnc's generated kernels without a GPU.

The generated `kernels.cu` is compiled by g++ with a small header that defines
threadIdx, blockIdx, `__shared__` and `__syncthreads`: the blocks of a launch
run one after another, the threads of a block as fibers (ucontext) that
switch at every `__syncthreads` and every warp-wide instruction, so a barrier
waits for all threads of the block, and a warp-wide instruction (tensor-core
`mma`, a shuffle) for the 32 lanes of the warp, as on a GPU; a barrier or
warp-wide instruction that not all of them reach aborts with a message.
`emulated_intrinsics.py` defines the hardware instructions the kernels use
(templates/intrinsics.cu) for the emulation. `EmulatedDevice` has the methods the
runtime's `Executor` uses, so the whole CUDA backend (schedule, buffers, host
loop, kernels) runs and can be compared with the NumPy reference.

Fresh pools are filled with NaN bytes, so reading memory no kernel wrote shows.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np

import emulated_intrinsics

HEADER = r"""
#include <math.h>
#include <cmath>
#include <algorithm>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
using std::min; using std::max;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __launch_bounds__(...)
#define __shared__ static  /* blocks run one at a time: a block's threads share it */
#define __device__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
namespace emu {
// where a thread stands: running (or ready to), waiting at __syncthreads, waiting
// for the rest of its warp at a warp-wide instruction (mma, shuffle), or done
enum State { READY, AT_BLOCK, AT_WARP, DONE };
static ucontext_t scheduler;
static std::vector<ucontext_t> fibers;
static std::vector<std::vector<char>> stacks;
static std::vector<State> state;
static int current;
static void (*body)(void*);
static void* body_arg;
static void (*block_start)(unsigned threads);  // the intrinsics' per-block state, reset
static void entry() {
    body(body_arg);
    state[current] = DONE;
    swapcontext(&fibers[current], &scheduler);
}
static void wait(State at) {
    state[current] = at;
    swapcontext(&fibers[current], &scheduler);
}
static void fail(const char* what) {
    fprintf(stderr, "cuda emulator: block (%u, %u, %u): %s\n", blockIdx.x, blockIdx.y, blockIdx.z, what);
    abort();
}
// Releases the threads that may go on: a warp whose lanes all wait at a warp-wide
// instruction, else the whole block when every thread not done waits at __syncthreads.
static bool release(unsigned threads) {
    bool any = false;
    for (unsigned w = 0; w < threads; w += 32) {
        unsigned lanes = std::min(threads - w, 32u), at_warp = 0;
        for (unsigned i = w; i < w + lanes; ++i) at_warp += state[i] == AT_WARP;
        if (at_warp == 0) continue;
        if (at_warp != lanes) fail("a warp-wide instruction not reached by every lane of the warp");
        for (unsigned i = w; i < w + lanes; ++i) state[i] = READY;
        any = true;
    }
    if (any) return true;
    unsigned waiting = 0, left = 0;
    for (unsigned i = 0; i < threads; ++i) {
        waiting += state[i] == AT_BLOCK;
        left += state[i] != DONE;
    }
    if (left == 0) return false;
    if (waiting != left) fail("deadlock: threads wait at different barriers");
    for (unsigned i = 0; i < threads; ++i) if (state[i] == AT_BLOCK) state[i] = READY;
    return true;
}
static void run_block(unsigned threads) {
    fibers.resize(threads);
    stacks.resize(threads);
    state.assign(threads, READY);
    if (block_start) block_start(threads);
    for (unsigned i = 0; i < threads; ++i) {
        stacks[i].resize(1 << 16);
        getcontext(&fibers[i]);
        fibers[i].uc_stack.ss_sp = stacks[i].data();
        fibers[i].uc_stack.ss_size = stacks[i].size();
        fibers[i].uc_link = nullptr;
        makecontext(&fibers[i], entry, 0);
    }
    do {  // one round: every ready thread up to its next barrier or warp-wide instruction
        for (unsigned i = 0; i < threads; ++i) {
            if (state[i] != READY) continue;
            current = (int)i;
            threadIdx.x = i;
            swapcontext(&scheduler, &fibers[i]);
        }
    } while (release(threads));
}
static void run_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx) {
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz;
    blockDim.x = bx;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
                run_block(bx);
            }
}
}  // namespace emu
inline void __syncthreads() { emu::wait(emu::AT_BLOCK); }
"""

WRAPPER = """
extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, int rows, int t,
                            const int* lengths, float** p) {{
    struct Args {{ int rows, t; const int* lengths; float** p; }} args{{rows, t, lengths, p}};
    emu::body = [](void* v) {{ Args* a = (Args*)v; {name}(a->rows, a->t, a->lengths{params}); }};
    emu::body_arg = &args;
    emu::run_grid(gx, gy, gz, bx);
}}
"""


def available() -> bool:
    return shutil.which("g++") is not None


def build_library(source: str, arities: dict, workdir: Path) -> ctypes.CDLL:
    """The emulation of `source`, built by g++ unless `workdir` has it; two
    threads building the same one at once each build it in a directory of
    their own and rename it into place, so neither loads a half-written one."""
    wrappers = "".join(WRAPPER.format(name=k, params="".join(f", a->p[{i}]" for i in range(n)))
                       for k, n in arities.items())
    text = HEADER + emulated_intrinsics.HEADER + source + wrappers
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    lib = workdir / f"emu_{key}.so"
    if not lib.exists():
        with tempfile.TemporaryDirectory(dir=workdir) as own:
            src, built = Path(own) / f"emu_{key}.cpp", Path(own) / f"emu_{key}.so"
            src.write_text(text)
            subprocess.run(["g++", "-O0", "-std=c++17", "-shared", "-fPIC", "-w", "-o", str(built), str(src)],
                           check=True, capture_output=True, text=True)
            os.replace(built, lib)
    return ctypes.CDLL(str(lib))


class HostArray:
    """Host memory posing as a device array (`__cuda_array_interface__`), to
    check that device arrays in give device arrays out."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array, order="C")  # a 0-d array stays 0-d

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.array.shape, "typestr": self.array.dtype.str,
                "data": (self.array.ctypes.data, False), "version": 2, "strides": None}


class EmulatedDevice:
    def __init__(self, generated, workdir: Path):
        self.lib = build_library(generated.source, generated.schedule.arities(), workdir)
        self.kernels = {}
        for name in generated.schedule.kernels():
            fn = getattr(self.lib, f"emu_{name}")
            fn.argtypes = [ctypes.c_uint] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                                 ctypes.POINTER(ctypes.c_void_p)]
            self.kernels[name] = fn
        self.launched = []

    def active(self):
        return nullcontext()

    def alloc(self, nbytes: int):
        pool = np.full(max(nbytes, 1) + 256, 0xFF, np.uint8)  # NaN bytes: unwritten memory shows
        base = (pool.ctypes.data + 255) // 256 * 256
        return base, pool

    def htod(self, ptr, array):
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    def dtoh(self, out, ptr):
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)

    def dtod(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    def memset0(self, ptr, nbytes):
        ctypes.memset(ptr, 0, nbytes)

    def empty(self, shape):
        return HostArray(np.empty(shape, np.float32))

    def launch(self, kernel, grid, block, rows, t, lengths, ptrs):
        self.launched.append(kernel)
        args = (ctypes.c_void_p * max(len(ptrs), 1))(*ptrs)
        self.kernels[kernel](*grid, block, rows, t, lengths, args)
