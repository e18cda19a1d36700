"""The schedule: which kernels run, on which buffers, in which order.

Plain data, made by the lowering (`lowering.py`) and read by the runtime
(`runtime.py`, `executor.py`) and the artifact (`Schedule.to_json` is stored
in module.json), so neither of them needs the code generator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Buffer:
    """Device memory for one value: `slots` copies of [B, numel] (batched) or [numel].

    slots: "one"; "T" (one per step); "tape" (one per step when training,
    else 1); "state" (one per step and the final one when training, else 2).
    The caller's sequences (roles input, output, d_output, d_input) have a slot
    for every step of the sequence; the others only for the steps of one
    segment, indexed from the segment's start.
    """

    name: str
    numel: int
    batched: bool
    slots: str
    # input param context state d_output d_state (the caller's), output d_input, scratch,
    # transient, tickets (scratch counters, zero when allocated)
    role: str

    @property
    def whole_sequence(self) -> bool:
        return self.role in WHOLE_SEQUENCE


WHOLE_SEQUENCE = ("input", "output", "d_output", "d_input")


@dataclass(frozen=True)
class Extent:
    """n, times the launch's rows when `rows`, divided (rounding up) by `div`."""

    n: int
    rows: bool = False
    div: int = 1


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple  # 3 Extents
    block: int
    rows: str  # "B", or "TB": B times the number of steps of the segment being run
    args: tuple  # (buffer name, selector) pairs; selector: base, t or t+1 (modulo the slots)


@dataclass
class Schedule:
    """The launches of each part of a call, in order. The host runs `forward_seq`
    once, then per segment of steps (one segment unless the Plan checkpoints)
    `forward_pre` over the segment's rows and `forward_step` per step; the
    backward runs per segment, last first, `backward_step` per step (last
    first) then `backward_segment` over the segment's rows, and finally
    `backward_seq` once."""

    buffers: dict = field(default_factory=dict)  # name -> Buffer
    forward_seq: list = field(default_factory=list)
    forward_pre: list = field(default_factory=list)
    forward_step: list = field(default_factory=list)
    backward_step: list = field(default_factory=list)
    backward_segment: list = field(default_factory=list)
    backward_seq: list = field(default_factory=list)
    zero_before_backward: list = field(default_factory=list)  # buffers the backward accumulates into

    def to_json(self) -> dict:
        return {"buffers": [asdict(b) for b in self.buffers.values()],
                **{k: [asdict(launch) for launch in getattr(self, k)] for k in LAUNCH_LISTS},
                "zero_before_backward": list(self.zero_before_backward)}

    @staticmethod
    def from_json(data: dict) -> "Schedule":
        def launch(d):
            return Launch(d["kernel"], tuple(Extent(**e) for e in d["grid"]), d["block"], d["rows"],
                          tuple(tuple(a) for a in d["args"]))
        s = Schedule({b["name"]: Buffer(**b) for b in data["buffers"]})
        for k in LAUNCH_LISTS:
            setattr(s, k, [launch(d) for d in data[k]])
        s.zero_before_backward = list(data["zero_before_backward"])
        return s

    def launches(self):
        return [launch for k in LAUNCH_LISTS for launch in getattr(self, k)]

    def kernels(self) -> list:
        return list(dict.fromkeys(launch.kernel for launch in self.launches()))

    def arities(self) -> dict:
        """Buffers each kernel takes (after rows, t and lengths)."""
        return {launch.kernel: len(launch.args) for launch in self.launches()}


LAUNCH_LISTS = ("forward_seq", "forward_pre", "forward_step", "backward_step", "backward_segment",
                "backward_seq")


@dataclass(frozen=True)
class Generated:
    """What code generation gives: the source of kernels.cu and the schedule of its launches."""

    source: str
    schedule: Schedule
