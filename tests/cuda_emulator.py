"""A CPU emulation of CUDA that sees what a GPU would, to run rnnc's generated
kernels without one.

The generated `kernels.cu` is compiled by g++ with a small header that defines
threadIdx, blockIdx, `__shared__` and `__syncthreads`. The threads of a block
run as fibers (ucontext) that switch at every `__syncthreads` and every
warp-wide instruction, so a barrier waits for all threads of the block, and a
warp-wide instruction (tensor-core `mma`, a shuffle) for the 32 lanes of the
warp, as on a GPU. The blocks of a launch run one after another, except a
persistent kernel's (templates/persistent.cu.j2): all of its blocks' threads
are fibers at once, each block with shared memory of its own, and a thread
spinning at a grid barrier lets the others run (`rnnc_pause`), so the real
barrier of templates/intrinsics.cu runs as it does on a GPU; the device
holds `CO_RESIDENT` blocks of it at once, fewer than the grids of its kernels. `emulated_intrinsics.py` defines the hardware instructions
the kernels use (templates/intrinsics.cu) for the emulation. What a GPU
leaves to chance or to undefined behaviour fails here:

- order: the blocks of a launch run in a random order, and the ready threads
  of a block in a new random order every round (seeded), so a thread that
  reads another's write without a barrier between them, or a block that reads
  another block's, gets different results from seed to seed; a persistent
  kernel's blocks sit rounds out by chance, so they drift apart unless a grid
  barrier holds them together;
- memory nobody wrote: fresh device memory is NaN, and so is every
  `__shared__` array at the start of every block (they live in one section of
  the library, refilled before each block runs);
- bounds: `EmulatedDevice` gives every buffer an allocation of its own
  between guard zones of NaN bytes: a kernel that writes into one is an
  error, one that reads from one reads NaN;
- barriers: every round, the threads still running must all wait at the same
  `__syncthreads` (a thread that exits while others wait at one, or threads
  at different ones, is a barrier in divergent code), warp-wide
  instructions must be reached by every lane of the warp, and threads that
  only spin, round after round, wait at a grid barrier some block never
  reaches (a deadlock);
- launch shape: the block may not exceed the kernel's `__launch_bounds__`
  (nor 1024 threads), nor the grid CUDA's limits.

A violation raises `EmulationError`, naming the kernel and what it did.
`EmulatedDevice` has the methods the runtime's `Executor` uses, so the whole
CUDA backend (schedule, buffers, host loop, kernels) runs and can be compared
with the NumPy reference.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import os
import random
import re
import shutil
import subprocess
import tempfile
import weakref
from contextlib import nullcontext
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rnnc.backends.cuda.executor import unpacked
from rnnc.backends.cuda.lowering import generate
from rnnc.backends.cuda.runtime import CudaModule

import emulated_intrinsics

# The seeds the emulated examples run under: RNNC_EMULATOR_SEEDS="1,2,3" for more.
SEEDS = [int(seed) for seed in os.environ.get("RNNC_EMULATOR_SEEDS", "1,2").split(",")]
MAX_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
GUARD = 256  # bytes of NaN before and after every buffer
CO_RESIDENT = 3  # blocks of a persistent kernel at once (EmulatedDevice.co_resident)

HEADER = r"""
#include <math.h>
#include <cmath>
#include <algorithm>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <ucontext.h>
using std::min; using std::max;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
typedef dim3 uint3;
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __launch_bounds__(...)
// every __shared__ array of the library in one section, NaN-filled before each block
#define __shared__ static __attribute__((section("emu_shared")))
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));
#define __device__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
namespace emu {
// a launch argument: the untyped pointer the host passes, as the kernel's parameter type
struct Pointer { void* p; template <class T> operator T*() const { return static_cast<T*>(p); } };
// where a thread stands: running (or ready to), waiting at __syncthreads, waiting
// for the rest of its warp at a warp-wide instruction (mma, shuffle), or done
enum State { READY, AT_BLOCK, AT_WARP, DONE };
// the threads of the blocks running together, as fibers: thread i of the group's
// block j is fiber j * threads + i
static ucontext_t scheduler;
static std::vector<ucontext_t> fibers;
static std::vector<std::vector<char>> stacks;
static std::vector<State> state;
static std::vector<int> barrier_line;  // the line of the __syncthreads each thread waits at
static int current;  // the running fiber
static int spins;  // the fibers whose turn this round ended at a spin loop's wait
static std::mt19937_64 rng;
static char error[512];  // the launch's first violation, "" while there is none
static void (*body)(void*);
static void* body_arg;
static void (*group_start)(unsigned fibers);  // the intrinsics' per-thread state, reset
static void entry() {
    body(body_arg);
    state[current] = DONE;
    swapcontext(&fibers[current], &scheduler);
}
static void wait(State at) {
    state[current] = at;
    swapcontext(&fibers[current], &scheduler);
}
static void spin() {  // a wait in a spin loop: the others go on, this thread tries again next round
    ++spins;
    wait(READY);
}
static void fail(const char* what) {  // the first violation is reported; the launch stops after this round
    if (!error[0])
        snprintf(error, sizeof error, "block (%u, %u, %u): %s", blockIdx.x, blockIdx.y, blockIdx.z, what);
}
static void barrier(int line) {
    barrier_line[current] = line;
    wait(AT_BLOCK);
}
// Releases the threads of one block (fibers first .. first + threads) that may go on: a warp
// whose lanes all wait at a warp-wide instruction, else the whole block when every thread not
// done waits at __syncthreads; none while a thread still runs (spins). Whether any went on.
static bool release(unsigned first, unsigned threads) {
    bool any = false;
    for (unsigned w = first; w < first + threads; w += 32) {
        unsigned lanes = std::min(first + threads - w, 32u), at_warp = 0;
        for (unsigned i = w; i < w + lanes; ++i) at_warp += state[i] == AT_WARP;
        if (at_warp == 0) continue;
        if (at_warp != lanes) fail("a warp-wide instruction not reached by every lane of the warp");
        for (unsigned i = w; i < w + lanes; ++i) state[i] = READY;
        any = true;
    }
    if (any) return true;
    unsigned waiting = 0, left = 0, ready = 0;
    int line = 0, other = 0;
    for (unsigned i = first; i < first + threads; ++i) {
        waiting += state[i] == AT_BLOCK;
        left += state[i] != DONE;
        ready += state[i] == READY;
        if (state[i] == AT_BLOCK && !line) line = barrier_line[i];
        else if (state[i] == AT_BLOCK && barrier_line[i] != line) other = barrier_line[i];
    }
    if (left == 0 || ready) return false;
    char what[160];
    if (waiting != left || waiting != threads) {
        snprintf(what, sizeof what, "%u threads exited while %u wait at the __syncthreads of line %d "
                 "(a barrier in divergent code)", threads - left, waiting, line);
        fail(what);
        return false;
    }
    if (other) {
        snprintf(what, sizeof what, "threads wait at the __syncthreads of lines %d and %d at once "
                 "(a barrier in divergent code)", line, other);
        fail(what);
        return false;
    }
    for (unsigned i = first; i < first + threads; ++i) if (state[i] == AT_BLOCK) state[i] = READY;
    return true;
}
// Runs `group`, blocks that are resident together, to the end: in rounds, each block in a
// random order, each ready thread of it in a random order, up to its next barrier, warp-wide
// instruction or spin. Of several blocks, each sits a round out by chance, so blocks drift
// apart as a GPU's do, and only a grid barrier keeps them together. Each block has shared
// memory of its own: the section holds the running block's, and is swapped when another block
// runs. A round in which every ready thread only spun, and none could be released, would
// repeat forever: a deadlock.
static void run_blocks(const std::vector<dim3>& group, unsigned threads) {
    const unsigned total = group.size() * threads;
    const size_t shared_bytes = __start_emu_shared ? __stop_emu_shared - __start_emu_shared : 0;
    std::vector<std::vector<char>> shared(group.size(), std::vector<char>(shared_bytes, (char)0xFF));
    fibers.resize(total);
    stacks.resize(total);
    state.assign(total, READY);
    barrier_line.assign(total, 0);
    if (group_start) group_start(total);
    for (unsigned i = 0; i < total; ++i) {
        stacks[i].resize(1 << 16);
        getcontext(&fibers[i]);
        fibers[i].uc_stack.ss_sp = stacks[i].data();
        fibers[i].uc_stack.ss_size = stacks[i].size();
        fibers[i].uc_link = nullptr;
        makecontext(&fibers[i], entry, 0);
    }
    std::vector<unsigned> blocks(group.size()), order(threads);
    std::iota(blocks.begin(), blocks.end(), 0u);
    int idle = 0;
    bool going = true;
    while (going && !error[0]) {
        std::shuffle(blocks.begin(), blocks.end(), rng);
        int ran = 0;
        bool skipped = false;
        spins = 0;
        for (unsigned j : blocks) {
            if (std::none_of(&state[j * threads], &state[j * threads] + threads, [](State s) { return s == READY; }))
                continue;
            if (group.size() > 1 && (ran || j != blocks.back()) && rng() % 2) {  // blocks drift apart
                skipped = true;
                continue;
            }
            blockIdx = group[j];
            if (shared_bytes) memcpy(__start_emu_shared, shared[j].data(), shared_bytes);  // NaN: nobody wrote it
            std::iota(order.begin(), order.end(), 0u);
            std::shuffle(order.begin(), order.end(), rng);
            for (unsigned i : order) {
                if (state[j * threads + i] != READY) continue;
                current = (int)(j * threads + i);
                threadIdx.x = i;
                ++ran;
                swapcontext(&scheduler, &fibers[current]);
            }
            if (shared_bytes) memcpy(shared[j].data(), __start_emu_shared, shared_bytes);
        }
        bool released = false;
        going = false;
        for (unsigned j = 0; j < group.size() && !error[0]; ++j) {
            blockIdx = group[j];
            released |= release(j * threads, threads);
            for (unsigned i = j * threads; i < (j + 1) * threads; ++i) going |= state[i] == READY;
        }
        idle = (ran > 0 && ran == spins && !released && !skipped) ? idle + 1 : 0;
        if (idle == 2) fail("threads spin at a grid barrier that the other blocks never reach (a deadlock)");
    }
}
// The blocks of a launch in a random order: one at a time, or all of them at once
// (`together`: a persistent kernel, whose blocks meet at grid barriers); 0, or 1 with
// the first violation in `message`.
static int run_grid(unsigned gx, unsigned gy, unsigned gz, unsigned bx, int together, unsigned long long seed,
                    char* message, int size) {
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz;
    blockDim.x = bx;
    rng.seed(seed);
    error[0] = 0;
    std::vector<dim3> blocks;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                dim3 b; b.x = x; b.y = y; b.z = z;
                blocks.push_back(b);
            }
    std::shuffle(blocks.begin(), blocks.end(), rng);
    if (together) {
        run_blocks(blocks, bx);
    } else {
        for (const dim3& b : blocks) {
            run_blocks(std::vector<dim3>{b}, bx);
            if (error[0]) break;
        }
    }
    snprintf(message, size, "%s", error);
    return error[0] ? 1 : 0;
}
}  // namespace emu
#define __syncthreads() emu::barrier(__LINE__)
"""

WRAPPER = """
extern "C" int emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, int together, int rows, void** p,
                          unsigned long long seed, char* message, int size) {{
    struct Args {{ int rows; void** p; }} args{{rows, p}};
    emu::body = [](void* v) {{ Args* a = (Args*)v; {name}(a->rows{params}); }};
    emu::body_arg = &args;
    return emu::run_grid(gx, gy, gz, bx, together, seed, message, size);
}}
"""

# a kernel's head: extern "C" __global__ void [__launch_bounds__(N, ...)] NAME(
# and its dynamic shared memory, named
DYNAMIC_SHARED = re.compile(r"extern __shared__ __align__\(16\) char (\w+)\[\];")
KERNEL = re.compile(r'extern "C" __global__ void\s+(?:__launch_bounds__\(\s*(\d+)[^)]*\)\s+)?(\w+)\(')


class EmulationError(AssertionError):
    """A kernel did what a GPU leaves undefined or to chance (see the module docstring)."""


def available() -> bool:
    return shutil.which("g++") is not None


class Library:
    """A CUDA source's kernels built for the emulation (by g++ unless `workdir`
    has them: two threads building the same one at once each build it in a
    directory of their own and rename it into place, so neither loads a
    half-written one); `run` launches one."""

    def __init__(self, source: str, arities: dict, workdir: Path, dynamic_shared: int = 0):
        wrappers = "".join(WRAPPER.format(name=k, params="".join(f", emu::Pointer{{a->p[{i}]}}" for i in range(n)))
                           for k, n in arities.items())
        # A kernel's dynamic shared memory (`extern __shared__`, sized at launch): one array of the
        # most any launch asks for (`dynamic_shared` bytes), with the others in the section.
        # __LINE__ counts the kernels' own lines, for the messages.
        dynamic = f"__shared__ __align__(16) char emu_dynamic_shared[{max(16, dynamic_shared)}];\n"
        source = DYNAMIC_SHARED.sub(r"char* const \1 = emu_dynamic_shared;", source)
        text = HEADER + emulated_intrinsics.HEADER + dynamic + '#line 1 "kernels.cu"\n' + source + wrappers
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        lib = workdir / f"emu_{key}.so"
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=workdir) as own:
                src, built = Path(own) / f"emu_{key}.cpp", Path(own) / f"emu_{key}.so"
                src.write_text(text)
                subprocess.run(["g++", "-O0", "-std=c++17", "-shared", "-fPIC", "-w", "-o", str(built), str(src)],
                               check=True, capture_output=True, text=True)
                os.replace(built, lib)
        self.cdll = ctypes.CDLL(str(lib))
        self.dynamic_shared = dynamic_shared
        self.cdll.emu_watched.restype = ctypes.c_ulonglong
        self.max_threads = {name: int(bound) if bound else MAX_BLOCK for bound, name in KERNEL.findall(source)}
        for name in arities:
            getattr(self.cdll, f"emu_{name}").argtypes = (
                [ctypes.c_uint] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_int])

    def run(self, kernel: str, grid: tuple, block: int, rows: int, ptrs: list, seed: int, together=False):
        """Launch `kernel` over `grid` (3 ints) blocks of `block` threads, its
        blocks and threads ordered by `seed`, the blocks one at a time or, for
        a persistent kernel, all `together`; EmulationError on a violation."""
        if not 1 <= block <= self.max_threads[kernel]:
            raise EmulationError(f"{kernel}: a block of {block} threads, but its __launch_bounds__ allow "
                                 f"at most {self.max_threads[kernel]}")
        if any(not 1 <= g <= limit for g, limit in zip(grid, MAX_GRID)):
            raise EmulationError(f"{kernel}: grid {grid} is past CUDA's limits {MAX_GRID}")
        args = (ctypes.c_void_p * max(len(ptrs), 1))(*ptrs)
        message = ctypes.create_string_buffer(512)
        if getattr(self.cdll, f"emu_{kernel}")(*grid, block, int(together), rows, args, seed, message,
                                               len(message)):
            raise EmulationError(f"{kernel}: {message.value.decode()}")


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
    """The runtime's device, on the emulation. Every allocation is one buffer
    (the Executor makes one per buffer for a device with `alloc_per_buffer`)
    between guard zones, all NaN bytes like fresh memory; after every launch
    the guard zones of the buffers it was given must be as they were (a
    kernel reaches memory only through them: an overrun lands in its own
    buffer's zone)."""

    alloc_per_buffer = True

    def __init__(self, generated, workdir: Path, seed: int = SEEDS[0], co_resident: int = CO_RESIDENT):
        self.library = library(generated, workdir)
        self.capacity = co_resident
        self.args = {launch.kernel: [name for name, _ in launch.args] for launch in generated.launches.launches()}
        self.persistent = {p.kernel for p in generated.launches.persistent.values()}
        self.random = random.Random(seed)
        self.guarded = {}  # buffer address -> (weak reference to its pool, where it starts and ends in it)
        self.addresses = []  # of the buffers, sorted
        self.launched = []

    def active(self):
        return nullcontext()

    def alloc(self, nbytes: int):
        pool = np.full(GUARD + max(nbytes, 1) + 2 * GUARD, 0xFF, np.uint8)  # NaN bytes: unwritten memory shows
        base = (pool.ctypes.data + GUARD + 255) // 256 * 256
        start = base - pool.ctypes.data
        if base not in self.guarded:  # else the old pool there is gone
            bisect.insort(self.addresses, base)
        self.guarded[base] = (weakref.ref(pool), start, start + nbytes)
        return base, pool

    def htod(self, ptr, array):
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    def dtoh(self, out, ptr):
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)

    def dtod(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    def memset0(self, ptr, nbytes):
        ctypes.memset(ptr, 0, nbytes)

    def reused(self, ptr, nbytes):
        """A block the runtime's pool hands out again, for `nbytes` bytes, reads
        as unwritten memory as a fresh one does, and the rest of it is guard zone."""
        ref, start, end = self.guarded[ptr]
        ctypes.memset(ptr, 0xFF, end - start)
        self.guarded[ptr] = (ref, start, start + nbytes)

    def empty(self, shape):
        return HostArray(np.empty(shape, np.float32))

    def launch(self, kernel, grid, block, args: bytes, shared: int = 0):
        rows, ptrs = unpacked(args)
        self.launched.append(kernel)
        assert shared <= self.library.dynamic_shared, f"{kernel}: {shared} bytes of dynamic shared memory"
        self.library.run(kernel, grid, block, rows, ptrs, self.random.getrandbits(64),
                         together=kernel in self.persistent)
        self.check_guards(kernel, ptrs)

    def co_resident(self, kernel, block, shared: int = 0) -> int:
        """The blocks of a persistent kernel the emulated GPU holds at once: by
        default a few, fewer than most of its kernels' grids, so its blocks take
        turns at their work."""
        return self.capacity

    def watch(self, ptr: int, nbytes: int):
        """From now on, count the bytes kernels copy (`cp.async`) from the `nbytes` at `ptr`."""
        self.library.cdll.emu_watch(ctypes.c_void_p(ptr), ctypes.c_void_p(ptr + nbytes))

    def watched(self) -> int:
        """The bytes kernels copied from the watched memory since `watch`."""
        return self.library.cdll.emu_watched()

    def check_guards(self, kernel, ptrs):
        """A launch wrote outside the allocation of a buffer it was given: which, and where."""
        for ptr in set(ptrs):
            found = self.allocation(ptr)
            if found is None:
                continue
            base, pool, start, end = found
            if (pool[:start] == 0xFF).all() and (pool[end:] == 0xFF).all():
                continue
            written = np.flatnonzero(np.concatenate([pool[:start], pool[end:]]) != 0xFF)[0]
            where = written - start if written < start else end - start + written - start
            given = [name for name, p in zip(self.args.get(kernel, []), ptrs) if base <= p < base + end - start]
            raise EmulationError(f"{kernel}: wrote byte {where} of an allocation of {end - start} bytes "
                                 f"(buffer {', '.join(given) or 'not among its arguments'}): out of bounds")

    def allocation(self, ptr):
        """(address, pool, start, end) of the live buffer that holds `ptr`, or None
        (the entries of pools gone are dropped on the way)."""
        i = bisect.bisect_right(self.addresses, ptr) - 1
        while i >= 0:
            base = self.addresses[i]
            ref, start, end = self.guarded[base]
            pool = ref()
            if pool is not None:
                return (base, pool, start, end) if ptr < base + end - start else None
            del self.guarded[base], self.addresses[i]
            i -= 1
        return None


def emulated(program, workdir: Path, precision: str = "fp32", seed: int = SEEDS[0], dtype: str = "float32",
             persistent: bool = True, co_resident: int = CO_RESIDENT):
    """The CUDA backend's module of `program` for arrays of `dtype`, products
    at `precision`, its kernels run by the emulation in the orders `seed`
    draws, its steps in persistent kernels of at most `co_resident` blocks or
    (`persistent=False`) launch by launch: (module, device)."""
    generated = generate(program, precision, dtype)
    device = EmulatedDevice(generated, workdir, seed, co_resident)
    return CudaModule(program, generated.launches, device, dtype, precision, persistent), device


def build_all(programs, workdir: Path):
    """The emulations of several (program, precision[, dtype]) built up front, two
    at a time (g++ is single-threaded; the test machines have 2 cores)."""
    generated = [generate(*case) for case in programs]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda g: library(g, workdir), generated))


def library(generated, workdir: Path) -> Library:
    """The emulation of generated kernels, with the dynamic shared memory their launches take."""
    return Library(generated.source, generated.launches.arities(), workdir,
                   max([p.shared for p in generated.launches.persistent.values()], default=0))
