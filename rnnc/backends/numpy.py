"""The NumPy backend: the reference that every other backend is checked against.

It interprets the hoisted regions, the backward regions and the Plan exactly:
`seq` once, `pre` over all rows of a segment of steps at once, `step` once per
time step; the backward replays checkpointed segments, runs the Plan's
recomputation, then the backward step, in reverse. A `Ledger` measures the
bytes it holds, which must equal the Plan's predictions.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..ops import OPS, align
from ..passes.plan import held_values
from ..precision import precision as find_precision
from ..shapes import concrete_shape
from .args import bind_cotangents, bind_forward, module_dtype, saved_for_backward


class Runner:
    """A list of nodes prepared once: each becomes (output, function, argument names).
    Products (`dot`) read their operands rounded to the module's precision.

    Every result is an array of the module's dtype: a rule may give a Python
    float (a literal) or a NumPy scalar (arithmetic on 0-d arrays), and a 0-d
    array of another dtype would widen float32 arrays (NumPy's scalars are
    weakly typed, its 0-d arrays are not)."""

    def __init__(self, nodes, values: dict, precision, dtype):
        self.steps = [self._prepare(n, values, precision) for n in nodes]
        self.dtype = dtype

    @staticmethod
    def _prepare(node, values, precision):
        rule = OPS[node.op].numpy
        if node.op == "dot" and precision.tensor_cores:
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
            env[out] = np.asarray(fn(*[env[a] for a in args]), self.dtype)
        return env


@dataclass
class ForwardResult:
    outputs: dict
    states: dict
    stored_bytes: int = 0  # measured: what this forward keeps for the backward
    _tape: "Saved | None" = field(default=None, repr=False)


@dataclass
class Gradients:
    params: dict
    inputs: dict
    states: dict
    contexts: dict
    peak_bytes: int = 0  # measured: the most held at once over forward and backward


def _root(array: np.ndarray) -> np.ndarray:
    """The array that owns the memory `array` views."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class Ledger:
    """The buffers a module holds between region runs, counted by the memory they own.

    Every array enters through `keep`, which copies it unless it is the whole
    of a buffer nothing else held uses (a slice would keep its whole buffer
    alive; a broadcast is smaller than it looks), so the total is the memory
    the process really holds for them, and the plan's prediction is checked
    against it."""

    def __init__(self):
        self.held: dict = {}  # id of the owning array -> that array
        self.current = self.peak = 0

    def holds(self, array) -> bool:
        return id(_root(array)) in self.held

    def keep(self, array: np.ndarray) -> np.ndarray:
        root = _root(array)
        if id(root) in self.held or root.nbytes != array.nbytes:
            array = root = array.copy()
        self.held[id(root)] = root
        self.current += root.nbytes
        self.peak = max(self.peak, self.current)
        return array

    def release(self, array: np.ndarray):
        self.current -= self.held.pop(id(_root(array))).nbytes

    def keep_all(self, arrays: dict) -> dict:
        return {k: self.keep(a) for k, a in arrays.items()}

    def release_all(self, arrays: dict):
        for a in arrays.values():
            self.release(a)


@dataclass
class Call:
    """One forward call's arguments and what lives for the whole call."""

    T: int
    B: int
    inputs: dict  # name -> [T, B, ...]
    lengths: np.ndarray | None
    shared: dict  # params, contexts, held once-per-sequence values and literals
    bounds: list  # (start, stop) of each segment of steps
    ledger: Ledger


@dataclass
class Saved:
    """What a training forward leaves for the backward (used up by it; `args`
    let a second backward run the forward again)."""

    args: dict
    call: Call
    checkpoints: list  # states at the start of every segment but the last
    pre: dict  # hoisted rows of the last segment
    tape: list  # stored values of each step of the last segment
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


def _valid_mask(lengths, t: int, dtype):
    """[B]: 1 for batch elements still inside their sequence at step t, else 0
    (None without lengths: every element is)."""
    if lengths is None:
        return None
    return (t < lengths).astype(dtype)


def _per_row(mask, like: np.ndarray):
    """A [B] mask shaped to broadcast against a batched array [B, ...]."""
    return mask.reshape(mask.shape[:1] + (1,) * (like.ndim - 1))


class NumpyModule:
    backend = "numpy"

    def __init__(self, program, dtype="float64", precision: str | None = None):
        self.program = program
        self.cell = program.cell
        self.dtype = module_dtype(dtype)
        self.precision = find_precision(precision)
        h, grads, p, d = program.hoisted, program.grads, self.precision, self.dtype
        self.run_seq = Runner(h.seq.nodes, h.seq.values(), p, d)
        self.run_pre = Runner(h.pre.nodes, h.pre.values(), p, d)
        self.run_step = Runner(h.step.nodes, h.step.values(), p, d)
        self.run_recompute = Runner(program.plan.recompute, h.step.values(), p, d)
        self.run_grad = {k: Runner(b.graph.nodes, b.graph.values(), p, d) for k, b in grads.items()}
        self.values = h.values()
        # the hoisted values kept after their region runs, as the plan counts them
        self.seq_held = tuple(n.out for n in held_values(h.seq, grads["seq"].residuals))
        self.pre_held = tuple(n.out for n in held_values(h.pre, grads["pre"].residuals))
        # literals are free: every region's are in every environment
        self.literals = {n.out: np.asarray(n.attr("value"), self.dtype)
                         for g in (h.seq, h.pre, h.step) for n in g.nodes if n.op == "const"}

    # --- parameters -----------------------------------------------------------
    def init_params(self, seed: int = 0) -> dict:
        """Each param's initialiser, or uniform(+-1/sqrt(k)), k its first axis (a matrix's fan-in) or length."""
        rng = np.random.default_rng(seed)
        params = {}
        for d in self.cell.of_kind("param"):
            shape = concrete_shape(d.shape)
            if d.init is not None:
                params[d.name] = np.full(shape, d.init, dtype=self.dtype)
            else:
                bound = 1.0 / np.sqrt(shape[0] if shape else 1)
                params[d.name] = rng.uniform(-bound, bound, size=shape).astype(self.dtype)
        return params

    def _shape(self, name: str) -> tuple:
        return concrete_shape(self.values[name].shape)

    def _zeros(self, name: str, lead: tuple = ()) -> np.ndarray:
        """Zeros of value `name`'s per-example shape behind the leading axes `lead`."""
        return np.zeros(lead + self._shape(name), self.dtype)

    def _batched(self, name: str, array, batch: int):
        """A value as a batched array (shared values and literals broadcast over the batch)."""
        shape = (batch,) + self._shape(name)
        return np.broadcast_to(np.asarray(array, dtype=self.dtype), shape) if np.shape(array) != shape else array

    # --- forward ----------------------------------------------------------------
    def forward(self, inputs, params, states=None, contexts=None, lengths=None, train=True):
        """Run the sequence segment by segment, as the plan says. Training keeps,
        for the backward, the states at the start of every segment but the last
        and the last segment's hoisted rows and stored step values; inference
        keeps nothing."""
        args = dict(inputs=inputs, params=params, states=states, contexts=contexts, lengths=lengths)
        T, B, inputs, params, states, contexts, lengths = bind_forward(
            self.cell, self.dtype, inputs, params, states, contexts, lengths)
        ledger = Ledger()
        call = Call(T, B, inputs, lengths, self._run_seq(params, contexts, ledger),
                    _bounds(self.program.plan.segments_for(T)), ledger)
        # the forward runs on its own copies of the initial states: a checkpoint owns them
        state = {d.name: np.array(states[d.name]) if d.name in states
                 else self._zeros(d.name, (B,)) for d in self.cell.of_kind("state")}
        outputs = {o: self._zeros(v, (T, B)) for o, v in self.cell.outputs}
        checkpoints, pre, tape = [], {}, None
        for j, (start, stop) in enumerate(call.bounds):
            last = train and j == len(call.bounds) - 1
            if train and not last:
                checkpoints.append(ledger.keep_all(state))
            pre = self._run_pre(call, start, stop)
            tape = [] if last else None
            state = self._run_steps(call, pre, start, stop, state, tape, outputs)
            if not last:
                ledger.release_all(pre)
                pre = {}  # gone before the next segment's rows are made
        if not train:
            ledger.release_all(self._held_seq(call))
        saved = None
        if train:
            fingerprints = {k: _fingerprint(a) for k, a in _caller_arrays(args).items()}
            saved = Saved(args, call, checkpoints, pre, tape, fingerprints)
        # a final state may be a stored value too: the caller gets its own copy
        final = {s: a.copy() if ledger.holds(a) else a for s, a in state.items()}
        return ForwardResult(outputs, final, ledger.current, saved)

    def _run_seq(self, params, contexts, ledger) -> dict:
        """The environment every region sees: params, contexts, literals and the
        once-per-sequence values (held until the backward is done)."""
        env = self.run_seq.run({**params, **contexts, **self.literals})
        held = ledger.keep_all({v: env[v] for v in self.seq_held})
        return {**params, **contexts, **self.literals, **held}

    def _held_seq(self, call) -> dict:
        return {v: call.shared[v] for v in self.seq_held}

    def _run_pre(self, call, start, stop) -> dict:
        """The hoisted values of steps start..stop as flat rows [(stop-start)*B, ...], held."""
        if not self.program.hoisted.pre.nodes:
            return {}
        env = _rows_env(call, start, stop)
        self.run_pre.run(env)
        return call.ledger.keep_all({v: env[v] for v in self.pre_held})

    def _step_env(self, call, pre, start, t) -> dict:
        """What step t reads: shared values, its inputs and its rows of the hoisted values."""
        B, row = call.B, (t - start) * call.B
        env = dict(call.shared)
        env.update((x, a[t]) for x, a in call.inputs.items())
        env.update((v, pre[v][row:row + B]) for v in self.program.hoisted.pre.outputs)
        return env

    def _run_steps(self, call, pre, start, stop, state, tape=None, outputs=None) -> dict:
        """Steps start..stop from `state`; appends each step's stored values to
        `tape` and writes `outputs` when given; returns the state after them."""
        B, stored = call.B, self.program.plan.stored
        for t in range(start, stop):
            env = self._step_env(call, pre, start, t)
            env.update(state)
            self.run_step.run(env)
            valid = _valid_mask(call.lengths, t, self.dtype)
            if outputs is not None:
                for o, v in self.cell.outputs:
                    y = self._batched(v, env[v], B)
                    outputs[o][t] = y if valid is None else y * _per_row(valid, y)
            if tape is not None:
                tape.append(call.ledger.keep_all({v: env[v] for v in stored}))
            new_state = {}
            for s, v in self.cell.nexts:
                new = self._batched(v, env[v], B)
                new_state[s] = new if valid is None else np.where(_per_row(valid, new) > 0, new, state[s])
            state = new_state
        return state

    # --- backward ----------------------------------------------------------------
    def backward(self, result: ForwardResult, d_outputs=None, d_states=None) -> Gradients:
        """Segments from last to first: replay a segment from its checkpoint (the
        last one's values are kept by the forward), backpropagate through its
        steps, then do its hoisted products' backward over its rows at once."""
        saved = saved_for_backward(result)
        d_outputs, d_states = bind_cotangents(self.cell, self.dtype, saved.call.T, saved.call.B,
                                              d_outputs, d_states)
        _check_unchanged(saved)
        if saved.used:  # an earlier backward freed what the forward kept: rebuild it
            saved = self.forward(**saved.args)._tape
        saved.used = True
        call = saved.call
        B, ledger = call.B, call.ledger
        acc = Accumulators(
            d_inputs={x: np.zeros(a.shape, self.dtype) for x, a in call.inputs.items()},
            d_seq=ledger.keep_all({o: self._zeros(o, (B,) if self.values[o].batched else ())
                                   for o in self.program.hoisted.seq.outputs}),
            d_shared={})
        d_state = {d.name: d_states.get(d.name, self._zeros(d.name, (B,)))
                   for d in self.cell.of_kind("state")}
        for j in reversed(range(len(call.bounds))):
            d_state = self._backward_segment(call, saved, j, d_outputs, d_state, acc)
        self._backward_seq(call, acc)
        cell = self.cell
        return Gradients(
            params={d.name: acc.d_shared.get(d.name, self._zeros(d.name)) for d in cell.of_kind("param")},
            inputs=acc.d_inputs,
            states=d_state,
            contexts={d.name: self._batched(d.name, acc.d_shared[d.name], B) if d.name in acc.d_shared
                      else self._zeros(d.name, (B,)) for d in cell.of_kind("context")},
            peak_bytes=ledger.peak)

    def _backward_segment(self, call, saved, j, d_outputs, d_state, acc) -> dict:
        """Backpropagate through segment j; returns the cotangents of the states
        before it. Its buffers are locals, freed when it returns."""
        (start, stop), B, ledger = call.bounds[j], call.B, call.ledger
        if j == len(call.bounds) - 1:  # the forward kept the last segment
            pre, tape = saved.pre, saved.tape
            saved.pre, saved.tape = {}, []
        else:  # replay it from its checkpoint, which becomes its first step's states
            state = saved.checkpoints.pop()
            ledger.release_all(state)
            pre, tape = self._run_pre(call, start, stop), []
            self._run_steps(call, pre, start, stop, state, tape)
        d_rows = ledger.keep_all({v: self._zeros(v, ((stop - start) * B,))
                                  for v in self.program.hoisted.pre.outputs})
        for t in reversed(range(start, stop)):
            stored = tape.pop()
            ledger.release_all(stored)
            d_state = self._backward_step(call, pre, start, t, stored, d_outputs, d_state, d_rows, acc)
        self._backward_pre(call, pre, d_rows, start, stop, acc)
        ledger.release_all(d_rows)
        ledger.release_all(pre)
        return d_state

    def _backward_step(self, call, pre, start, t, stored, d_outputs, d_state, d_rows, acc) -> dict:
        """Rerun the plan's recompute, run the backward step and route its
        cotangents; returns the cotangents of the states before step t."""
        B, step_bwd = call.B, self.program.grads["step"]
        env = self._step_env(call, pre, start, t)
        env.update(stored)
        self.run_recompute.run(env)
        valid = _valid_mask(call.lengths, t, self.dtype)
        env.update(self._seeds(step_bwd, d_outputs, d_state, t, B, valid))
        self.run_grad["step"].run(env)
        row = (t - start) * B
        new_state = {}
        for w, g in step_bwd.grads:
            if w in d_state:
                carried = 0 if valid is None else _keep(d_state[w], valid)
                new_state[w] = (env[g] if g else 0) + carried
            elif not g:
                continue
            elif w in d_rows:
                d_rows[w][row:row + B] = self._batched(w, env[g], B)
            elif w in acc.d_inputs:
                acc.d_inputs[w][t] += env[g]
            else:
                acc.add(w, env[g])
        return {s: self._batched(s, v, B) for s, v in new_state.items()}

    def _seeds(self, step_bwd, d_outputs, d_state, t, B, valid) -> dict:
        """Cotangents of the step's outputs at step t: d_outputs[t] and the carried d_state."""
        seeds = {}
        for out, seed in step_bwd.seeds:
            total = self._zeros(out, (B,))
            for s, v in self.cell.nexts:
                if v == out:
                    total = total + d_state[s]
            for o, v in self.cell.outputs:
                if v == out and o in d_outputs:
                    total = total + d_outputs[o][t]
            if valid is not None:
                total = total * _per_row(valid, total)
            seeds[seed] = total
        return seeds

    def _backward_pre(self, call, pre, d_rows, start, stop, acc):
        """The backward of the hoisted products over the segment's rows at once
        (dW = x^T dgates as one product per segment)."""
        pre_bwd = self.program.grads["pre"]
        if not self.program.hoisted.pre.nodes:
            return
        env = _rows_env(call, start, stop)
        env.update(pre)
        env.update((seed, d_rows[out]) for out, seed in pre_bwd.seeds)
        self.run_grad["pre"].run(env)
        for w, g in pre_bwd.grads:
            if not g:
                continue
            if w in acc.d_inputs:
                acc.d_inputs[w][start:stop] += env[g].reshape((stop - start, call.B) + env[g].shape[1:])
            else:
                acc.add(w, env[g])

    def _backward_seq(self, call, acc):
        seq_bwd = self.program.grads["seq"]
        if self.program.hoisted.seq.nodes:
            env = dict(call.shared)
            env.update((seed, acc.d_seq[out]) for out, seed in seq_bwd.seeds)
            self.run_grad["seq"].run(env)
            for w, g in seq_bwd.grads:
                if g:
                    acc.add(w, env[g])
        call.ledger.release_all(acc.d_seq)
        call.ledger.release_all(self._held_seq(call))
        call.shared = {}  # really free them: a later backward runs the forward again


@dataclass
class Accumulators:
    """Cotangents summed over steps: of the inputs (returned), of the
    once-per-sequence values (held for their backward), of params and contexts."""

    d_inputs: dict
    d_seq: dict
    d_shared: dict

    def add(self, name, g):
        sums = self.d_seq if name in self.d_seq else self.d_shared
        if name in sums:
            sums[name] += g
        else:  # an array of our own to sum into in place
            sums[name] = np.array(g)


def _rows_env(call: Call, start: int, stop: int) -> dict:
    """What the hoisted `pre` region and its backward read over steps
    start..stop: the shared values and the inputs as flat rows [(stop-start)*B, ...]."""
    env = dict(call.shared)
    env.update((x, a[start:stop].reshape((-1,) + a.shape[2:])) for x, a in call.inputs.items())
    return env


def _bounds(lengths) -> list:
    """(start, stop) of consecutive segments of the given lengths."""
    stops = np.cumsum(lengths, dtype=int).tolist()
    return list(zip([0] + stops[:-1], stops))


def _keep(d_state, valid):
    """The part of a state's cotangent that passes an invalid step unchanged."""
    return d_state * (1 - _per_row(valid, d_state))
