"""The schedule's interpreter: buffers of one call in pools, and launches on a device.

`Executor` runs a `Schedule`'s launches on a `Device`: `PycudaDevice`
(`device.py`) or anything with the same few methods (the tests run the kernels
through a CPU emulation of CUDA). A buffer has slots (one per step of a
segment, say); a launch's arguments pick a slot by the step being run.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cexpr import MAX_INDEX
from .schedule import Schedule

ALIGN = 256  # bytes between buffers of a pool (the alignment cudaMalloc gives)


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

    def at(self, step: int, start: int = 0) -> int:
        index = step - start if self.per_segment else step
        return self.ptr + (index % self.slots if self.slots else 0) * self.slot_bytes  # T = 0: no slots


@dataclass(frozen=True)
class Steps:
    """Steps start..stop of a sequence of T steps, batch B: one segment of a call."""

    T: int
    B: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return (self.stop - self.start) * self.B


def segments(plan, T: int, train: bool) -> list:
    """(start, stop) of each segment the Plan runs; inference keeps nothing, so one segment."""
    lengths = plan.segments_for(T) if train else ((T,) if T else ())
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds or [(0, 0)]


def slot_count(buffer, T: int, longest: int, train: bool) -> int:
    if buffer.whole_sequence:
        return T
    steps = longest
    return {"one": 1, "T": steps, "tape": steps if train else 1, "state": steps + 1 if train else 2}[buffer.slots]


class Executor:
    """Runs a Schedule's launches on a device. Its buffers fall in three
    groups, each allocated as one pool when needed: `forward_buffers` (the
    caller's and those the forward launches read or write), `backward_buffers`
    (the rest, for a backward only) and `transient` (the hoisted regions'
    scratch, held only while they run)."""

    def __init__(self, schedule: Schedule, device):
        self.schedule, self.device = schedule, device
        forward = {name for k in ("forward_seq", "forward_pre", "forward_step")
                   for launch in getattr(schedule, k) for name, _ in launch.args}
        buffers = schedule.buffers.values()
        self.transient = [b for b in buffers if b.role == "transient"]  # only while forward_pre runs
        self.forward_buffers = [b for b in buffers if b.role != "transient" and (
            b.name in forward or b.role in ("input", "param", "context", "state", "output"))]
        self.backward_buffers = [b for b in buffers if b.role != "transient" and b not in self.forward_buffers]

    def allocate(self, buffers, T: int, B: int, longest: int, train: bool):
        """One pool for `buffers`: (name -> Slotted, the pool to keep alive).
        A device with `alloc_per_buffer` (the tests' emulator, which guards
        every allocation) gets one allocation per buffer instead.
        Tickets start at zero (the kernels leave them at zero)."""
        layout, offset = {}, 0
        for b in buffers:
            slot_bytes = (B if b.batched else 1) * b.numel * 4
            slots = slot_count(b, T, longest, train)
            layout[b.name] = (offset, slots, slot_bytes, not b.whole_sequence)
            offset += aligned(slots * slot_bytes)
        if getattr(self.device, "alloc_per_buffer", False):
            held = {n: self.device.alloc(slots * slot_bytes) for n, (_, slots, slot_bytes, _) in layout.items()}
            memory = {n: Slotted(held[n][0], *rest) for n, (_, *rest) in layout.items()}
            pool = [p for _, p in held.values()]
        else:
            base, pool = self.device.alloc(offset)
            memory = {n: Slotted(base + o, *rest) for n, (o, *rest) in layout.items()}
        for b in buffers:
            if b.role == "tickets":
                self.device.memset0(memory[b.name].ptr, memory[b.name].slots * memory[b.name].slot_bytes)
        return memory, pool

    def check_sizes(self, T: int, B: int, longest: int):
        """Refuse a call whose kernels would index more than MAX_INDEX elements
        of a buffer: a launch over all rows of a segment of `longest` steps
        touches longest * B rows of each batched buffer it is given."""
        for launch in self.schedule.launches():
            rows = B if launch.rows == "B" else longest * B
            for name, _ in launch.args:
                b = self.schedule.buffers[name]
                if b.batched and rows * b.numel > MAX_INDEX:
                    raise ValueError(
                        f"cuda: T={T}, B={B}: a kernel would index {rows:,} rows of {b.numel:,} elements "
                        f"of {name!r}, {rows * b.numel:,} in all, more than the {MAX_INDEX:,} (2^30) its "
                        "32-bit int indices reach; use a smaller batch, a shorter sequence or a "
                        "memory_budget (its segments run fewer steps at once)")

    def run(self, launches, memory: dict, steps: Steps, t: int, lengths: int):
        for launch in launches:
            rows = steps.B if launch.rows == "B" else steps.rows
            index = {"base": steps.start, "t": t, "t+1": t + 1}
            ptrs = [memory[name].at(index[sel], steps.start) for name, sel in launch.args]
            self.device.launch(launch.kernel, grid(launch, rows), launch.block, rows, t, lengths, ptrs)


def grid(launch, rows: int) -> tuple:
    """The blocks of `launch` for `rows` rows. Grid-stride loops (and the
    product kernel's loop over g) make any grid size correct, so huge launches
    are capped at the hardware's limits."""
    return tuple(min(-(-(e.n * (rows if e.rows else 1)) // e.div), limit) or 1
                 for e, limit in zip(launch.grid, GRID_LIMITS))


GRID_LIMITS = (2**31 - 1, 65535, 65535)
