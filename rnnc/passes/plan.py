"""The recompute planner: what the backward keeps, what it recomputes, and
which steps' states it checkpoints.

Two choices make a Plan:

- Per step (rnnc/passes/policy.py): which step values the backward stores for
  every step, and which forward nodes the backward step reruns for the rest.
- Across time. Steps are run in segments. Without a memory budget there is
  one segment (T steps, all residuals kept). Under a budget the forward keeps
  only the states at the start of each segment and the last segment's
  residuals; the backward replays every other segment from its checkpoint,
  then backpropagates through it (Chen et al. 2016). Hoisted products and the
  cotangents kept for the batched parameter-gradient products are made per
  segment too, so every sequence-long buffer shrinks. Segment lengths are not
  uniform: a segment replayed earlier in the backward has more checkpoints
  beside it, so `segment_lengths` gives each the most steps that fit, which
  makes the last segment (never replayed) as long as it can be. Checkpoints
  are not nested (one level; revolve's multi-level schedules would reach
  smaller budgets at more recompute).

`Plan.schedule` lays the choice out as one list of events (rnnc/passes/schedule.py),
which both backends run and from which the bytes are counted: `stored_bytes`
is what the forward keeps for the backward, `peak_bytes` the most held at any
moment of forward plus backward, leaving out the caller's arrays, the
returned arrays (outputs, final states, gradients) and one region run's scratch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from ..ir import Graph
from ..ops import OPS
from ..shapes import shape_str
from ..dtypes import storage, wide_bytes
from .costs import Costs, backward_fixed, backward_per_step, elements, measure, role_values
from .hoist import Hoisted
from .policy import per_step_plan, rerun_for
from .schedule import Schedule, format_bytes, make_schedule

PER_STEP_CHOICES = ("none", "auto", "all")  # what a budget search tries when recompute="auto"


@dataclass(frozen=True)
class Plan:
    """What the backward stores per step, what it recomputes, how steps are segmented.

    `segments` is None for a plan that keeps every step (one segment of any
    length T); a budgeted plan holds the segment lengths for `seq_len` steps
    (a shorter sequence drops steps from the first segments)."""

    policy: str  # the per-step choice: none, all, auto, or the manual list as "[a, b]"
    residuals: tuple  # step values the backward step reads
    stored: tuple  # step values kept for every step (states included)
    recompute: tuple  # step nodes the backward step reruns, in forward order
    held: dict  # role -> the value names its buffers hold (rnnc/passes/costs.py)
    costs: Costs
    segments: tuple | None = None
    seq_len: int | None = None
    batch: int | None = None
    budget: int | None = None  # bytes, for `dtype`
    dtype: str = "float32"
    draws: tuple = ()  # (value, op, what it is drawn once per) of each random call: masks drawn again, never kept

    # --- the schedule across time --------------------------------------------------------
    def segments_for(self, T: int) -> tuple:
        """Segment lengths for a sequence of T steps, first to last."""
        if self.segments is None:
            return (T,) if T > 0 else ()
        if T > self.seq_len:
            raise ValueError(f"this plan was made for memory_budget={self.budget} with seq_len="
                             f"{self.seq_len}; a sequence of {T} steps needs a plan compiled "
                             f"with seq_len={T} or more")
        lengths, drop = list(self.segments), self.seq_len - T
        while drop:  # the first segments give up their steps
            cut = min(drop, lengths[0])
            lengths[0] -= cut
            drop -= cut
            if not lengths[0]:
                lengths.pop(0)
        return tuple(lengths)

    def schedule(self, T: int, B: int, dtype="float32", train: bool = True) -> Schedule:
        """The events of one call of T steps and batch B (rnnc/passes/schedule.py)."""
        return make_schedule(self, T, B, dtype, train)

    def stored_bytes(self, T: int, B: int, dtype="float32") -> int:
        """Bytes the forward keeps for the backward (train=True)."""
        return self.schedule(T, B, dtype).stored_bytes

    def peak_bytes(self, T: int, B: int, dtype="float32") -> int:
        """The most bytes held at any moment of forward plus backward."""
        return self.schedule(T, B, dtype).peak_bytes

    def forward_flops(self, T: int, B: int) -> int:
        c = self.costs
        return c.seq_flops.at(B) + T * (c.pre_flops + c.step_flops).at(B)

    def recompute_flops(self, T: int, B: int) -> int:
        """Flops the backward spends on forward work: each step's rerun nodes, and
        the replay (hoisted rows and steps) of every segment but the last."""
        c = self.costs
        lengths = self.segments_for(T)
        replayed = T - (lengths[-1] if lengths else 0)
        return T * c.recompute_flops.at(B) + replayed * (c.pre_flops + c.step_flops).at(B)

    # --- printing ----------------------------------------------------------------------------
    def describe(self) -> str:
        what = f"recompute={self.policy}"
        if self.budget is not None:
            what += (f", memory_budget={format_bytes(self.budget)} for T={self.seq_len}, "
                     f"B={self.batch}, {self.dtype}: {len(self.segments)} segment{'s' * (len(self.segments) > 1)}")
        return what

    def format(self, T: int | None = None, B: int | None = None, dtype: str | None = None) -> str:
        T, B = T or self.seq_len, B or self.batch
        dtype = dtype or self.dtype
        lines = [f"plan ({self.describe()})",
                 f"  residuals: {', '.join(self.residuals) or '(none)'}",
                 f"  stored per step: {', '.join(self.stored) or '(none)'}",
                 f"  recomputed: {', '.join(n.out for n in self.recompute) or '(none)'}"]
        if self.segments is not None:
            lines.append(f"  segments: {format_segments(self.segments)}")
        if self.draws:
            lines.append(f"  {format_draws(self.draws)}")
        if T and B:
            lines.append(f"  T={T} B={B} {dtype}: stored {format_bytes(self.stored_bytes(T, B, dtype))}, "
                         f"peak {format_bytes(self.peak_bytes(T, B, dtype))}, recompute "
                         f"{self.recompute_flops(T, B):,} of {self.forward_flops(T, B):,} forward flops")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def as_dict(self) -> dict:
        """Plain data for an artifact's module.json."""
        return {"policy": self.policy, "residuals": list(self.residuals),
                "stored": list(self.stored), "recompute": [n.out for n in self.recompute],
                "segments": None if self.segments is None else list(self.segments),
                "seq_len": self.seq_len, "batch": self.batch, "budget": self.budget,
                "dtype": self.dtype}


def format_draws(draws: tuple) -> str:
    """The random calls, whose masks the backward draws again from their counter."""
    calls = ", ".join(f"{value} ({op}, per {per})" for value, op, per in draws)
    return f"masks drawn again in the backward, 0 bytes: {calls}"


def random_draws(hoisted: Hoisted) -> tuple:
    """(value, op, what it is drawn once per) of each random call of the cell."""
    return tuple((n.out, n.op, n.attr("per")) for n in hoisted.cell.nodes if OPS[n.op].draws)


def format_segments(lengths: tuple) -> str:
    """`3 x 10, 2 x 9`: run lengths of equal segments."""
    runs = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return ", ".join(f"{k} x {n}" if k > 1 else str(n) for k, n in runs)


def planned(hoisted: Hoisted, grads: dict, policy, **across_time) -> Plan:
    """The Plan of one per-step policy, with `across_time` (segments, seq_len,
    batch, budget, dtype) as given."""
    per_step = per_step_plan(hoisted, grads["step"], policy)
    return Plan(per_step.policy, per_step.residuals, per_step.stored, per_step.recompute,
                role_values(hoisted, grads, per_step.stored),
                measure(hoisted, grads, per_step.stored, per_step.recompute), draws=random_draws(hoisted),
                **across_time)


# --- the schedule across time under a budget ----------------------------------------------
def segment_lengths(held: dict, T: int, B: int, budget: int) -> tuple | None:
    """The fewest segments (so the longest last segment, which is never replayed)
    whose backward fits the budget, or None when none fits.

    The backward of segment j holds the once-per-sequence values and their
    cotangents, j checkpoints, and L_j steps of hoisted rows, tape and
    row cotangents, so segment j may hold at most
    (budget - fixed - j * checkpoint) // per_step steps: early segments may be
    longer than late ones. `held`: bytes of each role (Costs.held_bytes)."""
    fixed = backward_fixed(held).at(B)
    checkpoint = held["checkpoint"].at(B)
    per_step = backward_per_step(held).at(B)
    caps, covered = [], 0
    while covered < T:
        cap = (budget - fixed - len(caps) * checkpoint) // max(per_step, 1)
        if cap < 1:
            return None
        caps.append(cap)
        covered += cap
    lengths, left = [0] * len(caps), T
    for j in reversed(range(len(caps))):  # fill from the last segment back
        lengths[j] = min(caps[j], left - j)
        left -= lengths[j]
    return tuple(lengths)


def smallest_budget(held: dict, T: int, B: int) -> int:
    """The least number of bytes some segmentation fits in (a bisection)."""
    low = 0
    high = backward_fixed(held).at(B) + T * (held["checkpoint"] + backward_per_step(held)).at(B)
    while low < high:
        mid = (low + high) // 2
        if segment_lengths(held, T, B, mid) is None:
            low = mid + 1
        else:
            high = mid
    return high


UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_budget(budget) -> int:
    """Bytes: a number (1.5e9) or a string with a unit ("64MiB", "2GB", "1e6")."""
    if isinstance(budget, str):
        number = budget.strip().rstrip("bBiIkKmMgG")
        unit = budget.strip()[len(number):].lower() or "b"
        try:
            return parse_budget(float(number) * UNITS[unit])
        except (ValueError, KeyError):
            raise ValueError(f"memory_budget: {budget!r} is not a number of bytes; write it as "
                             f"64MiB, 2GiB, 500kB or 1000000 (units: {', '.join(UNITS)})") from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 1 <= budget < math.inf:
        raise ValueError(f"memory_budget: expected a positive, finite number of bytes, got {budget!r}")
    return int(budget)


def budget_plan(hoisted, grads, recompute, budget, T, B, dtype) -> Plan:
    """Among the per-step choices (all of none/auto/all when recompute='auto',
    else the one given) and their best segmentation, the plan that fits the
    budget with the least recompute (then the least peak)."""
    budget = parse_budget(budget)
    for name, v in (("seq_len", T), ("batch", B)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: memory_budget needs a positive integer {name}, got {v!r}")
    choices = PER_STEP_CHOICES if isinstance(recompute, str) and recompute == "auto" else (recompute,)
    fitting, unsegmented = [], [planned(hoisted, grads, choice) for choice in choices]
    for plan in unsegmented:
        lengths = segment_lengths(plan.costs.held_bytes(dtype), T, B, budget)
        if lengths is not None:
            plan = replace(plan, segments=lengths, seq_len=int(T), batch=int(B), budget=budget, dtype=dtype)
            fitting.append((plan.recompute_flops(T, B), plan.peak_bytes(T, B, dtype), len(fitting), plan))
    if not fitting:
        floor = min(smallest_budget(plan.costs.held_bytes(dtype), T, B) for plan in unsegmented)
        raise ValueError(f"memory_budget: {budget} bytes ({format_bytes(budget)}) is too small for "
                         f"T={T}, B={B}, {dtype}; the smallest feasible budget is "
                         f"{floor} bytes ({format_bytes(floor)})")
    return min(fitting)[-1]


def make_plan(hoisted: Hoisted, grads: dict, recompute="auto", memory_budget=None,
              seq_len=None, batch=None, dtype="float32") -> Plan:
    """The Plan for a policy, and under `memory_budget` (bytes of `dtype` for
    `seq_len` steps and batch `batch`) with checkpointed segments."""
    np_dtype = storage(dtype)
    if memory_budget is not None:
        if seq_len is None or batch is None:
            raise ValueError("memory_budget: the plan is made for a sequence length and a batch size; "
                             "give seq_len=T and batch=B too")
        return budget_plan(hoisted, grads, recompute, memory_budget, seq_len, batch, np_dtype.name)
    return planned(hoisted, grads, recompute, seq_len=seq_len, batch=batch, dtype=np_dtype.name)


# --- the table `rnnc plan` prints ------------------------------------------------------------
def format_table(plan: Plan, step: Graph, T: int, B: int, dtype: str, beside: dict) -> str:
    """Each value the plan stores or the backward reads: shape, bytes per step, and
    stored or recomputed by which ops; then totals for T and B, with the plans in
    `beside` (name -> Plan) in columns next to this one."""
    lines = [f"plan ({plan.describe()}); totals for T={T}, B={B}, {storage(dtype).name}"]
    if plan.segments is not None:
        lines.append(f"segments (a checkpoint at the start of each but the last): "
                     f"{format_segments(plan.segments_for(T))}")
    rows = _value_rows(plan, step, B, dtype)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines.append("")
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    if plan.draws:
        lines.append(format_draws(plan.draws))
    lines.append("")
    lines += _totals({"this plan": plan, **beside}, T, B, dtype)
    return "\n".join(lines)


def _value_rows(plan: Plan, step: Graph, B: int, dtype: str) -> list:
    """(value, shape, bytes per step, how it is kept) for each value the plan
    stores or the backward reads, after a header row."""
    values, inputs, stored = step.values(), {v.name for v in step.inputs}, set(plan.stored)
    producers = step.producers()
    rows = [("value", "shape", "bytes/step", "kept")]
    for name in dict.fromkeys(plan.residuals + plan.stored):
        v = values[name]
        label = name  # a compiler-made name says what it computes
        if name.startswith("%") and name in producers:
            label += f" = {producers[name].op}({', '.join(producers[name].args)})"
        if name in stored:
            kept = "stored" + (" (state)" if name in inputs else "")
        else:
            rerun = rerun_for(step, [name], stored)
            kept = "recomputed: " + ", ".join(f"{n.out}={n.op}" for n in rerun)
        size = wide_bytes(dtype) if name in inputs else storage(dtype).itemsize  # states stay wide
        rows.append((label, shape_str(v.shape), format_bytes(elements(v).at(B) * size), kept))
    return rows


def _totals(plans: dict, T: int, B: int, dtype: str) -> list:
    """Bytes and flops of each plan (name -> Plan), one column a plan."""
    measures = (("stored", lambda p: format_bytes(p.stored_bytes(T, B, dtype))),
                ("peak", lambda p: format_bytes(p.peak_bytes(T, B, dtype))),
                ("recompute flops", lambda p: f"{p.recompute_flops(T, B):,}"),
                ("forward flops", lambda p: f"{p.forward_flops(T, B):,}"))
    table = [("",) + tuple(plans)] + [(label,) + tuple(f(p) for p in plans.values())
                                      for label, f in measures]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            for r in table]
