"""The schedule: one call of T steps under a Plan as one list of events.

Both backends run a call by interpreting this list (the NumPy backend in
rnnc/backends/numpy.py, the CUDA runtime in rnnc/backends/cuda/runtime.py),
and the bytes the plan predicts are added up from it, so what is computed,
what is held and what is counted cannot drift apart. `rnnc emit --stage
schedule` prints it.

A training call, with the Plan's segments 0..k-1 of steps (one segment
without a memory budget):

    seq            run the once-per-sequence region             allocates seq
    checkpoint j   keep the states before segment j (j < k-1)   allocates checkpoint j
    forward j      the hoisted rows of its steps, then the steps  allocates rows j (j < k-1:
                   freed after it; j = k-1: kept with the tape of its steps' stored values)
  then for each segment, last first:
    replay j       rerun segment j (j < k-1) from checkpoint j  frees checkpoint j, allocates rows j, tape j
    backward j     the backward steps, last step first          allocates d_rows j (and d_seq, the first time)
    param_grads j  the parameter-gradient products over its rows  frees tape j, rows j, d_rows j
  and last:
    backward_seq   the backward of the once-per-sequence region  frees d_seq, seq

Inference runs the same forward events without the checkpoints and the tape,
which only the backward reads, and frees `seq` after the last forward.

Each buffer is named by its role (rnnc/passes/costs.py says what each role
holds) and its segment. An event allocates its buffers when it starts and frees
its `frees` when it ends, except that a replay first frees the checkpoint it
restores (the checkpoint's states become those of its first step). The
bytes held while an event runs are those held before it plus what it allocates;
`peak_bytes` is the most of these, `stored_bytes` what the forward leaves
for the backward. The caller's arrays, the returned arrays (outputs, final
states, gradients) and the scratch of one region run are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dtypes import storage
from .costs import PER_STEP

FORWARD = ("seq", "checkpoint", "forward")
BACKWARD = ("replay", "backward", "param_grads", "backward_seq")


@dataclass(frozen=True)
class Buffer:
    """The values of one role, for one segment's steps (per-step roles) or the whole call."""

    role: str
    segment: int | None  # None: for the whole call (seq, d_seq)
    bytes: int

    @property
    def key(self) -> tuple:
        return self.role, self.segment

    def __str__(self) -> str:
        return self.role if self.segment is None else f"{self.role} {self.segment}"


@dataclass(frozen=True)
class Event:
    kind: str  # one of FORWARD + BACKWARD
    segment: int | None  # None for the once-per-sequence events
    start: int = 0  # the segment's steps: start..stop-1
    stop: int = 0
    allocs: tuple = ()  # Buffers allocated when it starts
    frees: tuple = ()  # Buffers released when it ends
    restores: Buffer | None = None  # a replay's checkpoint, released before it starts

    def allocated(self, role: str) -> Buffer | None:
        """The buffer of `role` this event allocates, if any."""
        return next((b for b in self.allocs if b.role == role), None)

    @property
    def steps(self) -> range:
        return range(self.start, self.stop)

    def __str__(self) -> str:
        return self.kind if self.segment is None else f"{self.kind} {self.segment}"


@dataclass(frozen=True)
class Schedule:
    T: int
    B: int
    dtype: str
    train: bool
    plan_described: str
    events: tuple
    held: dict  # role -> the value names its buffers hold

    def held_bytes(self) -> list:
        """Bytes held while each event runs (after its allocations), event by event."""
        held, out = 0, []
        for e in self.events:
            held += sum(b.bytes for b in e.allocs) - (e.restores.bytes if e.restores else 0)
            out.append(held)
            held -= sum(b.bytes for b in e.frees)
        return out

    @property
    def peak_bytes(self) -> int:
        return max(self.held_bytes(), default=0)

    @property
    def stored_bytes(self) -> int:
        """What the forward events leave held for the backward (0 for inference)."""
        held = 0
        for e in self.events:
            if e.kind in FORWARD:
                held += sum(b.bytes for b in e.allocs) - sum(b.bytes for b in e.frees)
        return held

    def forward(self) -> tuple:
        return tuple(e for e in self.events if e.kind in FORWARD)

    def backward(self) -> tuple:
        return tuple(e for e in self.events if e.kind in BACKWARD)

    def format(self) -> str:
        mode = "training" if self.train else "inference"
        lines = [f"schedule for T={self.T}, B={self.B}, {self.dtype}, {mode} ({self.plan_described})"]
        rows = [("event", "steps", "allocates", "frees", "held")]
        for e, held in zip(self.events, self.held_bytes()):
            allocs = [f"{b} ({format_bytes(b.bytes)})" for b in e.allocs]
            frees = ([f"{e.restores} (first)"] if e.restores else []) + [str(b) for b in e.frees]
            steps = f"{e.start}..{e.stop - 1}" if e.stop > e.start else ""
            rows.append((str(e), steps, ", ".join(allocs), ", ".join(frees), format_bytes(held)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"stored {format_bytes(self.stored_bytes)}, peak {format_bytes(self.peak_bytes)}")
        lines.append("buffers hold" + "".join(
            f"\n  {role}: {', '.join(names) or '(nothing)'}{' (each step)' if role in PER_STEP else ''}"
            for role, names in self.held.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def make_schedule(plan, T: int, B: int, dtype="float32", train: bool = True) -> Schedule:
    """The events of one call of T steps and batch B under `plan` (see the module doc)."""
    held = plan.costs.held_bytes(dtype)

    def buffer(role, segment=None, steps=1):
        return Buffer(role, segment, steps * held[role].at(B))

    lengths = plan.segments_for(T)
    stops = np.cumsum(lengths, dtype=int).tolist()
    bounds = list(zip([0] + stops[:-1], stops))
    last = len(bounds) - 1
    seq = buffer("seq")
    events = [Event("seq", None, allocs=(seq,), frees=() if train or bounds else (seq,))]
    for j, (start, stop) in enumerate(bounds):
        rows = buffer("rows", j, stop - start)
        if not train:
            events.append(Event("forward", j, start, stop, (rows,), (rows,) + ((seq,) if j == last else ())))
        elif j < last:
            events.append(Event("checkpoint", j, allocs=(buffer("checkpoint", j),)))
            events.append(Event("forward", j, start, stop, (rows,), (rows,)))
        else:
            events.append(Event("forward", j, start, stop, (rows, buffer("tape", j, stop - start))))
    if train:
        d_seq = buffer("d_seq")
        for j in reversed(range(len(bounds))):
            start, stop = bounds[j]
            rows, tape = buffer("rows", j, stop - start), buffer("tape", j, stop - start)
            d_rows = buffer("d_rows", j, stop - start)
            if j < last:
                events.append(Event("replay", j, start, stop, (rows, tape), restores=buffer("checkpoint", j)))
            events.append(Event("backward", j, start, stop, (d_rows,) + ((d_seq,) if j == last else ())))
            events.append(Event("param_grads", j, start, stop, frees=(tape, rows, d_rows)))
        events.append(Event("backward_seq", None, allocs=() if bounds else (d_seq,), frees=(d_seq, seq)))
    return Schedule(T, B, storage(dtype).name, train, plan.describe(), tuple(events), plan.held)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
