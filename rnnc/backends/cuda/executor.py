"""Device memory and launches: buffers in pools, and a list of launches on a device.

`Executor` runs `Launches` on a `Device`: `PycudaDevice` (`device.py`) or
anything with the same few methods (the tests run the kernels through a CPU
emulation of CUDA). A buffer has slots (one per step of a segment, say); a
launch's arguments pick a slot by the step being run.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cexpr import MAX_INDEX
from .launches import SCRATCH, Launches

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


class Executor:
    """Allocates buffers and runs launch lists on a device. `scratch[k]` are
    the scratch buffers launch list k writes or reads, made for one run of it."""

    def __init__(self, launches: Launches, device):
        self.launches, self.device = launches, device
        self.scratch = {k: [launches.buffers[name] for name in dict.fromkeys(
                            name for launch in getattr(launches, k) for name, _ in launch.args)
                            if launches.buffers[name].role in SCRATCH]
                        for k in ("seq", "rows", "step", "backward_step", "param_grads", "backward_seq")}

    def role(self, role: str) -> list:
        return [b for b in self.launches.buffers.values() if b.role == role]

    def allocate(self, buffers, steps: Steps):
        """One pool for `buffers`: (name -> Slotted, the pool to keep alive; None
        for no buffers). A device with `alloc_per_buffer` (the tests' emulator,
        which guards every allocation) gets one allocation per buffer instead.
        Tickets start at zero (the kernels leave them at zero)."""
        if not buffers:
            return {}, None
        layout, offset = {}, 0
        for b in buffers:
            slot_bytes = (steps.B if b.batched else 1) * b.numel * b.elem_bytes
            slots = slot_count(b, steps)
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

    def run(self, kind: str, memory: dict, steps: Steps, t: int):
        """The launches of list `kind` for step t (the segment's start for its rows)."""
        for launch in getattr(self.launches, kind):
            rows = steps.B if launch.rows == "B" else steps.rows
            index = {"base": steps.start, "t": t, "t+1": t + 1}
            ptrs = [memory[name].at(index[sel], steps.start) for name, sel in launch.args]
            self.device.launch(launch.kernel, grid(launch, rows), launch.block, rows, ptrs)


def grid(launch, rows: int) -> tuple:
    """The blocks of `launch` for `rows` rows. Grid-stride loops (and the
    product kernel's loop over g) make any grid size correct, so huge launches
    are capped at the hardware's limits."""
    return tuple(min(-(-(e.n * (rows if e.rows else 1)) // e.div), limit) or 1
                 for e, limit in zip(launch.grid, GRID_LIMITS))


GRID_LIMITS = (2**31 - 1, 65535, 65535)
