"""Device memory and launches: buffers in pools, and a list of launches on a device.

`Executor` runs `Launches` on a `Device`: `PycudaDevice` (`device.py`) or
anything with the same few methods (the tests run the kernels through a CPU
emulation of CUDA). A buffer has slots (one per step of a segment, say); a
launch's arguments pick a slot by the step being run. Device memory comes
from a `CachingPool`, which keeps what a call frees for the next call, and
each kernel's arguments are packed once for all the steps of an event
(`Executor.tables`), so the per-step loop only hands packed bytes to the
driver; or, for a list with a persistent kernel, the packed arguments of all
the steps go to the device in one table and one launch runs them all
(`Executor.run_persistent`).
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .cexpr import MAX_INDEX
from .launches import LAUNCH_LISTS, SCRATCH, Launches
from .occupancy import persistent_grid

ALIGN = 256  # bytes between buffers of a pool (the alignment cudaMalloc gives)
BARRIER_BYTES = 8  # a grid barrier's two counters (templates/intrinsics.cu: rnnc_grid_barrier)


def aligned(nbytes: int) -> int:
    """The bytes `nbytes` takes in a pool (at least one, so every buffer has its own address)."""
    return -(-max(nbytes, 1) // ALIGN) * ALIGN


@dataclass
class Slotted:
    """A buffer in a pool: `slots` slots; a segment's buffer counts them from the segment's start."""

    ptr: int
    slots: int
    slot_bytes: int
    per_segment: bool

    def at(self, step, start: int = 0):
        """The address of step `step`'s slot (of each step, for an array of them)."""
        index = step - start if self.per_segment else step
        return self.ptr + (index % self.slots if self.slots else 0) * self.slot_bytes  # T = 0: no slots


@dataclass(frozen=True)
class Steps:
    """Steps start..stop of a sequence of T steps, batch B; `tape`: the
    segment's event keeps each step's stored values (see `slot_count`)."""

    T: int
    B: int
    start: int = 0
    stop: int = 0
    tape: bool = False

    @property
    def rows(self) -> int:
        return (self.stop - self.start) * self.B


def slot_count(buffer, steps: Steps) -> int:
    if buffer.slots == "T" and buffer.whole_sequence:
        return steps.T
    n = steps.stop - steps.start
    return {"one": 1, "pair": 2, "T": n, "tape": n if steps.tape else 1, "state": n + 1 if steps.tape else 2}[buffer.slots]


def held_slots(buffer, steps: Steps) -> int:
    """The slots of `buffer` that hold values the schedule counts: all but the
    state after a segment's last step, which the next segment starts from or
    the caller gets back."""
    return slot_count(buffer, steps) - (buffer.slots == "state")


class CachingPool:
    """Device memory kept for reuse, as PyTorch's caching allocator does: a
    block given back (`give`) waits for the next request (`take`) it can serve,
    one of its size or up to half as small, so a call that follows one like it
    allocates nothing and calls of other lengths mostly reuse what is there.
    The runtime launches everything on one stream, in order, so a block given
    back while kernels that use it are still queued is safe to hand out
    again: whatever is queued next runs after them. A failed allocation
    empties the cache and tries once more. `device.reused(ptr, nbytes)`, where
    the device has it, hears of every block handed out again and the bytes
    asked for (the tests' emulator makes them look unwritten and guards the
    rest of the block)."""

    def __init__(self, device):
        self.device = device
        self.free = defaultdict(list)  # bytes -> [(ptr, what keeps the memory alive)]
        self.lock = threading.Lock()  # blocks come back from the garbage collector, on any thread

    def take(self, nbytes: int) -> tuple:
        """A block of at least `nbytes` bytes: (ptr, what keeps it alive, its size), for `give`."""
        with self.lock:
            fits = [size for size, cached in self.free.items() if cached and nbytes <= size <= 2 * nbytes]
            size = min(fits, default=None)
            block = self.free[size].pop() if size is not None else None
        if block is not None:
            if hasattr(self.device, "reused"):
                self.device.reused(block[0], nbytes)
            return block + (size,)
        try:
            ptr, memory = self.device.alloc(nbytes)
        except Exception:  # out of memory, say: what the cache holds may be enough
            if not self.empty():
                raise
            ptr, memory = self.device.alloc(nbytes)
        return ptr, memory, nbytes

    def give(self, blocks):
        """Blocks made by `take`, free for reuse."""
        with self.lock:
            for ptr, memory, nbytes in blocks:
                self.free[nbytes].append((ptr, memory))

    def empty(self) -> bool:
        """Hand every cached block back to the device; whether there were any."""
        with self.lock:
            had = any(self.free.values())
            self.free.clear()
        return had


class Executor:
    """Allocates buffers and runs launch lists on a device. `scratch[k]` are
    the scratch buffers launch list k writes or reads, made for one run of it."""

    def __init__(self, launches: Launches, device):
        self.launches, self.device = launches, device
        self.pool = CachingPool(device)
        self.scratch = {k: [launches.buffers[name] for name in dict.fromkeys(
                            name for launch in getattr(launches, k) for name, _ in launch.args)
                            if launches.buffers[name].role in SCRATCH]
                        for k in LAUNCH_LISTS}

    def role(self, role: str) -> list:
        return [b for b in self.launches.buffers.values() if b.role == role]

    def allocate(self, buffers, steps: Steps):
        """One block of the pool for `buffers`: (name -> Slotted, the blocks to
        give back with `release`). A device with `alloc_per_buffer` (the tests'
        emulator, which guards every allocation) gets one block per buffer
        instead. Tickets start at zero (the kernels leave them at zero)."""
        if not buffers:
            return {}, []
        layout, offset = {}, 0
        for b in buffers:
            slot_bytes = (steps.B if b.batched else 1) * b.numel * b.elem_bytes
            slots = slot_count(b, steps)
            layout[b.name] = (offset, slots, slot_bytes, not b.whole_sequence)
            offset += aligned(slots * slot_bytes)
        if getattr(self.device, "alloc_per_buffer", False):
            held = {n: self.pool.take(aligned(slots * slot_bytes)) for n, (_, slots, slot_bytes, _) in layout.items()}
            memory = {n: Slotted(held[n][0], *rest) for n, (_, *rest) in layout.items()}
            blocks = list(held.values())
        else:
            blocks = [self.pool.take(offset)]
            memory = {n: Slotted(blocks[0][0] + o, *rest) for n, (o, *rest) in layout.items()}
        for b in buffers:
            if b.role == "tickets":
                self.device.memset0(memory[b.name].ptr, memory[b.name].slots * memory[b.name].slot_bytes)
        return memory, blocks

    def release(self, blocks):
        """Blocks `allocate` gave, back to the pool."""
        self.pool.give(blocks)

    def check_sizes(self, T: int, B: int, longest: int):
        """Refuse a call whose kernels would index more than MAX_INDEX elements
        of a buffer: a launch over all rows of a segment of `longest` steps
        touches longest * B rows of each batched buffer it is given."""
        for launch in self.launches.launches():
            rows = B if launch.rows == "B" else longest * B
            for name, _ in launch.args:
                b = self.launches.buffers[name]
                if b.batched and rows * b.numel > MAX_INDEX:
                    raise ValueError(
                        f"cuda: T={T}, B={B}: a kernel would index {rows:,} rows of {b.numel:,} elements "
                        f"of {name!r}, {rows * b.numel:,} in all, more than the {MAX_INDEX:,} (2^30) its "
                        "32-bit int indices reach; use a smaller batch, a shorter sequence or a "
                        "memory_budget (its segments run fewer steps at once)")

    def tables(self, kind: str, memory: dict, steps: Steps, times) -> list:
        """The arguments of each launch of list `kind` for each step in `times`
        (the segment's start for its rows), packed for all steps at once: per
        launch, (the launch, its rows, a [steps, 1 + buffers] uint64 table of
        rows and pointers, each row a packed parameter struct)."""
        times = np.asarray(list(times), np.int64)
        out = []
        for launch in getattr(self.launches, kind):
            rows = steps.B if launch.rows == "B" else steps.rows
            index = {"base": np.full_like(times, steps.start), "t": times, "t+1": times + 1}
            table = np.empty((len(times), 1 + len(launch.args)), np.uint64)
            table[:, 0] = rows  # the int: its 4 bytes, then the 4 bytes of padding before the pointers
            for j, (name, sel) in enumerate(launch.args, 1):
                table[:, j] = memory[name].at(index[sel], steps.start)
            out.append((launch, rows, table))
        return out

    def prepare(self, kind: str, memory: dict, steps: Steps, times) -> list:
        """The launches of list `kind` for each step in `times`, as `tables`
        packs them: per step, a list of (kernel, grid, block, packed arguments)."""
        times = list(times)
        per_launch = [[(launch.kernel, grid(launch, rows), launch.block, packed.tobytes()) for packed in table]
                      for launch, rows, table in self.tables(kind, memory, steps, times)]
        return [list(step) for step in zip(*per_launch)] if per_launch else [[] for _ in times]

    def run_persistent(self, kind: str, memory: dict, steps: Steps, times) -> bool:
        """Every step of list `kind` in one launch of its persistent kernel: the
        launches' arguments for all the steps in a table on the device, its
        grid as many blocks as the GPU holds at once (`occupancy`), at most
        as many as the list's largest launch has. False, with a warning and
        nothing launched, where the GPU cannot hold one block of it (more
        shared memory than a block may have there): the caller then runs the
        steps launch by launch."""
        persistent = self.launches.persistent[kind]
        capacity = self.device.co_resident(persistent.kernel, persistent.block, persistent.shared)
        if capacity < 1:
            warnings.warn(f"rnnc: this GPU cannot hold a block of {persistent.kernel} ({persistent.block} threads, "
                          f"{persistent.shared} bytes of shared memory); its steps run launch by launch",
                          RuntimeWarning, stacklevel=2)
            return False
        tables = self.tables(kind, memory, steps, times)
        args = np.ascontiguousarray(np.concatenate([table for _, _, table in tables], axis=1))
        blocks = persistent_grid(capacity, max(work_blocks(launch, rows) for launch, rows, _ in tables))
        held = self.pool.take(aligned(args.nbytes) + BARRIER_BYTES)
        barrier = held[0] + aligned(args.nbytes)
        self.device.htod(held[0], args)
        self.device.memset0(barrier, BARRIER_BYTES)
        self.device.launch(persistent.kernel, (blocks, 1, 1), persistent.block, packed(len(args), [held[0], barrier]),
                           persistent.shared)
        self.pool.give([held])  # the launches run in order: the next user of the block comes after this one
        return True

    def run(self, prepared: list):
        """One step's launches, as `prepare` gave them."""
        for kernel, blocks, threads, args in prepared:
            self.device.launch(kernel, blocks, threads, args)


def packed(rows: int, ptrs) -> bytes:
    """A kernel's arguments (rows, buffers...) as its parameter struct: the int,
    4 bytes of padding, then each pointer (little-endian, as NVIDIA GPUs and
    their hosts are)."""
    return np.array([rows, *ptrs], np.uint64).tobytes()


def unpacked(args: bytes) -> tuple:
    """(rows, [pointers]) of a packed parameter struct."""
    values = np.frombuffer(args, np.uint64)
    return int(values[0] & 0xFFFFFFFF), [int(p) for p in values[1:]]


def grid(launch, rows: int) -> tuple:
    """The blocks of `launch` for `rows` rows. Grid-stride loops (and the
    product kernel's loop over g) make any grid size correct, so huge launches
    are capped at the hardware's limits. A launch of several kernels has a
    block for each block of each of their grids (uncapped, as the kernel
    counts them: `kernels.extent_c`)."""
    if launch.parts:
        return (work_blocks(launch, rows), 1, 1)
    return tuple(min(blocks(e, rows), limit) for e, limit in zip(launch.grid, GRID_LIMITS))


def work_blocks(launch, rows: int) -> int:
    """The blocks of work of `launch` for `rows` rows, uncapped (its kernel's
    grid in a persistent kernel, which any number of blocks can run)."""
    return sum(math.prod(blocks(e, rows) for e in part) for part in (launch.parts or [launch.grid]))


def blocks(e, rows: int) -> int:
    """The blocks of Extent `e` for `rows` rows, at least 1."""
    return max(1, -(-(e.n * (rows if e.rows else 1)) // e.div))


GRID_LIMITS = (2**31 - 1, 65535, 65535)
