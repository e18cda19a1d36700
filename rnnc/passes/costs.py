"""The cost model the planner and the schedule share: the values each kind of
held buffer holds, and their elements and flops as amounts that scale with the batch.

A buffer's *role* says what it holds (see rnnc/passes/schedule.py for when
each is made and freed):

- `seq`: the once-per-sequence values kept after their region runs (what
  later regions and its own backward read);
- `checkpoint`: the states at the start of a segment of steps;
- `rows`: the hoisted all-steps values kept for each step of a segment;
- `tape`: the step values the plan stores, for each step of a segment
  (the states before each step among them);
- `d_seq`: the cotangents of the once-per-sequence values, summed over the steps;
- `d_rows`: the cotangents of the hoisted all-steps values, for each step of a segment.

Elements become bytes by the module's dtype (`Costs.held_bytes`): under
bfloat16 or float16 some of them stay float32 (rnnc/dtypes.py).
"""
from __future__ import annotations

from dataclasses import dataclass


from ..dtypes import WIDE_ROLES, storage, wide_bytes
from ..ir import Graph, Node
from ..ops import OPS, numel
from ..shapes import concrete_shape
from .hoist import Hoisted

ROLES = ("seq", "checkpoint", "rows", "tape", "d_seq", "d_rows")
PER_STEP = ("rows", "tape", "d_rows")  # roles whose buffers hold their values for every step of a segment


@dataclass(frozen=True)
class Amount:
    """`per_example * B + shared`: elements or flops of something batched or not."""

    per_example: int = 0
    shared: int = 0

    def at(self, batch: int) -> int:
        return self.per_example * batch + self.shared

    def __add__(self, other: "Amount") -> "Amount":
        return Amount(self.per_example + other.per_example, self.shared + other.shared)

    def __sub__(self, other: "Amount") -> "Amount":
        return Amount(self.per_example - other.per_example, self.shared - other.shared)

    def __mul__(self, factor: int) -> "Amount":
        return Amount(self.per_example * factor, self.shared * factor)


def total(amounts) -> Amount:
    return sum(amounts, Amount())


def elements(value) -> Amount:
    """Elements of one value (a Value or Node), per example when batched."""
    n = numel(value.shape)
    return Amount(n, 0) if value.batched else Amount(0, n)


def node_flops(node: Node, values: dict) -> Amount:
    """Flops of one node; the op's rule counts per example, once for a shared node
    whose arguments are all shared."""
    shapes = [concrete_shape(values[a].shape) for a in node.args]
    flops = OPS[node.op].flops(node, shapes)
    per_example = node.batched or any(values[a].batched for a in node.args)
    return Amount(flops, 0) if per_example else Amount(0, flops)


def region_flops(graph: Graph, nodes=None) -> Amount:
    values = graph.values()
    return total(node_flops(n, values) for n in (graph.nodes if nodes is None else nodes))


def held_values(region: Graph, backward_residuals: tuple) -> tuple:
    """Results of a hoisted region kept after it runs: what later regions read
    and what its own backward reads."""
    produced = {n.out for n in region.nodes if n.op != "const"}
    return tuple(v for v in dict.fromkeys(region.outputs + backward_residuals) if v in produced)


def role_values(hoisted: Hoisted, grads: dict, stored: tuple) -> dict:
    """The value names a buffer of each role holds (per step for `PER_STEP` roles)."""
    return {"seq": held_values(hoisted.seq, grads["seq"].residuals),
            "checkpoint": tuple(d.name for d in hoisted.cell.of_kind("state")),
            "rows": held_values(hoisted.pre, grads["pre"].residuals),
            "tape": tuple(stored),
            "d_seq": tuple(o for o, _ in grads["seq"].seeds),
            "d_rows": tuple(o for o, _ in grads["pre"].seeds)}


def wide_values(hoisted: Hoisted, role: str, names: tuple) -> tuple:
    """The values of a role's buffer that stay float32 under a 16-bit dtype:
    all of a `WIDE_ROLES` one, the states of the tape."""
    if role in WIDE_ROLES:
        return names
    states = {d.name for d in hoisted.cell.of_kind("state")}
    return tuple(v for v in names if role == "tape" and v in states)


@dataclass(frozen=True)
class Costs:
    """Elements of each role's buffer (per step for `PER_STEP` roles) and flops."""

    held: dict  # role -> Amount
    wide: dict  # role -> Amount: the elements of `held` that stay float32 under a 16-bit dtype
    seq_flops: Amount
    pre_flops: Amount  # per step
    step_flops: Amount  # per step, forward
    recompute_flops: Amount  # per step, rerun in the backward step

    @property
    def state(self) -> Amount:
        return self.held["checkpoint"]

    @property
    def stored(self) -> Amount:
        return self.held["tape"]

    def held_bytes(self, dtype) -> dict:
        """Bytes of each role's buffer (per step for `PER_STEP` roles) in a module of `dtype`."""
        narrow, wide = storage(dtype).itemsize, wide_bytes(dtype)
        return {role: (n - self.wide[role]) * narrow + self.wide[role] * wide for role, n in self.held.items()}


def backward_fixed(held: dict) -> Amount:
    """Held through the whole backward: the once-per-sequence values and their cotangents."""
    return held["seq"] + held["d_seq"]


def backward_per_step(held: dict) -> Amount:
    """Held per step of the segment being backpropagated: its hoisted rows,
    stored values and row cotangents."""
    return total(held[role] for role in PER_STEP)


def measure(hoisted: Hoisted, grads: dict, stored: tuple, recompute: tuple) -> Costs:
    values = hoisted.values()
    roles = role_values(hoisted, grads, stored)
    return Costs(
        held={role: total(elements(values[v]) for v in names) for role, names in roles.items()},
        wide={role: total(elements(values[v]) for v in wide_values(hoisted, role, names))
              for role, names in roles.items()},
        seq_flops=region_flops(hoisted.seq),
        pre_flops=region_flops(hoisted.pre),
        step_flops=region_flops(hoisted.step),
        recompute_flops=region_flops(hoisted.step, recompute),
    )
