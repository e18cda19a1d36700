"""The NumPy backend: the reference that every other backend is checked against.

It interprets the Plan's schedule (rnnc/passes/schedule.py) event by event:
the once-per-sequence region once, the hoisted `pre` region over all rows of
a segment of steps at once, the step once per time step; the backward
replays checkpointed segments, reruns the Plan's recomputation and runs the
backward step, last step first. Every buffer an event makes or frees goes
through a `Ledger`, which measures the bytes held: they must equal the
schedule's, which are the Plan's predictions.

A module of bfloat16 or float16 (rnnc/dtypes.py) takes and gives arrays of
that type and computes in float32: it rounds products' inputs to the type,
and the values the CUDA backend keeps in 16-bit buffers where they are made
(`dtypes.rounded_where_made`), so it is the kernels' reference; the states
it carries from step to step and the sums of gradients stay float32.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..dtypes import compute, is_narrow, rounded_where_made, storage
from ..ops import COUNTER_KINDS, OPS, align, counter_values
from ..passes.mask import VALID, cotangent_input
from ..precision import for_dtype
from ..shapes import concrete_shape
from .args import bind_cotangents, bind_forward, bind_seed, saved_for_backward
from .reverse import flip, step_order
from .ledger import Ledger


class Runner:
    """A list of nodes prepared once: each becomes (output, function, argument
    names). Products (ops that `rounds_inputs`) read their operands rounded to
    the module's precision. With `all_valid` (a call without lengths: every row is valid)
    a select on the lengths mask is the value it selects.

    Every result is an array of the dtype it computes in: a rule may give a
    Python float (a literal) or a NumPy scalar (arithmetic on 0-d arrays), and
    a 0-d array of another dtype would widen float32 arrays (NumPy's scalars
    are weakly typed, its 0-d arrays are not). Arguments of a 16-bit type are
    read as that dtype; the results named in `rounded` are rounded to
    `narrow` (left as arrays of it: what holds them holds 16 bits)."""

    def __init__(self, nodes, values: dict, precision, dtype, all_valid: bool = False,
                 rounded=frozenset(), narrow=None):
        self.steps = [self._prepare(n, values, precision, all_valid) for n in nodes]
        self.dtype = dtype
        self.rounded, self.narrow = (set(rounded), narrow) if narrow is not None else (set(), None)

    @staticmethod
    def _prepare(node, values, precision, all_valid):
        if all_valid and node.op == "select" and node.args[0] == VALID:
            return node.out, lambda chosen: chosen, node.args[1:2]
        rule = OPS[node.op].numpy
        if OPS[node.op].rounds_inputs and precision.tensor_cores:
            def fn(*arrays, rule=rule, node=node):
                return rule(node, *(precision.round_inputs(x) for x in arrays))
        elif OPS[node.op].elementwise and node.args:
            rank = len(node.shape)
            flags = [values[a].batched for a in node.args]

            def fn(*arrays, rule=rule, node=node, flags=flags, rank=rank):
                return rule(node, *(align(x, f, rank) for x, f in zip(arrays, flags)))
        else:
            def fn(*arrays, rule=rule, node=node):
                return rule(node, *arrays)
        return node.out, fn, node.args

    def run(self, env: dict) -> dict:
        for out, fn, args in self.steps:
            env[out] = np.asarray(fn(*[self._read(env[a]) for a in args]), self.dtype)
            if out in self.rounded:
                env[out] = env[out].astype(self.narrow)
        return env

    def _read(self, array):
        """An argument in the dtype the Runner computes in; the random draws'
        key (unsigned words, rnnc/ops/random.py) as it is."""
        array = np.asarray(array)
        return array if array.dtype.kind == "u" else array.astype(self.dtype, copy=False)


@dataclass
class ForwardResult:
    outputs: dict
    states: dict
    stored_bytes: int = 0  # measured: what this forward keeps for the backward
    _tape: "Saved | None" = field(default=None, repr=False)
    seed: int | None = None  # of the random draws: forward(..., seed=result.seed) draws them again


@dataclass
class Gradients:
    params: dict
    inputs: dict
    states: dict
    contexts: dict
    peak_bytes: int = 0  # measured: the most held at once over forward and backward


@dataclass
class Call:
    """One forward call: its arguments, and what lives between its events."""

    T: int
    B: int
    inputs: dict  # name -> [T, B, ...]
    valid: np.ndarray | None  # [T, B]: step t inside sequence b (None without lengths: all are)
    run: dict  # region name -> Runner, for these lengths
    steps: dict = field(default_factory=dict)  # the step index's name -> [T, B] (t), when the cell reads it
    order: np.ndarray | None = None  # reverse=True: the steps' permutation (see backends/reverse.py)
    ledger: Ledger = field(default_factory=Ledger)
    shared: dict = field(default_factory=dict)  # params, contexts, literals, once-per-sequence values
    state: dict = field(default_factory=dict)  # the states between segments
    outputs: dict = field(default_factory=dict)
    grads: "Accumulators | None" = None  # the backward's


@dataclass
class Saved:
    """What a training forward leaves for the backward (used up by it; `args`
    let a second backward run the forward again)."""

    args: dict
    call: Call
    schedule: object
    fingerprints: dict  # of the caller's arrays, which the backward reads again
    used: bool = False


def _caller_arrays(args: dict) -> dict:
    """The caller's arrays of a forward call, by the name errors give them ("inputs['x']")."""
    arrays = {f"{group}[{name!r}]": a for group in ("inputs", "params", "states", "contexts")
              for name, a in (args[group] or {}).items()}
    if args["lengths"] is not None:
        arrays["lengths"] = args["lengths"]
    return arrays


def _fingerprint(array) -> tuple:
    """Shape, dtype and a CRC of the bytes: enough to notice an accidental change,
    and faster than a cryptographic hash (about 1 GB/s; a forward reads its arrays many times)."""
    array = np.asarray(array)
    return array.shape, array.dtype.str, zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _check_unchanged(saved: Saved):
    """The backward reads the caller's arrays where they are (copying them would
    cost memory the plan does not count): one changed in place since the
    forward would give wrong gradients, so it is refused, as torch refuses a
    tensor saved for backward and changed in place."""
    for label, array in _caller_arrays(saved.args).items():
        if _fingerprint(array) != saved.fingerprints[label]:
            raise ValueError(f"backward: {label} was changed in place after the forward, which the "
                             "backward reads again; its gradients would be wrong. Change a copy, or "
                             "run the forward again after the change")


@dataclass
class Accumulators:
    """The backward's cotangents: of the states before the step being run, of
    the outputs (given), and summed over steps: of the inputs (returned), of
    the once-per-sequence values (held for their backward), of params and contexts."""

    d_state: dict
    d_outputs: dict
    d_inputs: dict
    d_shared: dict = field(default_factory=dict)
    d_seq: dict = field(default_factory=dict)

    def add(self, name, g):
        sums = self.d_seq if name in self.d_seq else self.d_shared
        if name in sums:
            sums[name] += g
        else:  # an array of our own to sum into in place
            sums[name] = np.array(g)


def add_into(array: np.ndarray, index, value):
    """array[index] += value, summed in `value`'s dtype and rounded once to the array's."""
    array[index] = (array[index].astype(np.result_type(value)) + value).astype(array.dtype)


class NumpyModule:
    backend = "numpy"

    def __init__(self, program, dtype="float64", precision: str | None = None):
        self.program = program
        self.cell = program.cell
        self.dtype = storage(dtype)  # of every array it takes and gives
        self.compute = compute(dtype)  # of its arithmetic, and of the states and sums it carries
        self.precision = for_dtype(self.dtype, precision)
        self.hoisted, self.grads, self.plan = program.hoisted, program.grads, program.plan
        self.values = self.hoisted.values()
        # a call without lengths has every row valid: its selects are the values they select
        self.runners = {lengths: self._runners(all_valid=not lengths) for lengths in (False, True)}
        # literals are free: every region's are in every environment
        self.literals = {n.out: np.asarray(n.attr("value"), self.compute)
                         for g in (self.hoisted.seq, self.hoisted.pre, self.hoisted.step)
                         for n in g.nodes if n.op == "const"}
        # the counter of random draws (rnnc/ops/random.py): kind -> its declared name
        self.counter = {d.kind: d.name for d in self.cell.decls if d.kind in COUNTER_KINDS}

    def _runners(self, all_valid: bool) -> dict:
        h, g = self.hoisted, self.grads
        regions = {"seq": (h.seq.nodes, h.seq), "pre": (h.pre.nodes, h.pre), "step": (h.step.nodes, h.step),
                   "recompute": (self.plan.recompute, h.step)}
        regions.update((f"d_{name}", (b.graph.nodes, b.graph)) for name, b in g.items())
        rounded = rounded_where_made(self.program) if is_narrow(self.dtype) else {}
        return {name: Runner(nodes, graph.values(), self.precision, self.compute, all_valid,
                             rounded.get(name, ()), self.dtype if rounded else None)
                for name, (nodes, graph) in regions.items()}

    # --- parameters -----------------------------------------------------------
    def init_params(self, seed: int = 0) -> dict:
        """Each param's initialiser, or uniform(+-1/sqrt(k)), k its first axis (a matrix's fan-in) or length."""
        rng = np.random.default_rng(seed)
        params = {}
        for d in self.cell.of_kind("param"):
            shape = concrete_shape(d.shape)
            if d.init is not None:
                params[d.name] = np.full(shape, d.init, dtype=self.compute).astype(self.dtype)
            else:
                bound = 1.0 / np.sqrt(shape[0] if shape else 1)
                params[d.name] = rng.uniform(-bound, bound, size=shape).astype(self.compute).astype(self.dtype)
        return params

    def _shape(self, name: str) -> tuple:
        return concrete_shape(self.values[name].shape)

    def _zeros(self, name: str, lead: tuple = (), dtype=None) -> np.ndarray:
        """Zeros of value `name`'s per-example shape behind the leading axes
        `lead`, of the module's dtype (or `dtype`: the one it computes in)."""
        return np.zeros(lead + self._shape(name), dtype or self.dtype)

    def _batched(self, name: str, array, batch: int):
        """A value as a batched array of the dtype the module computes in
        (shared values and literals broadcast over the batch)."""
        shape = (batch,) + self._shape(name)
        array = np.asarray(array, dtype=self.compute)
        return np.broadcast_to(array, shape) if array.shape != shape else array

    def _given(self, array):
        """A caller's array as the module returns it: its dtype, a copy of ours."""
        return np.asarray(array).astype(self.dtype)

    # --- the interpreter ------------------------------------------------------------
    def _run(self, call: Call, events):
        for event in events:
            restored = call.ledger.release(event.restores) if event.restores else None
            getattr(self, f"_on_{event.kind}")(call, event, *([restored[0]] if restored else []))
            for buffer in event.frees:
                call.ledger.release(buffer)

    def forward(self, inputs, params, states=None, contexts=None, lengths=None, train=True, seed=None,
                stochastic=None, reverse=False):
        """Run the schedule's forward events: the sequence segment by segment, as
        the plan says. Inputs and outputs are time first, [T, B, ...]. Training
        keeps, for the backward, the states at the start of every segment but the
        last and the last segment's hoisted rows and stored step values;
        inference keeps nothing. Random ops draw their masks from `seed` (a
        fresh one when None) when `stochastic` (default: `train`), else take
        their expectation forms. `reverse`: each example runs from its last
        valid step to its first (the step index and the masks count the steps
        as they run)."""
        args = dict(inputs=inputs, params=params, states=states, contexts=contexts, lengths=lengths,
                    reverse=reverse)
        T, B, inputs, params, states, contexts, lengths = bind_forward(
            self.cell, self.dtype, inputs, params, states, contexts, lengths)
        seed, stochastic = bind_seed(seed), train if stochastic is None else bool(stochastic)
        args.update(seed=seed, stochastic=stochastic)  # a second backward draws the same masks again
        valid = None if lengths is None else np.arange(T)[:, None] < lengths[None, :]
        order = step_order(T, B, lengths) if reverse else None
        call = Call(T, B, {x: flip(a, order) for x, a in inputs.items()}, valid,
                    self.runners[valid is not None], order=order)
        values = counter_values(T, B, seed, stochastic, self.compute)
        counter = {name: values[kind] for kind, name in self.counter.items()}  # those the cell reads, by name
        step = self.counter.get("step")
        call.steps = {step: counter.pop(step)} if step else {}
        call.shared = {**params, **contexts, **self.literals, **counter}
        # the forward runs on its own copies of the initial states: a checkpoint owns them
        call.state = {d.name: np.array(states[d.name], self.compute) if d.name in states
                      else self._zeros(d.name, (B,), self.compute) for d in self.cell.of_kind("state")}
        call.outputs = {o: self._zeros(v, (T, B)) for o, v in self.hoisted.outputs}
        schedule = self.plan.schedule(T, B, self.dtype, train)
        self._run(call, schedule.forward())
        # a final state may be a stored value too: the caller gets its own copy (astype copies)
        final = {s: self._given(a) for s, a in call.state.items()}
        saved = None
        if train:
            fingerprints = {k: _fingerprint(a) for k, a in _caller_arrays(args).items()}
            saved = Saved(args, call, schedule, fingerprints)
        return ForwardResult({o: flip(y, order) for o, y in call.outputs.items()}, final,
                             call.ledger.current, saved, seed)

    def _on_seq(self, call, event):
        """The once-per-sequence values every region reads, held until the backward is done."""
        env = call.run["seq"].run(dict(call.shared))
        call.shared.update(call.ledger.keep(event.allocs[0], {v: env[v] for v in self.plan.held["seq"]}))

    def _on_checkpoint(self, call, event):
        call.ledger.keep(event.allocs[0], call.state)

    def _on_forward(self, call, event, start_state=None):
        """The hoisted rows of the segment's steps, then its steps, from the
        states after the last segment (a replay: from its checkpoint)."""
        rows = self._rows(call, event)
        tape = event.allocated("tape")
        state = call.state if start_state is None else start_state
        for t in event.steps:
            env = self._step_env(call, rows, event.start, t)
            env.update(state)
            call.run["step"].run(env)
            if tape:
                call.ledger.keep(tape, {v: env[v] for v in self.plan.held["tape"]})
            if event.kind == "forward":
                for o, v in self.hoisted.outputs:
                    call.outputs[o][t] = env[v]
            state = {s: self._batched(s, env[v], call.B) for s, v in self.hoisted.nexts}
        if event.kind == "forward":
            call.state = state

    _on_replay = _on_forward

    def _rows(self, call, event) -> dict:
        """The hoisted values of the event's steps as flat rows [(stop-start)*B, ...], held."""
        buffer = event.allocated("rows")
        if buffer is None:  # made by the segment's forward or replay
            return call.ledger.arrays("rows", event.segment)[0]
        env = self._rows_env(call, event)
        call.run["pre"].run(env)
        return call.ledger.keep(buffer, {v: env[v] for v in self.plan.held["rows"]})

    def _rows_env(self, call, event) -> dict:
        """What the hoisted `pre` region and its backward read over the event's
        steps: the shared values, and the inputs and the mask as flat rows."""
        env = dict(call.shared)
        env.update((x, a[event.start:event.stop].reshape((-1,) + a.shape[2:])) for x, a in self._sequences(call).items())
        return env

    @staticmethod
    def _sequences(call) -> dict:
        """The values of every row: the inputs, the mask and the step index, [T, B, ...]."""
        return {**call.inputs, **({} if call.valid is None else {VALID: call.valid}), **call.steps}

    def _step_env(self, call, rows, start, t) -> dict:
        """What step t reads: shared values, its inputs, the mask, the step index
        and its rows of the hoisted values."""
        B, row = call.B, (t - start) * call.B
        env = dict(call.shared)
        env.update((x, a[t]) for x, a in self._sequences(call).items())
        env.update((v, rows[v][row:row + B]) for v in self.hoisted.pre.outputs)
        return env

    # --- backward ----------------------------------------------------------------
    def backward(self, result: ForwardResult, d_outputs=None, d_states=None) -> Gradients:
        """Run the schedule's backward events: segments from last to first, each
        replayed from its checkpoint (the last one's values are kept by the
        forward), backpropagated step by step, then its hoisted products'
        backward over its rows at once; then the once-per-sequence region's."""
        saved = saved_for_backward(result)
        d_outputs, d_states = bind_cotangents(self.cell, self.dtype, saved.call.T, saved.call.B,
                                              d_outputs, d_states)
        _check_unchanged(saved)
        if saved.used:  # an earlier backward freed what the forward kept: rebuild it
            saved = self.forward(**saved.args)._tape
        saved.used = True
        call = saved.call
        d_outputs = {o: flip(d, call.order) for o, d in d_outputs.items()}
        B = call.B
        call.grads = Accumulators(
            d_state={d.name: np.asarray(d_states[d.name], self.compute) if d.name in d_states
                     else self._zeros(d.name, (B,), self.compute) for d in self.cell.of_kind("state")},
            d_outputs={o: d_outputs[o] if o in d_outputs else np.broadcast_to(self._zeros(v), (call.T, B) + self._shape(v))
                       for o, v in self.hoisted.outputs},
            d_inputs={x: np.zeros(a.shape, self.dtype) for x, a in call.inputs.items()})
        self._run(call, saved.schedule.backward())
        acc, cell = call.grads, self.cell
        return Gradients(
            params={d.name: self._given(acc.d_shared[d.name]) if d.name in acc.d_shared else self._zeros(d.name)
                    for d in cell.of_kind("param")},
            inputs={x: flip(d, call.order) for x, d in acc.d_inputs.items()},
            states={s: self._given(a) for s, a in acc.d_state.items()},
            contexts={d.name: self._given(self._batched(d.name, acc.d_shared[d.name], B)) if d.name in acc.d_shared
                      else self._zeros(d.name, (B,)) for d in cell.of_kind("context")},
            peak_bytes=call.ledger.peak)

    def _on_backward(self, call, event):
        """The backward steps of the segment, last first: rerun the Plan's
        recompute, run the backward step and route its cotangents."""
        acc, B, ledger, step_bwd = call.grads, call.B, call.ledger, self.grads["step"]
        self._keep_d_seq(call, event)
        d_rows = ledger.keep(event.allocated("d_rows"), {v: self._zeros(v, (len(event.steps) * B,))
                                                         for v in self.plan.held["d_rows"]})
        rows, tape = self._rows(call, event), ledger.arrays("tape", event.segment)
        for t in reversed(event.steps):
            env = self._step_env(call, rows, event.start, t)
            env.update(tape[t - event.start])
            call.run["recompute"].run(env)
            env.update((cotangent_input("next", s), acc.d_state[s]) for s in acc.d_state)
            env.update((cotangent_input("out", o), d[t]) for o, d in acc.d_outputs.items())
            call.run["d_step"].run(env)
            row = (t - event.start) * B
            for w, g in step_bwd.grads:
                if w in acc.d_state:
                    acc.d_state[w] = self._batched(w, env[g], B)
                elif not g:
                    continue
                elif w in d_rows:
                    d_rows[w][row:row + B] = self._batched(w, env[g], B)
                elif w in acc.d_inputs:
                    add_into(acc.d_inputs[w], t, env[g])
                else:
                    acc.add(w, np.asarray(env[g], self.compute))

    def _on_param_grads(self, call, event):
        """The backward of the hoisted products over the segment's rows at once
        (dW = x^T dgates as one product per segment)."""
        pre_bwd = self.grads["pre"]
        if not self.hoisted.pre.nodes:
            return
        env = self._rows_env(call, event)
        env.update(call.ledger.arrays("rows", event.segment)[0])
        d_rows = call.ledger.arrays("d_rows", event.segment)[0]
        env.update((seed, d_rows[out]) for out, seed in pre_bwd.seeds)
        call.run["d_pre"].run(env)
        start, stop = event.start, event.stop
        for w, g in pre_bwd.grads:
            if not g:
                continue
            if w in call.grads.d_inputs:
                add_into(call.grads.d_inputs[w], slice(start, stop),
                         env[g].reshape((stop - start, call.B) + env[g].shape[1:]))
            else:
                call.grads.add(w, env[g])

    def _keep_d_seq(self, call, event):
        """The sums of the once-per-sequence values' cotangents, by the event that makes them."""
        if event.allocated("d_seq"):
            call.grads.d_seq = call.ledger.keep(event.allocated("d_seq"), {
                o: self._zeros(o, (call.B,) if self.values[o].batched else (), self.compute)
                for o in self.plan.held["d_seq"]})

    def _on_backward_seq(self, call, event):
        self._keep_d_seq(call, event)  # made here when there are no steps
        seq_bwd, acc = self.grads["seq"], call.grads
        if self.hoisted.seq.nodes:
            env = dict(call.shared)
            env.update((seed, acc.d_seq[out]) for out, seed in seq_bwd.seeds)
            call.run["d_seq"].run(env)
            for w, g in seq_bwd.grads:
                if g:
                    acc.add(w, env[g])
        call.shared = {}  # really free them: a later backward runs the forward again
