"""Finite-difference checks of the NumPy backend's gradients (float64).

The loss is a fixed random linear function of every output and final state,
so its gradient with respect to an argument is exactly what `backward` returns
for those cotangents; each entry is compared with a central difference.
Random ops draw the same masks in every forward (all from `seed`), so the
loss is a smooth function of the arguments, the masks held fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import concrete_shape


@dataclass(frozen=True)
class Report:
    errors: dict  # "params['W']" -> worst relative error of that argument

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)

    def format(self) -> str:
        width = max((len(k) for k in self.errors), default=0)
        lines = [f"  {k:<{width}}  {v:.2e}" for k, v in self.errors.items()]
        return "\n".join(lines + [f"worst relative error: {self.worst:.2e}"])


def random_arguments(module, T: int, B: int, seed: int = 0, with_lengths: bool = False) -> dict:
    """Random inputs, initial states, contexts, params (and lengths) for `module`."""
    for name, value in (("T", T), ("B", B)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    rng = np.random.default_rng(seed)
    cell = module.cell

    def draw(decl, lead):
        shape = lead + concrete_shape(decl.shape)
        return rng.normal(size=shape).astype(module.dtype)

    # np.asarray: arithmetic on a 0-d array (a param of shape []) gives a NumPy
    # scalar, which the central differences could not perturb in place
    params = {k: np.asarray(v + 0.1 * rng.normal(size=v.shape), module.dtype)
              for k, v in module.init_params(seed).items()}
    lengths = rng.integers(0, T + 1, size=B) if with_lengths else None
    if lengths is not None:
        lengths[0] = T  # one full-length sequence, so every step matters
    return dict(inputs={d.name: draw(d, (T, B)) for d in cell.of_kind("input")},
                states={d.name: draw(d, (B,)) for d in cell.of_kind("state")},
                contexts={d.name: draw(d, (B,)) for d in cell.of_kind("context")},
                params=params, lengths=lengths)


def gradcheck(module, T: int = 3, B: int = 2, seed: int = 0, with_lengths: bool = False,
              eps: float = 1e-6, progress=None, reverse: bool = False) -> Report:
    """Worst relative error of every argument's gradient against central differences
    (of the forward with `reverse`). `progress(label, entries, index, count)` is called
    before each argument's."""
    if module.dtype != np.float64:
        raise ValueError(f"gradcheck needs a float64 module, got {module.dtype}")
    args = random_arguments(module, T, B, seed, with_lengths)
    rng = np.random.default_rng(seed + 1)
    result = module.forward(**args, seed=seed, reverse=reverse)
    d_outputs = {k: rng.normal(size=v.shape) for k, v in result.outputs.items()}
    d_states = {k: rng.normal(size=v.shape) for k, v in result.states.items()}
    grads = module.backward(result, d_outputs, d_states)

    def loss() -> float:
        r = module.forward(**args, train=False, stochastic=True, seed=seed, reverse=reverse)
        return (sum(float((r.outputs[k] * d).sum()) for k, d in d_outputs.items())
                + sum(float((r.states[k] * d).sum()) for k, d in d_states.items()))

    errors = {}
    checked = [(f"{group}[{name!r}]", group, name, array) for group in ("params", "inputs", "states", "contexts")
               for name, array in args[group].items()]
    for index, (label, group, name, array) in enumerate(checked):
        if progress:
            progress(label, array.size, index, len(checked))
        numeric = _central_differences(loss, array, eps)
        analytic = getattr(grads, group)[name]
        scale = max(np.abs(numeric).max(), np.abs(analytic).max(), 1e-3)
        errors[label] = float(np.abs(numeric - analytic).max() / scale)
    return Report(errors)


def _central_differences(loss, array: np.ndarray, eps: float) -> np.ndarray:
    out = np.zeros_like(array)
    flat, view = out.reshape(-1), array.reshape(-1)
    for i in range(view.size):
        old = view[i]
        view[i] = old + eps
        plus = loss()
        view[i] = old - eps
        minus = loss()
        view[i] = old
        flat[i] = (plus - minus) / (2 * eps)
    return out
