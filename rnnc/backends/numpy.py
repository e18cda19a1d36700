"""The NumPy backend: the reference that every other backend is checked against.

It interprets the hoisted regions, the backward regions and the Plan exactly:
`seq` once, `pre` over all T*B rows at once, `step` once per time step; the
backward runs the Plan's recomputation, then the backward step, in reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir import Graph
from ..ops import OPS, align
from .args import bind_cotangents, bind_forward, concrete_shape


class Runner:
    """A list of nodes prepared once: each becomes (output, function, argument names)."""

    def __init__(self, nodes, values: dict):
        self.steps = [self._prepare(n, values) for n in nodes]

    @staticmethod
    def _prepare(node, values):
        rule = OPS[node.op].numpy
        if OPS[node.op].elementwise and node.args:
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
            env[out] = fn(*[env[a] for a in args])
        return env


@dataclass
class ForwardResult:
    outputs: dict
    states: dict
    stored_bytes: int = 0
    _tape: dict | None = field(default=None, repr=False)


@dataclass
class Gradients:
    params: dict
    inputs: dict
    states: dict
    contexts: dict
    peak_bytes: int = 0


def _valid_mask(lengths, t: int, batch: int, rank: int, dtype):
    """1 for batch elements still inside their sequence at step t, else 0, shaped to broadcast."""
    if lengths is None:
        return None
    return (t < lengths).astype(dtype).reshape((batch,) + (1,) * rank)


class NumpyModule:
    backend = "numpy"

    def __init__(self, program, dtype="float64"):
        self.program = program
        self.cell = program.cell
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
        h = program.hoisted
        self.run_seq = Runner(h.seq.nodes, h.seq.values())
        self.run_pre = Runner(h.pre.nodes, h.pre.values())
        self.run_step = Runner(h.step.nodes, h.step.values())
        self.run_recompute = Runner(program.plan.recompute, h.step.values())
        self.run_grad = {k: Runner(b.graph.nodes, b.graph.values()) for k, b in program.grads.items()}
        # every value's shape, by name (compiler-made names differ between regions)
        self.values = {**h.cell.graph.values(), **h.seq.values(), **h.pre.values(), **h.step.values()}

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

    def _batched(self, name: str, array, batch: int):
        """A value as a batched array (shared values and literals broadcast over the batch)."""
        shape = (batch,) + self._shape(name)
        return np.broadcast_to(np.asarray(array, dtype=self.dtype), shape) if np.shape(array) != shape else array

    # --- forward ----------------------------------------------------------------
    def forward(self, inputs, params, states=None, contexts=None, lengths=None, train=True):
        T, B, inputs, params, states, contexts, lengths = bind_forward(
            self.cell, self.dtype, inputs, params, states, contexts, lengths)
        h, plan = self.program.hoisted, self.program.plan
        shared = self.run_seq.run({**params, **contexts})
        hoisted, pre_residuals = self._run_pre(shared, inputs, T, B, train)
        state = {d.name: states.get(d.name, np.zeros((B,) + self._shape(d.name), self.dtype))
                 for d in self.cell.of_kind("state")}
        outputs = {o: np.zeros((T, B) + self._shape(v), self.dtype) for o, v in self.cell.outputs}
        tape = [] if train else None
        for t in range(T):
            env = self._step_env(shared, inputs, hoisted, t)
            env.update(state)
            self.run_step.run(env)
            valid = _valid_mask(lengths, t, B, 0, self.dtype)
            for o, v in self.cell.outputs:
                y = self._batched(v, env[v], B)
                outputs[o][t] = y if valid is None else y * valid.reshape((B,) + (1,) * (y.ndim - 1))
            if train:
                tape.append({v: env[v] for v in plan.stored})
            for s, v in self.cell.nexts:
                new = self._batched(v, env[v], B)
                state[s] = new if valid is None else np.where(
                    valid.reshape((B,) + (1,) * (new.ndim - 1)) > 0, new, state[s])
        stored = sum(a.nbytes for step in tape for a in step.values()) if train else 0
        saved = dict(T=T, B=B, inputs=inputs, params=params, contexts=contexts, lengths=lengths,
                     shared=shared, hoisted=hoisted, pre_residuals=pre_residuals, tape=tape) if train else None
        return ForwardResult(outputs, dict(state), stored, saved)

    def _run_pre(self, shared, inputs, T, B, train):
        """The hoisted values as [T, B, ...], and (training) the T*B-row values
        the backward of `pre` reads."""
        pre = self.program.hoisted.pre
        if not pre.nodes:
            return {}, {}
        rows = {x: a.reshape((T * B,) + a.shape[2:]) for x, a in inputs.items()}
        env = self.run_pre.run({**shared, **rows})
        hoisted = {v: env[v].reshape((T, B) + env[v].shape[1:]) for v in pre.outputs}
        produced = {n.out for n in pre.nodes}
        residuals = {v: env[v] for v in self.program.grads["pre"].residuals if v in produced}
        return hoisted, residuals if train else {}

    @staticmethod
    def _step_env(shared, inputs, hoisted, t) -> dict:
        env = dict(shared)
        env.update((x, a[t]) for x, a in inputs.items())
        env.update((v, a[t]) for v, a in hoisted.items())
        return env

    # --- backward ----------------------------------------------------------------
    def backward(self, result: ForwardResult, d_outputs=None, d_states=None) -> Gradients:
        saved = result._tape
        if saved is None:
            raise ValueError("backward: this result came from forward(..., train=False), which keeps "
                             "nothing for the backward; run forward with train=True")
        T, B, lengths = saved["T"], saved["B"], saved["lengths"]
        d_outputs, d_states = bind_cotangents(self.cell, self.dtype, T, B, d_outputs, d_states)
        grads = self.program.grads
        step_bwd = grads["step"]
        d_state = {d.name: d_states.get(d.name, np.zeros((B,) + self._shape(d.name), self.dtype))
                   for d in self.cell.of_kind("state")}
        d_rows = {v: np.zeros((T, B) + self._shape(v), self.dtype)
                  for v in self.program.hoisted.pre.outputs + tuple(saved["inputs"])}
        d_shared: dict = {}
        for t in reversed(range(T)):
            env = self._step_env(saved["shared"], saved["inputs"], saved["hoisted"], t)
            env.update(saved["tape"][t])
            self.run_recompute.run(env)
            valid = _valid_mask(lengths, t, B, 0, self.dtype)
            env.update(self._seeds(step_bwd, d_outputs, d_state, t, B, valid))
            self.run_grad["step"].run(env)
            new_state = {}
            for w, g in step_bwd.grads:
                if w in d_state:
                    carried = 0 if valid is None else _keep(d_state[w], valid)
                    new_state[w] = (env[g] if g else 0) + carried
                elif w in d_rows:
                    if g:
                        d_rows[w][t] = self._batched(w, env[g], B)
                elif g:
                    d_shared[w] = d_shared[w] + env[g] if w in d_shared else env[g]
            d_state = {s: self._batched(s, v, B) for s, v in new_state.items()}
        self._backward_pre(saved, d_rows, d_shared, T, B)
        self._backward_seq(saved, d_shared)
        cell = self.cell
        zeros = lambda name, lead: np.zeros(lead + self._shape(name), self.dtype)
        return Gradients(
            params={d.name: d_shared.get(d.name, zeros(d.name, ())) for d in cell.of_kind("param")},
            inputs={d.name: d_rows.get(d.name, zeros(d.name, (T, B))) for d in cell.of_kind("input")},
            states=d_state,
            contexts={d.name: self._batched(d.name, d_shared[d.name], B) if d.name in d_shared
                      else zeros(d.name, (B,)) for d in cell.of_kind("context")},
        )

    def _seeds(self, step_bwd, d_outputs, d_state, t, B, valid) -> dict:
        """Cotangents of the step's outputs at step t: d_outputs[t] and the carried d_state."""
        seeds = {}
        for out, seed in step_bwd.seeds:
            total = np.zeros((B,) + self._shape(out), self.dtype)
            for s, v in self.cell.nexts:
                if v == out:
                    total = total + d_state[s]
            for o, v in self.cell.outputs:
                if v == out and o in d_outputs:
                    total = total + d_outputs[o][t]
            if valid is not None:
                total = total * valid.reshape((B,) + (1,) * (total.ndim - 1))
            seeds[seed] = total
        return seeds

    def _backward_pre(self, saved, d_rows, d_shared, T, B):
        pre_bwd = self.program.grads["pre"]
        if not self.program.hoisted.pre.nodes:
            return
        flat = lambda a: a.reshape((T * B,) + a.shape[2:])
        env = dict(saved["shared"])
        env.update((x, flat(a)) for x, a in saved["inputs"].items())
        env.update(saved["pre_residuals"])
        env.update((seed, flat(d_rows[out])) for out, seed in pre_bwd.seeds)
        self.run_grad["pre"].run(env)
        for w, g in pre_bwd.grads:
            if not g:
                continue
            if w in saved["inputs"]:
                d_rows[w] = d_rows[w] + env[g].reshape((T, B) + env[g].shape[1:])
            else:
                d_shared[w] = d_shared[w] + env[g] if w in d_shared else env[g]

    def _backward_seq(self, saved, d_shared):
        seq_bwd = self.program.grads["seq"]
        if not self.program.hoisted.seq.nodes:
            return
        env = dict(saved["shared"])
        for out, seed in seq_bwd.seeds:
            lead = (saved["B"],) if self.values[out].batched else ()
            env[seed] = d_shared.pop(out, np.zeros(lead + self._shape(out), self.dtype))
        self.run_grad["seq"].run(env)
        for w, g in seq_bwd.grads:
            if g:
                d_shared[w] = d_shared[w] + env[g] if w in d_shared else env[g]


def _keep(d_state, valid):
    """The part of a state's cotangent that passes an invalid step unchanged."""
    return d_state * (1 - valid.reshape(valid.shape[:1] + (1,) * (d_state.ndim - 1)))
