"""The recompute planner: what the backward keeps, what it recomputes, and
which steps' states it checkpoints.

Two choices make a Plan:

- Per step. The backward step reads some forward values of the step (its
  residuals). A policy chooses which step values to store for every step;
  `per_step_plan` derives the forward nodes the backward step reruns to
  rebuild the rest. Policies: `none` (store every residual), `all` (store
  only the states), `auto` (a min-cut over a cost model of bytes and flops,
  as PyTorch's AOTAutograd partitioner) and a list of names to recompute.
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

Policy (choosing) is kept apart from mechanism (deriving and applying the
choice), as JAX's checkpoint policies are; `Plan.format` shows the result.

Memory is counted so: `stored_bytes` is what the forward keeps for the
backward, `peak_bytes` the most held at any moment of forward plus backward,
leaving out the caller's arrays, the returned arrays (outputs, final states,
gradients) and one region run's scratch. The NumPy backend holds exactly
these buffers, in this order (see `_timeline`).
"""
from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..ir import Graph, Node
from ..ops import OPS, numel
from ..shapes import concrete_shape, shape_str
from .hoist import Hoisted

POLICIES = ("none", "all", "auto")
PER_STEP_CHOICES = ("none", "auto", "all")  # what a budget search tries when recompute="auto"

# The cost model of `auto`, in flop-equivalents. Storing an element costs a
# write in the forward, a read in the backward and the memory between them;
# we price it like 8 flops, so cheap elementwise work (sigmoid: 4 flops per
# element) is recomputed and a product over a fan-in (2*K flops per element)
# is kept. Products are never recomputed, as AOTAutograd never recomputes a
# matmul: their cost grows with the fan-in, which a per-element price hides.
STORE_COST = 8
NEVER_RECOMPUTED = frozenset({"dot"})


# --- amounts that scale with the batch ------------------------------------------------
@dataclass(frozen=True)
class Amount:
    """`per_example * B + shared`: elements or flops of something batched or not."""

    per_example: int = 0
    shared: int = 0

    def at(self, batch: int) -> int:
        return self.per_example * batch + self.shared

    def __add__(self, other: "Amount") -> "Amount":
        return Amount(self.per_example + other.per_example, self.shared + other.shared)


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
    produced = {n.out: n for n in region.nodes if n.op != "const"}
    keep = dict.fromkeys(v for v in region.outputs + backward_residuals if v in produced)
    return tuple(produced[v] for v in keep)


def dtype_size(dtype) -> int:
    return np.dtype(dtype).itemsize


@dataclass(frozen=True)
class Costs:
    """Elements and flops of everything the plan accounts for (see the module doc)."""

    seq_held: Amount  # hoisted once-per-sequence values, held throughout
    seq_cotangents: Amount  # their cotangents, accumulated over the backward
    pre_held: Amount  # per step: hoisted all-steps values of one step's rows
    pre_cotangents: Amount  # per step: cotangents of those values, for the batched products
    state: Amount  # one checkpoint: the states
    stored: Amount  # per step: the step values the plan stores
    seq_flops: Amount
    pre_flops: Amount  # per step
    step_flops: Amount  # per step, forward
    recompute_flops: Amount  # per step, rerun in the backward step

    @property
    def backward_fixed(self) -> Amount:
        """Held through the whole backward: the once-per-sequence values and their cotangents."""
        return self.seq_held + self.seq_cotangents

    @property
    def backward_per_step(self) -> Amount:
        """Held per step of the segment being backpropagated: its hoisted rows,
        stored values and row cotangents."""
        return self.pre_held + self.stored + self.pre_cotangents


def measure(hoisted: Hoisted, grads: dict, stored: tuple, recompute: tuple) -> Costs:
    step_values = hoisted.step.values()
    return Costs(
        seq_held=total(elements(n) for n in held_values(hoisted.seq, grads["seq"].residuals)),
        seq_cotangents=total(elements(hoisted.seq.values()[o]) for o, _ in grads["seq"].seeds),
        pre_held=total(elements(n) for n in held_values(hoisted.pre, grads["pre"].residuals)),
        pre_cotangents=total(elements(hoisted.pre.values()[o]) for o, _ in grads["pre"].seeds),
        state=total(elements(d) for d in hoisted.cell.of_kind("state")),
        stored=total(elements(step_values[v]) for v in stored),
        seq_flops=region_flops(hoisted.seq),
        pre_flops=region_flops(hoisted.pre),
        step_flops=region_flops(hoisted.step),
        recompute_flops=region_flops(hoisted.step, recompute),
    )


# --- the plan -------------------------------------------------------------------------------
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
    costs: Costs
    segments: tuple | None = None
    seq_len: int | None = None
    batch: int | None = None
    budget: int | None = None  # bytes, for `dtype`
    dtype: str = "float32"

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

    def _timeline(self, T: int, B: int):
        """Elements held after each event of forward then backward, in the backend's order."""
        c = self.costs
        per_step = c.backward_per_step
        lengths = self.segments_for(T)
        last = len(lengths) - 1
        held = c.seq_held.at(B)
        yield "forward", held
        for j, n in enumerate(lengths):  # forward: checkpoint, hoisted rows, (last) tape
            if j < last:
                held += c.state.at(B)
                yield "forward", held + n * c.pre_held.at(B)
            else:
                held += n * (c.pre_held + c.stored).at(B)
                yield "stored", held  # what the forward leaves for the backward
        held += c.seq_cotangents.at(B)
        for j in reversed(range(len(lengths))):
            # a replayed segment's checkpoint becomes the states of its first step's tape
            start = held - (c.state.at(B) if j < last else 0) - (
                lengths[j] * (c.pre_held + c.stored).at(B) if j == last else 0)
            yield "backward", start + lengths[j] * per_step.at(B)
            held = start

    def stored_bytes(self, T: int, B: int, dtype="float32") -> int:
        """Bytes the forward keeps for the backward (train=True)."""
        held = dict(self._timeline(T, B))["stored"] if T else self.costs.seq_held.at(B)
        return held * dtype_size(dtype)

    def peak_bytes(self, T: int, B: int, dtype="float32") -> int:
        """The most bytes held at any moment of forward plus backward."""
        return max(h for _, h in self._timeline(T, B)) * dtype_size(dtype)

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


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_segments(lengths: tuple) -> str:
    """`3 x 10, 2 x 9`: run lengths of equal segments."""
    runs = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return ", ".join(f"{k} x {n}" if k > 1 else str(n) for k, n in runs)


# --- the per-step choice --------------------------------------------------------------------
def state_names(hoisted: Hoisted) -> tuple:
    return tuple(d.name for d in hoisted.cell.of_kind("state"))


def step_candidates(hoisted: Hoisted) -> tuple:
    """Step values that could be stored: the states before the step and every node result."""
    return state_names(hoisted) + tuple(n.out for n in hoisted.step.nodes if n.op != "const")


def recompute_candidates(hoisted: Hoisted) -> tuple:
    """Names a manual list may give: every step value but the states and literals."""
    return tuple(n.out for n in hoisted.step.nodes if n.op != "const")


def rerun_for(step: Graph, wanted, stored: set) -> tuple:
    """The step nodes that rebuild `wanted` from `stored` values and the step's inputs."""
    producer = step.producers()
    needed = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in stored or name in needed or name not in producer:
            continue
        needed.add(name)
        todo.extend(producer[name].args)
    return tuple(n for n in step.nodes if n.out in needed)


def choose_none(hoisted: Hoisted, residuals: tuple) -> set:
    return set(residuals)


def choose_all(hoisted: Hoisted, residuals: tuple) -> set:
    return set(state_names(hoisted))


def choose_auto(hoisted: Hoisted, residuals: tuple) -> set:
    """The cheapest set to store by the cost model: a minimum s-t cut.

    Each step node v becomes an edge v.in -> v.out of capacity STORE_COST *
    elements(v) (cut: v is stored); source -> v.in has capacity flops(v) (cut:
    v is rerun in the backward; infinite for products); u.out -> v.in is
    infinite for every argument u; residual.out -> sink is infinite. The
    step's inputs (states, hoisted values, params) are available to the
    backward anyway and stay out of the graph."""
    step = hoisted.step
    values = step.values()
    nodes = [n for n in step.nodes if n.op != "const"]
    net = FlowNetwork()
    for n in nodes:
        net.add((n.out, "in"), (n.out, "out"), STORE_COST * numel(n.shape))
        recompute = math.inf if n.op in NEVER_RECOMPUTED else node_flops(n, values).per_example
        net.add("source", (n.out, "in"), recompute)
        for a in n.args:
            if (a, "out") in net.nodes:
                net.add((a, "out"), (n.out, "in"), math.inf)
    for r in residuals:
        if (r, "out") in net.nodes:
            net.add((r, "out"), "sink", math.inf)
    source_side = net.min_cut("source", "sink")
    stored = {n.out for n in nodes if (n.out, "in") in source_side and (n.out, "out") not in source_side}
    return stored | set(state_names(hoisted))


def choose_manual(hoisted: Hoisted, residuals: tuple, names: list) -> set:
    """Recompute the named values, as Caffe2's `recurrent_net` recomputes the
    blobs its `recompute_blobs_on_backward` names.

    A name the user wrote stands for its whole statement: its compiler-made
    intermediates (`%3`) are recomputed with it, so `recompute=["gates"]`
    reruns `gates = x @ W + h @ U + b`, product included. Everything computed
    from a recomputed value is recomputed too; the rest is stored."""
    candidates = recompute_candidates(hoisted)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        states = set(state_names(hoisted))
        why = ("states are always stored" if all(n in states for n in unknown)
               else "not a value of the step")
        raise ValueError(f"recompute: {', '.join(map(repr, unknown))}: {why}; recompute one of: "
                         f"{', '.join(candidates)} (or a policy: {', '.join(POLICIES)})")
    producer = hoisted.step.producers()
    banned, todo = set(), list(names)
    while todo:  # the named values and their compiler-made intermediates
        name = todo.pop()
        if name in banned or name not in producer:
            continue
        banned.add(name)
        todo.extend(a for a in producer[name].args if not a.isidentifier())
    for n in hoisted.step.nodes:  # and everything computed from them
        if any(a in banned for a in n.args):
            banned.add(n.out)
    needed = rerun_for(hoisted.step, [r for r in residuals if r in banned], set())
    frontier = {a for n in needed if n.out in banned for a in n.args if a not in banned}
    return ({r for r in residuals if r not in banned} | frontier | set(state_names(hoisted)))


@dataclass(frozen=True)
class PerStep:
    policy: str
    residuals: tuple
    stored: tuple
    recompute: tuple


def per_step_plan(hoisted: Hoisted, step_backward, policy) -> PerStep:
    """Apply a policy: the values stored per step and the nodes the backward reruns."""
    candidates = set(step_candidates(hoisted))
    residuals = tuple(r for r in step_backward.residuals if r in candidates)
    if isinstance(policy, str) and policy not in POLICIES:  # "gates,c_new", as a command line gives it
        policy = [name.strip() for name in policy.split(",") if name.strip()]
    if isinstance(policy, str):
        choice = {"none": choose_none, "all": choose_all, "auto": choose_auto}[policy](hoisted, residuals)
        name = policy
    elif isinstance(policy, (list, tuple)) and all(isinstance(n, str) for n in policy):
        choice, name = choose_manual(hoisted, residuals, list(policy)), "[" + ", ".join(policy) + "]"
    else:
        raise ValueError(f"recompute: unknown policy {policy!r}; use one of {', '.join(POLICIES)} "
                         f"or a list of value names to recompute (from: "
                         f"{', '.join(recompute_candidates(hoisted))})")
    # states are always stored: nothing earlier in the step can rebuild them
    states = set(state_names(hoisted))
    stored = choice | states
    recompute = rerun_for(hoisted.step, [r for r in residuals if r not in stored], stored)
    # store only what the backward step or the recomputation actually reads
    read = set(residuals) | {a for n in recompute for a in n.args}
    # (states always: a replayed segment's checkpoint becomes its first step's states)
    kept = tuple(v for v in step_candidates(hoisted) if v in stored and (v in read or v in states))
    return PerStep(name, residuals, kept, recompute)


# --- the schedule across time under a budget ----------------------------------------------
def segment_lengths(costs: Costs, T: int, B: int, budget_elements: int) -> tuple | None:
    """The fewest segments (so the longest last segment, which is never replayed)
    whose backward fits the budget, or None when none fits.

    The backward of segment j holds the once-per-sequence values and their
    cotangents, j checkpoints, and L_j steps of hoisted rows, tape and
    row cotangents, so segment j may hold at most
    (budget - fixed - j * checkpoint) // per_step steps: early segments may be
    longer than late ones."""
    fixed = costs.backward_fixed.at(B)
    checkpoint = costs.state.at(B)
    per_step = costs.backward_per_step.at(B)
    caps, covered = [], 0
    while covered < T:
        cap = (budget_elements - fixed - len(caps) * checkpoint) // max(per_step, 1)
        if cap < 1:
            return None
        caps.append(cap)
        covered += cap
    lengths, left = [0] * len(caps), T
    for j in reversed(range(len(caps))):  # fill from the last segment back
        lengths[j] = min(caps[j], left - j)
        left -= lengths[j]
    return tuple(lengths)


def smallest_budget(costs: Costs, T: int, B: int) -> int:
    """The least number of elements some segmentation fits in (a bisection)."""
    low = 0
    high = costs.backward_fixed.at(B) + T * (costs.state + costs.backward_per_step).at(B)
    while low < high:
        mid = (low + high) // 2
        if segment_lengths(costs, T, B, mid) is None:
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
    size = dtype_size(dtype)
    choices = PER_STEP_CHOICES if isinstance(recompute, str) and recompute == "auto" else (recompute,)
    fitting, all_costs = [], []
    for choice in choices:
        per_step = per_step_plan(hoisted, grads["step"], choice)
        costs = measure(hoisted, grads, per_step.stored, per_step.recompute)
        all_costs.append(costs)
        lengths = segment_lengths(costs, T, B, budget // size)
        if lengths is not None:
            plan = Plan(per_step.policy, per_step.residuals, per_step.stored, per_step.recompute,
                        costs, lengths, int(T), int(B), budget, np.dtype(dtype).name)
            fitting.append((plan.recompute_flops(T, B), plan.peak_bytes(T, B, dtype), len(fitting), plan))
    if not fitting:
        floor = min(smallest_budget(costs, T, B) for costs in all_costs) * size
        raise ValueError(f"memory_budget: {budget} bytes ({format_bytes(budget)}) is too small for "
                         f"T={T}, B={B}, {np.dtype(dtype).name}; the smallest feasible budget is "
                         f"{floor} bytes ({format_bytes(floor)})")
    return min(fitting)[-1]


def make_plan(hoisted: Hoisted, grads: dict, recompute="auto", memory_budget=None,
              seq_len=None, batch=None, dtype="float32") -> Plan:
    """The Plan for a policy, and under `memory_budget` (bytes of `dtype` for
    `seq_len` steps and batch `batch`) with checkpointed segments."""
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        np_dtype = None
    if np_dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    if memory_budget is not None:
        if seq_len is None or batch is None:
            raise ValueError("memory_budget: the plan is made for a sequence length and a batch size; "
                             "give seq_len=T and batch=B too")
        return budget_plan(hoisted, grads, recompute, memory_budget, seq_len, batch, np_dtype.name)
    per_step = per_step_plan(hoisted, grads["step"], recompute)
    costs = measure(hoisted, grads, per_step.stored, per_step.recompute)
    return Plan(per_step.policy, per_step.residuals, per_step.stored, per_step.recompute, costs,
                seq_len=seq_len, batch=batch, dtype=np_dtype.name)


# --- minimum cut ------------------------------------------------------------------------------
class FlowNetwork:
    """Capacities on directed edges; max flow by Dinic's algorithm.

    Each phase labels vertices with their distance from the source over edges
    with capacity left, then saturates every shortest path at once (a blocking
    flow): a depth-first search along edges that go one level up, each edge
    given up for the phase once it is saturated or leads nowhere, so a phase
    costs about one pass over the edges plus the paths it fills. A step's
    graph needs few phases (its values are rebuilt from nearby ones), so the
    cut of a 10,000-node step takes well under a second. The search keeps its
    path in a list: a chain of values is as deep as it is long."""

    def __init__(self):
        self.capacity: dict = {}  # u -> {v: capacity left}, with the reverse edges

    @property
    def nodes(self):
        return self.capacity.keys()

    def add(self, u, v, capacity):
        self.capacity.setdefault(u, {})
        self.capacity.setdefault(v, {})
        self.capacity[u][v] = self.capacity[u].get(v, 0) + capacity
        self.capacity[v].setdefault(u, 0)  # the residual edge

    def _levels(self, source) -> dict:
        """Distance from the source of every vertex it reaches over edges with capacity left."""
        level, queue = {source: 0}, deque([source])
        while queue:
            u = queue.popleft()
            for v, cap in self.capacity.get(u, {}).items():  # a step without nodes has no source
                if cap > 0 and v not in level:
                    level[v] = level[u] + 1
                    queue.append(v)
        return level

    def _blocking_flow(self, source, sink, level: dict):
        capacity = self.capacity
        # the edges each vertex may still push along this phase (tried from the end)
        ahead = {u: [v for v, cap in capacity[u].items() if cap > 0 and level.get(v) == level[u] + 1]
                 for u in level}
        path = [source]
        while path:
            u = path[-1]
            if u == sink:
                edges = list(zip(path, path[1:]))
                # finite: every path to the sink crosses some value's store edge
                push = min(capacity[a][b] for a, b in edges)
                for a, b in edges:
                    capacity[a][b] -= push
                    capacity[b][a] += push
                first_full = next(i for i, (a, b) in enumerate(edges) if capacity[a][b] == 0)
                del path[first_full + 1:]  # resume from the tail of the first saturated edge
                continue
            edges_left = ahead[u]
            while edges_left and capacity[u][edges_left[-1]] <= 0:
                edges_left.pop()
            if edges_left:
                path.append(edges_left[-1])
            else:  # a dead end for this phase: its parent stops trying it
                path.pop()
                if path:
                    ahead[path[-1]].pop()

    def min_cut(self, source, sink) -> set:
        """The source side of a minimum cut (capacities are consumed)."""
        while sink in (level := self._levels(source)):
            self._blocking_flow(source, sink, level)
        return set(level)


# --- the table `rnnc plan` prints ------------------------------------------------------------
def format_table(plan: Plan, step: Graph, T: int, B: int, dtype: str, beside: dict) -> str:
    """Each value the plan stores or the backward reads: shape, bytes per step, and
    stored or recomputed by which ops; then totals for T and B, with the plans in
    `beside` (name -> Plan) in columns next to this one."""
    lines = [f"plan ({plan.describe()}); totals for T={T}, B={B}, {np.dtype(dtype).name}"]
    if plan.segments is not None:
        lines.append(f"segments (a checkpoint at the start of each but the last): "
                     f"{format_segments(plan.segments_for(T))}")
    rows = _value_rows(plan, step, B, dtype)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines.append("")
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
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
        rows.append((label, shape_str(v.shape), format_bytes(elements(v).at(B) * dtype_size(dtype)), kept))
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
