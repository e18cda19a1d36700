"""The launches: which kernels run, on which buffers, for each kind of event
of the schedule (rnnc/passes/schedule.py).

Plain data, made by the lowering (`lowering.py`) and read by the runtime
(`runtime.py`, `executor.py`) and the artifact (`Launches.to_json` is stored
in module.json), so neither of them needs the code generator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Buffer roles. The caller's arrays, for the whole call: input, param,
# context, output, valid (the lengths mask) and the random draws' counter
# (key, example, step: rnnc/ops/random.py) in the forward; d_output,
# d_state, d_input and d_param (the gradients of params and contexts) in the
# backward. The schedule's held buffers, made and freed by its events: seq,
# rows, tape, d_seq, d_rows (rnnc/passes/costs.py). Scratch, and tickets
# (scratch counters, zero when allocated): made for one run of a launch list
# and freed after it.
WHOLE_SEQUENCE = ("input", "output", "valid", "step", "d_output", "d_input")
SCRATCH = ("scratch", "tickets")
# unbatched, buffers of these roles are written before an event's steps and only read in them
FIXED_ROLES = ("param", "seq", "rows")
FORWARD_CALLER = ("input", "param", "context", "output", "valid", "key", "example", "step")
BACKWARD_CALLER = ("d_output", "d_state", "d_input", "d_param")
# Under a 16-bit dtype (rnnc/dtypes.py) the buffers of these roles hold it; the
# others (states and their cotangents, sums, scratch) hold float32. A tape
# buffer of a state (slots "state") is a state's.
NARROW_ROLES = ("input", "param", "context", "output", "d_output", "d_input", "rows", "tape", "d_rows")


@dataclass(frozen=True)
class Elem:
    """An element type of a buffer as the kernels spell it: float, or a 16-bit
    type (templates/intrinsics.cu: 16 bits that convert to and from float)."""

    c_type: str
    bytes: int
    dtype: str  # its NumPy name (rnnc/dtypes.py)


ELEMS = {e.c_type: e for e in (Elem("float", 4, "float32"), Elem("rnnc_bf16", 2, "bfloat16"),
                               Elem("rnnc_f16", 2, "float16"))}
BY_DTYPE = {e.dtype: e for e in ELEMS.values()}


def buffer_elem(role: str, slots: str, dtype: str) -> str:
    """The element type of a buffer of `role` in a module of `dtype`."""
    return BY_DTYPE[dtype].c_type if role in NARROW_ROLES and slots != "state" else "float"


@dataclass(frozen=True)
class Buffer:
    """Device memory for one value: `slots` copies of [B, numel] (batched) or [numel].

    slots: "one"; "T" (one per step); "tape" (one per step when its event
    keeps a tape, else 1); "state" (one per step and the one after when
    keeping a tape, else 2); "pair" (2, by step: a step reads one and writes
    the other). Buffers of the caller's sequences (`WHOLE_SEQUENCE` roles)
    have a slot for every step of the sequence; the others only for the
    steps of one segment, indexed from the segment's start.
    """

    name: str
    numel: int
    batched: bool
    slots: str
    role: str  # see the roles above
    elem: str = "float"  # its elements' C type (ELEMS)

    @property
    def elem_bytes(self) -> int:
        return ELEMS[self.elem].bytes

    @property
    def whole_sequence(self) -> bool:
        return self.role in WHOLE_SEQUENCE or self.slots == "pair"


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
    parts: tuple = ()  # a launch of several kernels: the grid (3 Extents) of each; its own grid is 1D, their sum


@dataclass(frozen=True)
class Persistent:
    """Every step of a per-step launch list in one launch (templates/persistent.cu.j2):
    `kernel` runs the list's launches in turn for each step, a grid barrier
    after each, on blocks of `block` threads that stay resident for all the steps.
    It takes (steps, the arguments of every launch of every step, the barrier's
    counters) and `shared` bytes of dynamic shared memory; the runtime sizes
    its grid to what the GPU holds at once. `kept`: the launches whose
    products keep their B operand (a param) in shared memory across steps;
    `unkept`: those whose products could, but that would take more shared
    memory than a block may have (kernels.KEPT_SHARED)."""

    kernel: str
    block: int
    shared: int
    kept: tuple = ()
    unkept: tuple = ()


@dataclass
class Launches:
    """The launch lists, one per part of an event: `seq` for the seq event;
    `rows` (the hoisted region over the segment's rows) then `step` per step
    for a forward or a replay; `backward_step` per step, last first, for a
    backward; `param_grads` over the segment's rows; `backward_seq`.
    `persistent`: the per-step lists (`PER_STEP`) that also run as one
    persistent launch; `why_per_step`: for the others, why not."""

    buffers: dict = field(default_factory=dict)  # name -> Buffer
    seq: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    step: list = field(default_factory=list)
    backward_step: list = field(default_factory=list)
    param_grads: list = field(default_factory=list)
    backward_seq: list = field(default_factory=list)
    persistent: dict = field(default_factory=dict)  # list name -> Persistent
    why_per_step: dict = field(default_factory=dict)  # list name -> the reason it has no Persistent

    def to_json(self) -> dict:
        return {"buffers": [asdict(b) for b in self.buffers.values()],
                **{k: [asdict(launch) for launch in getattr(self, k)] for k in LAUNCH_LISTS},
                "persistent": {k: asdict(p) for k, p in self.persistent.items()},
                "why_per_step": dict(self.why_per_step)}

    @staticmethod
    def from_json(data: dict) -> "Launches":
        def grid(extents):
            return tuple(Extent(**e) for e in extents)

        def launch(d):
            return Launch(d["kernel"], grid(d["grid"]), d["block"], d["rows"], tuple(tuple(a) for a in d["args"]),
                          tuple(grid(part) for part in d["parts"]))
        s = Launches({b["name"]: Buffer(**b) for b in data["buffers"]})
        for k in LAUNCH_LISTS:
            setattr(s, k, [launch(d) for d in data[k]])
        s.persistent = {k: Persistent(**{**p, "kept": tuple(p["kept"]), "unkept": tuple(p["unkept"])})
                        for k, p in data["persistent"].items()}
        s.why_per_step = dict(data["why_per_step"])
        return s

    def launches(self):
        return [launch for k in LAUNCH_LISTS for launch in getattr(self, k)]

    def kernels(self) -> list:
        return list(dict.fromkeys([launch.kernel for launch in self.launches()]
                                  + [p.kernel for p in self.persistent.values()]))

    def arities(self) -> dict:
        """Pointers each kernel takes after its int (rows, or a persistent kernel's steps)."""
        return {**{launch.kernel: len(launch.args) for launch in self.launches()},
                **{p.kernel: PERSISTENT_ARITY for p in self.persistent.values()}}

    def form(self, kind: str) -> str:
        """How the steps of launch list `kind` run, and why, in a line."""
        n = len(getattr(self, kind))
        if kind in self.persistent:
            p = self.persistent[kind]
            kept = [f"params kept in shared memory across steps by {', '.join(p.kept)}"] * bool(p.kept)
            kept += [f"params read from L2 every step by {', '.join(p.unkept)} (no room left to keep them)"] * bool(
                p.unkept)
            return "; ".join([f"persistent: one launch runs all the event's steps, {n} kernel{'s' * (n != 1)} a step, "
                              f"a grid barrier after each", f"{p.shared} bytes of shared memory a block", *kept])
        return f"per step: {n} launch{'es' * (n != 1)} a step ({self.why_per_step[kind]})"

    def forms(self) -> str:
        """How the CUDA runtime runs the steps of each event of the schedule."""
        return "\n".join(["cuda: the steps of each event"] + [f"  {events}: {self.form(kind)}" for events, kind in
                                                              (("forward, replay", "step"), ("backward", "backward_step"))]
                         + ["  (else launch by launch: on a device that cannot size a persistent grid or hold a block of it, or "
                            "loaded with persistent=False)"])


LAUNCH_LISTS = ("seq", "rows", "step", "backward_step", "param_grads", "backward_seq")
PER_STEP = ("step", "backward_step")  # the lists launched once per step
PERSISTENT_ARITY = 2  # a persistent kernel's pointers: the launches' arguments, the barrier's counters


@dataclass(frozen=True)
class Generated:
    """What code generation gives: the source of kernels.cu and its launches,
    for arrays of `dtype`."""

    source: str
    launches: Launches
    dtype: str = "float32"
