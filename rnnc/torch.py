"""PyTorch integration: compiled cells as `nn.Module`s with autograd.

    import torch, rnnc.torch
    lstm = rnnc.torch.RNN.from_torch(torch.nn.LSTM(32, 64, num_layers=2, bidirectional=True))
    output, (h_n, c_n) = lstm(x)     # as nn.LSTM: x [T, B, 32] or a PackedSequence
    rnn = rnnc.torch.RNN("my.cell", dims={"D": 32, "H": 64}, num_layers=2, bidirectional=True)
    cell = rnnc.torch.Cell("examples/lstm.cell", dims={"D": 32, "H": 64})
    outputs, states = cell(x)        # one layer, one direction, dicts by name

`RNN` is a layer as `nn.LSTM`/`nn.GRU`/`nn.RNN` are (layers, directions,
dropout between layers, batch_first, PackedSequence); `Cell` is one compiled
cell. Each layer and direction runs as one `torch.autograd.Function`: the
whole sequence, forward and backward through time. CPU tensors (float32,
float64, bfloat16 or float16) run on rnnc's NumPy backend, sharing memory
with the tensors. Under `torch.autocast` (bfloat16 or float16) the float
tensors, params included, are cast to the autocast dtype on the way in, so
the parameters and their gradients stay float32, as autocast's own ops do.
CUDA tensors run on rnnc's CUDA backend without a copy through the host,
relying on what that backend does:

- `rnnc.backends.cuda.runtime.load(program, dtype, device=index, empty=...)`
  gives a module with the NumPy module's `forward`/`backward`, which accepts
  anything with `__cuda_array_interface__` (torch tensors, made contiguous
  here) and makes its results and working memory with `empty`, here
  `torch.empty` on the tensors' device (so torch owns and frees all of it,
  from any thread);
- `lengths` stays a host NumPy integer array (the host loop over time reads it);
- it runs in that device's primary context, the one torch uses, pushing it
  on the calling thread for each call (autograd runs the backward on its own
  thread), and launches on the legacy default stream; each call is fenced
  both ways with torch's current stream (`wait_stream`), so rnnc's kernels
  are ordered with the torch work before and after them without a host
  synchronisation.

Modules pickle (torch.save, copy.deepcopy) without their compiled code: what
is pickled is the recipe (the cell's source text, dims and plan options), and
loading compiles it again, or takes it from this process's cache.
`torch.compile` does not trace into a module's forward: each call of an rnnc
module is one graph break, and nothing in it is guarded on, so it never
causes a recompilation.

PyTorch is an optional extra: `pip install 'rnnc[torch]'`.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources

import numpy as np

try:
    import torch
    from torch import nn
    from torch.autograd.function import once_differentiable
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
except ImportError as err:  # rnnc itself does not need torch
    raise ImportError("rnnc.torch needs PyTorch, an optional extra of rnnc: "
                      "pip install 'rnnc[torch]'") from err

from .backends.args import Binder
from .driver import Program, check_source, read_source
from .driver import compile as compile_cell
from .dtypes import storage
from .ir import format_cell
from .passes.policy import POLICIES
from .precision import DEFAULT as DEFAULT_PRECISION
from .shapes import concrete_shape, shape_str

__all__ = ["Cell", "RNN"]

KINDS = ("inputs", "params", "states", "contexts")  # also the fields of the backends' Gradients
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- how tensors reach a backend module, per device type ------------------------
class _NumpyBackend:
    """CPU tensors on the NumPy backend: tensors and arrays share memory both ways."""

    def __init__(self, program: Program, dtype: str, device: torch.device):
        self.module = program.load(backend="numpy", dtype=dtype)
        self.device = device

    def call(self):
        return nullcontext()

    @staticmethod
    def to_array(t: torch.Tensor):
        if t.dtype == torch.bfloat16:  # NumPy's own dtypes lack it: the same bits as ml_dtypes' bfloat16
            return t.detach().view(torch.int16).numpy().view(storage("bfloat16"))
        return t.detach().numpy()

    def to_tensors(self, arrays: list) -> list:
        """Wrap results as tensors, copying any array that aliases memory torch may own or
        write to (a view of a caller's tensor, a read-only broadcast, a second reference)."""
        seen, tensors = set(), []
        for a in arrays:
            if not (a.flags.owndata and a.flags.writeable) or id(a) in seen:
                a = a.copy()
            seen.add(id(a))
            if a.dtype == storage("bfloat16"):
                tensors.append(torch.from_numpy(a.view(np.int16)).view(torch.bfloat16))
            else:
                tensors.append(torch.from_numpy(a))
        return tensors


class _CudaBackend:
    """CUDA tensors on the CUDA backend (see the module docstring for what it relies on)."""

    def __init__(self, program: Program, dtype: str, device: torch.device):
        from .backends.cuda.runtime import load
        if dtype not in ("float32",):
            raise RuntimeError(f"rnnc.torch: CUDA tensors of {dtype} (torch.autocast on cuda among them) "
                               "are not supported yet: rnnc's cuda backend takes 16-bit arrays from the "
                               "host only; use float32 CUDA tensors, or the CPU")

        def empty(shape):
            return torch.empty(shape, dtype=torch.float32, device=device)
        try:
            self.module = load(program, dtype, device=device.index, empty=empty)
        except (ImportError, ValueError, RuntimeError, OSError) as err:
            # the backend's own message says what is missing and what to install
            raise RuntimeError(
                f"rnnc.torch: CUDA tensors of {dtype} run on rnnc's cuda backend, which could not be "
                f"loaded: {err} (or keep the module and its tensors on the CPU: .cpu())"
            ) from err
        self.device = device

    @contextmanager
    def call(self):
        current = torch.cuda.current_stream(self.device)
        legacy = torch.cuda.default_stream(self.device)  # stream 0, where rnnc launches
        with torch.cuda.device(self.device):
            legacy.wait_stream(current)  # rnnc reads what torch has queued so far
            yield
            current.wait_stream(legacy)  # torch's next work reads what rnnc wrote

    @staticmethod
    def to_array(t: torch.Tensor):
        return t.detach().contiguous()  # kernels index dense row-major arrays

    def to_tensors(self, arrays: list) -> list:
        return [torch.as_tensor(a, device=self.device) for a in arrays]


# --- the autograd function ----------------------------------------------------------
def _unflatten(layout: tuple, arrays) -> dict:
    """{kind: {name: array}} from arrays in `layout` order ((kind, name) pairs)."""
    nested = {k: {} for k in KINDS}
    for (kind, name), a in zip(layout, arrays):
        nested[kind][name] = a
    return nested


def _run_forward(backend, layout, lengths, options: dict, tensors, train: bool):
    """(backend result, output tensors in cell order, final state tensors in cell order);
    `options`: forward's `seed`, `stochastic` and `reverse`."""
    args = _unflatten(layout, [backend.to_array(t) for t in tensors])
    with backend.call():
        res = backend.module.forward(**args, lengths=lengths, train=train, **options)
    outs = backend.to_tensors(list(res.outputs.values()) + list(res.states.values()))
    return res, outs[:len(res.outputs)], outs[len(res.outputs):]


def _cotangents(backend, names, grads) -> dict:
    """{name: array} of the cotangents torch gives; an unused result's (None) is left out,
    which the backends read as zero."""
    return {n: backend.to_array(g) for n, g in zip(names, grads) if g is not None}


class _CellFunction(torch.autograd.Function):
    """forward(backend, layout, lengths, options, *tensors) -> (*outputs, *final states)."""

    ARGUMENTS = 4  # before the tensors

    @staticmethod
    def forward(ctx, backend, layout, lengths, options, *tensors):
        res, outputs, finals = _run_forward(backend, layout, lengths, options, tensors, train=True)
        ctx.set_materialize_grads(False)  # an unused result's gradient stays None: zero to rnnc
        # the backend's tape reads these tensors' memory: saving them lets autograd's version
        # counters catch an in-place change before the backward would silently use it
        ctx.save_for_backward(*tensors)
        ctx.backend, ctx.layout, ctx.result = backend, layout, res
        ctx.names = (tuple(res.outputs), tuple(res.states))
        return (*outputs, *finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 -- reading them raises if one was modified in place
        backend, (out_names, state_names) = ctx.backend, ctx.names
        with backend.call():
            g = backend.module.backward(
                ctx.result, d_outputs=_cotangents(backend, out_names, grads[:len(out_names)]),
                d_states=_cotangents(backend, state_names, grads[len(out_names):]))
        needs = ctx.needs_input_grad[_CellFunction.ARGUMENTS:]
        needed = [(kind, name) for (kind, name), need in zip(ctx.layout, needs) if need]
        tensors = iter(backend.to_tensors([getattr(g, kind)[name] for kind, name in needed]))
        return (None,) * _CellFunction.ARGUMENTS + tuple(next(tensors) if need else None for need in needs)


# --- compiled cells, pickled as their recipe ------------------------------------------------
@dataclass(frozen=True)
class _Recipe:
    """What `rnnc.compile` needs to build a Program again."""

    text: str
    cell: str
    dims: tuple  # (name, value) in declaration order
    recompute: str | tuple
    memory_budget: int | None
    seq_len: int | None
    batch: int | None
    dtype: str
    precision: str

    @classmethod
    def of(cls, program: Program) -> "_Recipe":
        plan = program.plan
        # a manual policy is named "[a, b]" by the planner
        recompute = plan.policy if plan.policy in POLICIES else tuple(plan.policy[1:-1].split(", "))
        return cls(program.source.text, program.cell.name, tuple(program.cell.dims), recompute,
                   plan.budget, plan.seq_len, plan.batch, plan.dtype, program.precision)


@lru_cache(maxsize=256)
def _compiled(recipe: _Recipe) -> Program:
    """The Program of a recipe; one per recipe in a process (Programs are immutable)."""
    recompute = recipe.recompute if isinstance(recipe.recompute, str) else list(recipe.recompute)
    return compile_cell(recipe.text, dims=dict(recipe.dims), cell=recipe.cell, recompute=recompute,
                        memory_budget=recipe.memory_budget, seq_len=recipe.seq_len, batch=recipe.batch,
                        dtype=recipe.dtype, precision=recipe.precision)


class _Compiled:
    """A compiled cell and its backend modules per (device, dtype), made on first use.

    Pickling (and so deepcopy) keeps only the recipe; unpickling takes the
    Program from `_compiled`, which compiles it when this process has not."""

    def __init__(self, program: Program):
        self.program = program
        self.recipe = _Recipe.of(program)
        self.backends = {}

    def __getstate__(self):
        return {"recipe": self.recipe}

    def __setstate__(self, state):
        self.program, self.recipe, self.backends = _compiled(state["recipe"]), state["recipe"], {}

    def backend(self, device: torch.device, dtype: torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"rnnc.torch: dtype {dtype} is not supported (float32, float64, "
                             f"bfloat16 or float16: convert with .float(), say)")
        key = (device, dtype)
        if key not in self.backends:
            kind = {"cpu": _NumpyBackend, "cuda": _CudaBackend}.get(device.type)
            if kind is None:
                raise ValueError(f"rnnc.torch: device {device} is not supported (cpu or cuda)")
            self.backends[key] = kind(self.program, DTYPES[dtype], device)
        return self.backends[key]

    def init_params(self, seed: int, dtype: torch.dtype) -> dict:
        """{name: tensor} by the cell's initialisers."""
        backend = self.backend(torch.device("cpu"), dtype)
        initial = backend.module.init_params(seed)
        return dict(zip(initial, backend.to_tensors(list(initial.values()))))

    def run(self, named: dict, lengths, reverse: bool, training: bool):
        """(outputs, final states), dicts of tensors, for {kind: {name: tensor}} (time first);
        `training`: the calling module's mode, which random ops follow."""
        layout = tuple((kind, name) for kind in KINDS for name in named.get(kind, {}))
        tensors = _autocast([named[kind][name] for kind, name in layout])
        backend = self.backend(*_common_device_dtype(layout, tensors))
        lengths = _host_lengths(lengths)
        options = {**self._draws(training), "reverse": reverse}
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            results = _CellFunction.apply(backend, layout, lengths, options, *tensors)
            n_out = len(self.program.cell.outputs)
            outputs, finals = results[:n_out], results[n_out:]
        else:  # nothing to differentiate: keep nothing for a backward
            _, outputs, finals = _run_forward(backend, layout, lengths, options, tensors, train=False)
        cell = self.program.cell
        return (dict(zip((o for o, _ in cell.outputs), outputs)),
                dict(zip((d.name for d in cell.of_kind("state")), finals)))

    def _draws(self, training: bool) -> dict:
        """forward's `seed` and `stochastic` for one call: a cell that draws
        takes its seed from torch's default generator (one that does not
        leaves the generator as it is)."""
        draws = any(d.kind == "key" for d in self.program.cell.decls)
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if draws else 0
        return {"seed": seed, "stochastic": training}


def _program(program_or_path, dims, recompute, cell) -> Program:
    if isinstance(program_or_path, Program):
        options = (("dims", dims), ("recompute", recompute), ("cell", cell))
        given = [k for k, v in options if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply only when compiling from a path or text; "
                             f"this program is already compiled")
        return program_or_path
    return compile_cell(program_or_path, dims=dims, cell=cell,
                        recompute="auto" if recompute is None else recompute)


def _common_device_dtype(layout, tensors):
    """The one device and dtype of all tensors (the first input's); any other is an error."""
    device = dtype = None
    for (kind, name), t in zip(layout, tensors):
        label = f"{kind}[{name!r}]"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
        device, dtype = device or t.device, dtype or t.dtype
        if (t.device, t.dtype) != (device, dtype):
            raise ValueError(f"{label}: {t.dtype} on {t.device}, but the first input is {dtype} on "
                             f"{device}; all tensors of an rnnc module share one (use .to(...))")
    return device, dtype


def _autocast(tensors: list) -> list:
    """The tensors cast to the autocast dtype where autocast is on for their
    device (the first's), by differentiable casts: float32 params get float32
    gradients. Unchanged otherwise."""
    if not tensors or not isinstance(tensors[0], torch.Tensor):
        return tensors
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def _host_lengths(lengths):
    """Lengths as a host integer array, where every backend expects them."""
    if lengths is None:
        return None
    if isinstance(lengths, torch.Tensor):
        return lengths.detach().cpu().numpy()
    return np.asarray(lengths)


def _add_parameter(module: nn.Module, name: str, param: nn.Parameter):
    if hasattr(module, name):
        # register_parameter refuses names nn.Module already has ('float', 'train');
        # held in _parameters they still take part in everything torch does with them
        module._parameters[name] = param
    else:
        module.register_parameter(name, param)


def _named(given, names: list, what: str = "hx") -> dict:
    """A dict argument of tensors by name, or a clear error for anything else."""
    if given is None:
        return {}
    if isinstance(given, dict):
        return dict(given)
    raise ValueError(f"{what}: expected a dict {{name: tensor}} ({', '.join(names) or 'none'}), got "
                     f"{type(given).__name__}")


def _inputs_by_name(given, cell) -> dict:
    """The inputs by name: a dict, or one tensor (or PackedSequence) for a cell with one input."""
    names = [d.name for d in cell.of_kind("input")]
    if isinstance(given, dict):
        return dict(given)
    if not isinstance(given, (torch.Tensor, PackedSequence)):
        raise ValueError(f"inputs: expected a tensor [T, B, ...], a PackedSequence or a dict "
                         f"{{name: tensor}} ({', '.join(names)}), got {type(given).__name__}")
    if len(names) != 1:
        raise ValueError(f"inputs: cell '{cell.name}' has inputs {', '.join(names)}; pass a dict "
                         f"{{name: tensor}}")
    return {names[0]: given}


# --- one cell ---------------------------------------------------------------------------------
class Cell(nn.Module):
    """A compiled recurrent cell as an `nn.Module`: one layer, one direction.

    `Cell(path_or_text, dims=..., recompute="auto", cell=None)` compiles a
    `.cell` file (or text); `Cell(program)` takes an `rnnc.compile` result.
    Each param of the cell is an `nn.Parameter` of the same name (`cell.W`;
    a name that `nn.Module` already uses, such as `float`, is reachable as
    `cell.params["float"]` and in `named_parameters()`), initialised by the
    cell's initialisers with `seed`, in `dtype` (default: torch's default).

    `forward(inputs, states=None, contexts=None, lengths=None, reverse=False)`
    takes dicts of tensors by name (`inputs` may be a single tensor when the
    cell has one input): inputs `[T, B, ...]` (`[B, T, ...]` with
    `batch_first=True`), states and contexts `[B, ...]`, `lengths` `[B]`
    integers (a tensor, array or list). It returns `(outputs,
    final_states)`, dicts of tensors. Missing initial states are zeros. Past
    an element's length its states carry over and its outputs are zero, as
    with PyTorch's packed sequences; `reverse=True` runs each element from its
    last valid step to its first. All tensors share one device and dtype:
    CPU float32/float64/bfloat16/float16 run on the NumPy backend, CUDA
    float32 on the CUDA backend. Under `torch.autocast` for their device the
    float tensors (params too) are cast to its dtype first, so the outputs
    are in it and the parameters' gradients in theirs.

    Random ops (dropout, zoneout) follow `train()` and `eval()`: they draw
    their masks in training mode, from a seed drawn from torch's default
    generator at each call (so `torch.manual_seed` repeats a run), and take
    their expectation forms in eval mode.
    """

    def __init__(self, program_or_path, dims: dict | None = None, recompute=None,
                 cell: str | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                 batch_first: bool = False):
        super().__init__()
        self._compiled = _Compiled(_program(program_or_path, dims, recompute, cell))
        self.batch_first = batch_first
        # plain attributes above, parameters below: nn.Module refuses a plain
        # attribute over a parameter's name, and a param may be named `program`
        for name, value in self._compiled.init_params(seed, dtype or torch.get_default_dtype()).items():
            _add_parameter(self, name, nn.Parameter(value))

    @property
    def program(self) -> Program:
        return self._compiled.program

    @property
    def params(self) -> dict:
        """{name: parameter} in the cell's declaration order."""
        return {d.name: self._parameters[d.name] for d in self.program.cell.of_kind("param")}

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.program.cell.dims)
        return f"{self.program.cell.name}, {dims}" + (", batch_first=True" if self.batch_first else "")

    @torch.compiler.disable
    def forward(self, inputs, states: dict | None = None, contexts: dict | None = None,
                lengths=None, reverse: bool = False):
        cell = self.program.cell
        names = {k: [d.name for d in cell.of_kind(k[:-1])] for k in ("inputs", "states", "contexts")}
        inputs = _inputs_by_name(inputs, cell)
        if any(isinstance(t, PackedSequence) for t in inputs.values()):
            raise ValueError("inputs: a PackedSequence goes to rnnc.torch.RNN; Cell takes padded "
                             "tensors and lengths=")
        batch = _Batch.of(inputs, lengths, self.batch_first, cell)
        named = {"inputs": batch.inputs, "params": self.params,
                 "states": _named(states, names["states"], "states"),
                 "contexts": _named(contexts, names["contexts"], "contexts")}
        for kind in ("states", "contexts"):
            batch.check_per_example(kind + "[{!r}]", named[kind], cell.of_kind(kind[:-1]))
        outputs, finals = self._compiled.run(named, batch.lengths, reverse, self.training)
        return {k: batch.wrap(t) for k, t in outputs.items()}, finals

    # --- weights from and to torch.nn.LSTM / GRU / RNN -----------------------------------
    @classmethod
    def from_torch(cls, net: nn.Module, recompute=None) -> "Cell":
        """A Cell running the shipped cell that computes `net`, with its weights.

        `net` is a single-layer, unidirectional `nn.LSTM` (also with
        `proj_size`), `nn.GRU` or `nn.RNN` (`RNN.from_torch` takes any).
        Gate rows keep torch's order along the last axis (LSTM i, f, g, o;
        GRU r, z, n): `W = weight_ih_l0.T`, `U = weight_hh_l0.T`,
        `R = weight_hr_l0.T`. Biases: the LSTM's and RNN's `b = bias_ih_l0 +
        bias_hh_l0` (they only ever use the sum); the GRU keeps both, `b_i`
        and `b_h` (r multiplies the hidden bias of n). Without biases
        (`bias=False`) they are zero. The Cell has `net`'s dtype, device and
        `batch_first`.
        """
        example = _example_for(net)
        if net.num_layers != 1 or net.bidirectional:
            raise ValueError(f"Cell.from_torch: a Cell is one layer and one direction, but this "
                             f"{type(net).__name__} has num_layers={net.num_layers}, bidirectional="
                             f"{net.bidirectional}; use rnnc.torch.RNN.from_torch(net)")
        like = net.weight_ih_l0
        cell = cls(_shipped_program(example, net, recompute), dtype=like.dtype,
                   batch_first=net.batch_first).to(like.device)
        with torch.no_grad():
            for name, value in _cell_params_of(_torch_weights(net, "_l0"), set(cell.params)).items():
                cell.params[name].copy_(value)
        return cell

    def to_torch(self) -> nn.Module:
        """The `nn.LSTM`, `nn.GRU` or `nn.RNN` with this Cell's weights (inverse of `from_torch`).

        Only for Cells of the shipped cells that torch has. The single bias `b` goes to
        `bias_ih_l0`, and `bias_hh_l0` is zero (torch adds the two)."""
        example, dims = self._shipped_example(), dict(self.program.cell.dims)
        p = self.params
        make, options = _TORCH_EQUIVALENTS[example]
        sizes = {"proj_size": dims["P"]} if "P" in dims else {}
        net = make(dims["D"], dims["H"], batch_first=self.batch_first, dtype=p["W"].dtype,
                   device=p["W"].device, **options, **sizes)
        with torch.no_grad():
            for name, value in _torch_weights_of(p).items():
                getattr(net, f"{name}_l0").copy_(value)
        return net

    def _shipped_example(self) -> str:
        """The shipped cell that this Cell's step is exactly, if torch has its equal."""
        cell = self.program.cell
        for example in _TORCH_EQUIVALENTS:
            source = read_source(_shipped_source(example))
            if [k for k, _ in check_source(source).cell.dims] != [k for k, _ in cell.dims]:
                continue
            if format_cell(check_source(source, dims=dict(cell.dims)).cell) == format_cell(cell):
                return example
        raise ValueError(f"to_torch: cell '{cell.name}' is none of the shipped cells that torch has "
                         f"({', '.join(_TORCH_EQUIVALENTS)}), so it has no torch.nn equivalent")


# --- layers of cells ------------------------------------------------------------------------
class RNN(nn.Module):
    """A recurrent layer of compiled cells, used as `nn.LSTM`, `nn.GRU` or `nn.RNN` are.

    `RNN(cell, dims=..., num_layers=1, bidirectional=False, dropout=0.0,
    batch_first=False, recompute="auto", cell_name=None, seed=0, dtype=None)`
    compiles a `.cell` file or text (`cell_name` picks one of a file's cells),
    or takes an `rnnc.compile` result. Each layer and direction is the cell
    with its own weights, named as torch names them (`W_l0`, `W_l0_reverse`,
    `W_l1`, ...; from `from_torch`, exactly torch's names and layouts). The
    layer above reads the outputs of both directions, concatenated, so its
    cell is compiled with its input's dim set to that width; `dropout` drops
    them in training (not after the last layer).

    Two calling conventions:

    - `nn.LSTM`'s, for a cell with one input, one output and no context:
      `output, h_n = rnn(input, hx=None, lengths=None)`. `input` is `[T, B,
      D]` (`[B, T, D]` with `batch_first`) or a `PackedSequence`; `output`
      has the same form, `directions * width` wide. `hx` and `h_n` are a
      tensor `[num_layers * directions, B, ...]` for a cell with one state,
      a tuple of them in the cell's state order for more (`(h, c)`).
    - dicts, for any other cell: `outputs, h_n = rnn(inputs, hx=None,
      lengths=None, contexts=None)`: inputs and outputs by name, `[T, B, ...]`
      (or batch first), states `hx` and `h_n` by name `[num_layers *
      directions, B, ...]`, contexts by name `[B, ...]`, the same for every
      layer and direction.

    `lengths` (padded input only) ends each sequence as a PackedSequence
    would: outputs are zero past it, and the backward direction starts at
    each sequence's last valid step.
    """

    def __init__(self, cell, dims: dict | None = None, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0, batch_first: bool = False,
                 recompute=None, cell_name: str | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self._build(_program(cell, dims, recompute, cell_name), num_layers, bidirectional, dropout,
                    batch_first, mirror=None)
        self._initialise(seed, dtype or torch.get_default_dtype())

    def _build(self, program: Program, num_layers: int, bidirectional: bool, dropout: float,
               batch_first: bool, mirror):
        """The layers' programs and the settings; `mirror` is the torch module's class and
        options when the weights are laid out as torch's (`from_torch`), else None."""
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"num_layers: expected a positive integer, got {num_layers!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout acts between layers, so with num_layers=1 it does nothing "
                          f"(dropout={dropout})", stacklevel=3)
        self.num_layers, self.bidirectional = num_layers, bool(bidirectional)
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self._mirror = mirror
        self._layers = _stacked(program, num_layers, 2 if bidirectional else 1)
        cell = program.cell
        values = cell.graph.values()
        scalars = [o for o, v in cell.outputs if not values[v].shape]
        if bidirectional and scalars:
            raise ValueError(f"bidirectional: the directions' outputs are put side by side along "
                             f"their last axis, and output {scalars[0]} of cell '{cell.name}' has none "
                             f"(give it one, as sum(..., keepdims=1) does)")
        self._lstm_convention = (len(cell.of_kind("input")) == 1 and len(cell.outputs) == 1
                                 and not cell.of_kind("context"))
        if mirror:
            sizes = mirror[1]
            self.input_size, self.hidden_size = sizes["input_size"], sizes["hidden_size"]
            self.proj_size = sizes.get("proj_size", 0)
        else:  # the last axes of the (first) input and output: what a direction reads and writes
            self.input_size = _last_axis(cell.of_kind("input")[0].shape)
            self.hidden_size, self.proj_size = _last_axis(values[cell.outputs[0][1]].shape), 0

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffix(self, layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction else "")

    def _initialise(self, seed: int, dtype: torch.dtype):
        """Each layer and direction's params by the cell's initialisers, each with its own seed."""
        seeds = iter(np.random.SeedSequence(seed).generate_state(self.num_layers * self.directions))
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                values = self._layers[layer].init_params(int(next(seeds)), dtype)
                for name, value in values.items():
                    _add_parameter(self, name + self._suffix(layer, direction), nn.Parameter(value))

    def cell_params(self, layer: int, direction: int) -> dict:
        """{cell param: tensor} of one layer and direction (0 forward, 1 backward)."""
        suffix = self._suffix(layer, direction)
        if self._mirror is None:
            return {d.name: self._parameters[d.name + suffix]
                    for d in self._layers[layer].program.cell.of_kind("param")}
        weights = {n[:-len(suffix)]: p for n, p in self._parameters.items() if n.endswith(suffix)}
        cell = self._layers[layer].program.cell
        return _cell_params_of(weights, {d.name for d in cell.of_kind("param")})

    def extra_repr(self) -> str:
        cell = self._layers[0].program.cell
        dims = ", ".join(f"{k}={v}" for k, v in cell.dims)
        options = [f"num_layers={self.num_layers}"] + [
            f"{k}={getattr(self, k)}" for k in ("bidirectional", "dropout", "batch_first")
            if getattr(self, k)]
        return f"{cell.name}, {dims}, {', '.join(options)}"

    # --- running ---------------------------------------------------------------------------
    @torch.compiler.disable
    def forward(self, input, hx=None, lengths=None, contexts: dict | None = None):
        """See the class docstring for the two conventions."""
        cell = self._layers[0].program.cell
        state_names = [d.name for d in cell.of_kind("state")]
        context_names = [d.name for d in cell.of_kind("context")]
        if self._lstm_convention and contexts is not None:
            raise ValueError(f"contexts: cell '{cell.name}' has none")
        states = _states_by_name(hx, state_names) if self._lstm_convention else _named(hx, state_names)
        contexts = _named(contexts, context_names, "contexts")
        batch = _Batch.of(_inputs_by_name(input, cell), lengths, self.batch_first, cell)
        batch.check_per_example("initial state {!r}", states, cell.of_kind("state"),
                                stacked=self.num_layers * self.directions)
        batch.check_per_example("contexts[{!r}]", contexts, cell.of_kind("context"))
        outputs, finals = self._run_layers(batch.inputs, batch.sorted_states(states), contexts,
                                           batch.lengths)
        outputs = {k: batch.wrap(y) for k, y in outputs.items()}
        finals = {k: batch.unsort_states(s) for k, s in finals.items()}
        if not self._lstm_convention:
            return outputs, finals
        (output,) = outputs.values()
        return output, finals[state_names[0]] if len(finals) == 1 else tuple(finals.values())

    def _run_layers(self, inputs: dict, states: dict, contexts: dict, lengths):
        """Every layer and direction, time first: (last layer's outputs, stacked final states)."""
        finals = {d.name: [] for d in self._layers[0].program.cell.of_kind("state")}
        for layer in range(self.num_layers):
            compiled = self._layers[layer]
            per_direction = []
            for direction in range(self.directions):
                j = layer * self.directions + direction
                named = {"inputs": inputs, "params": self.cell_params(layer, direction),
                         "states": {s: t[j] for s, t in states.items()}, "contexts": contexts}
                outputs, final = compiled.run(named, lengths, direction == 1, self.training)
                per_direction.append(outputs)
                for s, t in final.items():
                    finals[s].append(t)
            outputs = {o: torch.cat([d[o] for d in per_direction], dim=-1) for o in per_direction[0]}
            if layer < self.num_layers - 1:
                (y,), (x,) = outputs.values(), compiled.program.cell.of_kind("input")
                inputs = {x.name: nn.functional.dropout(y, self.dropout, self.training)}
        return outputs, {s: torch.stack(ts) for s, ts in finals.items()}

    # --- weights from and to torch ------------------------------------------------------------
    @classmethod
    def from_torch(cls, net: nn.Module, recompute=None) -> "RNN":
        """An RNN computing what `net` computes, with its weights, its settings and its
        parameter names and layouts (so `state_dict()` is interchangeable with `net`'s).

        `net` is an `nn.LSTM` (also with `proj_size`), `nn.GRU` or `nn.RNN`
        (tanh or relu), with any `num_layers`, `bidirectional`, `batch_first`,
        `dropout` and `bias`. The RNN has `net`'s dtype and device; each of
        its layers and directions runs the shipped cell that torch's does
        (`examples/lstm.cell`, `projected_lstm`, `gru`, `elman`, `elman_relu`).
        """
        example = _example_for(net)
        program = _shipped_program(example, net, recompute)
        rnn = cls.__new__(cls)
        nn.Module.__init__(rnn)
        options = {"input_size": net.input_size, "hidden_size": net.hidden_size, "bias": net.bias,
                   **_TORCH_EQUIVALENTS[example][1]}
        if getattr(net, "proj_size", 0):
            options["proj_size"] = net.proj_size
        rnn._build(program, net.num_layers, net.bidirectional, net.dropout, net.batch_first,
                   mirror=(type(net), options))
        for name, p in net.named_parameters():
            _add_parameter(rnn, name, nn.Parameter(p.detach().clone()))
        return rnn

    def to_torch(self) -> nn.Module:
        """The torch module this RNN mirrors, with its weights (an exact copy); only for an
        RNN made by `from_torch`."""
        if self._mirror is None:
            raise ValueError("to_torch: this RNN was not made by RNN.from_torch, so its weights are "
                             "not laid out as a torch module's")
        make, options = self._mirror
        like = next(iter(self._parameters.values()))
        net = make(**options, num_layers=self.num_layers, bidirectional=self.bidirectional,
                   dropout=self.dropout, batch_first=self.batch_first, dtype=like.dtype,
                   device=like.device)
        net.load_state_dict(self.state_dict())
        return net


def _states_by_name(hx, names: list) -> dict:
    """nn.LSTM's hx (a tensor for one state, a tuple in the cell's state order for more) by name."""
    if hx is None:
        return {}
    if len(names) == 1 and isinstance(hx, torch.Tensor):
        return {names[0]: hx}
    if isinstance(hx, (tuple, list)) and len(hx) == len(names) and len(names) > 1:
        return dict(zip(names, hx))
    stacked = "[num_layers * directions, B, ...]"
    form = f"a tensor {stacked}" if len(names) == 1 else \
        f"a tuple ({', '.join(names)}) of {stacked} tensors"
    got = f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
    raise ValueError(f"hx: expected {form}, got {got}")


_LAYOUTS = {False: "[T, B, ...] (time first; batch_first=True reads [B, T, ...])",
            True: "[B, T, ...] (batch_first=True)"}


def _check_sequences(inputs: dict, steps: dict, batch_first: bool) -> str:
    """Each input tensor [T, B, *step] ([B, T, *step] batch first), T and B those of the
    first; returns what fixed them, for messages. Names the cell lacks are left to the
    backends, which list the ones it has."""
    layout = _LAYOUTS[batch_first]
    (first_name, first), *_ = inputs.items()
    described = f"input {first_name!r} of shape {shape_str(first.shape)}, read as {layout}"
    if first_name not in steps:
        return described
    lead, source = ("B", "T") if batch_first else ("T", "B"), f"sequences are read as {layout}"
    for name, t in inputs.items():
        step = steps.get(name)
        if step is None:
            continue
        fits = t.dim() == 2 + len(step) and tuple(t.shape[2:]) == step and \
            (name == first_name or tuple(t.shape[:2]) == lead)
        if not fits:
            raise ValueError(f"input {name!r}: expected shape {shape_str(lead + step)}, "
                             f"got {shape_str(t.shape)}; {source}")
        if name == first_name:
            lead, source = tuple(t.shape[:2]), f"T and B from {described}"
    return described


@dataclass
class _Batch:
    """The inputs of one call, time first, padded, and how to give results back in the
    caller's form. A PackedSequence is padded in its sorted order (longest first),
    so the caller's initial states are sorted and the final ones unsorted, as torch does."""

    inputs: dict
    lengths: object
    batch_first: bool
    described: str  # where the batch size comes from, for messages
    packed: PackedSequence | None = None

    @property
    def size(self) -> int:
        return next(iter(self.inputs.values())).shape[1]

    @classmethod
    def of(cls, inputs: dict, lengths, batch_first: bool, cell) -> "_Batch":
        """The inputs (by name) of `cell`, checked in the caller's layout: the backends see
        them time first, so their messages would show a batch-first caller's shapes transposed."""
        steps = {d.name: concrete_shape(d.shape) for d in cell.of_kind("input")}
        for name, t in inputs.items():
            if not isinstance(t, (torch.Tensor, PackedSequence)):
                raise ValueError(f"input {name!r}: expected a tensor [T, B, ...] ([B, T, ...] with "
                                 f"batch_first) or a PackedSequence, got {type(t).__name__}")
        packed = [t for t in inputs.values() if isinstance(t, PackedSequence)]
        if not packed:
            described = _check_sequences(inputs, steps, batch_first)
            batch = cls({k: t.transpose(0, 1) if batch_first else t for k, t in inputs.items()},
                        _host_lengths(lengths), batch_first, described)
            checks = Binder()
            checks.fix(*next(iter(batch.inputs.values())).shape[:2], batch.described)
            checks.lengths(batch.lengths)
            return batch
        if lengths is not None or len(packed) != len(inputs):
            raise ValueError("input: a PackedSequence holds its own lengths; pass no lengths= and "
                             "no other inputs beside it")
        ((name, p),) = inputs.items()
        step = steps.get(name)
        if step is not None and tuple(p.data.shape[1:]) != step:
            raise ValueError(f"input {name!r}: expected a PackedSequence of steps of shape "
                             f"{shape_str(step)}, got one of data {shape_str(p.data.shape)}")
        padded, lengths = pad_packed_sequence(PackedSequence(p.data, p.batch_sizes))
        return cls({name: padded}, lengths, batch_first, "the PackedSequence", p)

    def check_per_example(self, label: str, given: dict, decls, stacked: int | None = None):
        """Tensors by name of `decls`, each [B, ...] with the input's B ([stacked, B, ...]
        with `stacked` states, one per layer and direction); a wrong shape says where B came
        from. `label` formats a name. A name the cell lacks is left to the backends, which
        list the ones it has."""
        lead, what = ((self.size,), "B") if stacked is None else \
            ((stacked, self.size), "num_layers * directions, B")
        for d in decls:
            t = given.get(d.name)
            want = lead + concrete_shape(d.shape)
            if t is not None and not isinstance(t, torch.Tensor):
                raise ValueError(f"{label.format(d.name)}: expected a torch.Tensor, got {type(t).__name__}")
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{label.format(d.name)}: expected shape {shape_str(want)}, [{what}, "
                                 f"...] with B = {self.size} from {self.described}; got "
                                 f"{shape_str(t.shape)}")

    def sorted_states(self, states: dict) -> dict:
        if self.packed is None or self.packed.sorted_indices is None:
            return states
        return {k: s.index_select(1, self.packed.sorted_indices) for k, s in states.items()}

    def unsort_states(self, state):
        if self.packed is None or self.packed.unsorted_indices is None:
            return state
        return state.index_select(1, self.packed.unsorted_indices)

    def wrap(self, y):
        """An output [T, B, ...] in the form of the input."""
        if self.packed is None:
            return y.transpose(0, 1) if self.batch_first else y
        data = pack_padded_sequence(y, self.lengths).data
        p = self.packed
        return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)


def _stacked(program: Program, num_layers: int, directions: int) -> list:
    """One _Compiled per layer: the first reads the caller's input; the ones above read the
    directions' outputs side by side, so their input's dim is set to that width."""
    first = _Compiled(program)
    if num_layers == 1:
        return [first]
    cell = program.cell
    inputs, outputs = cell.of_kind("input"), cell.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"num_layers={num_layers}: a layer reads the output of the one below, so "
                         f"cell '{cell.name}' needs one input and one output, but has inputs "
                         f"{', '.join(d.name for d in inputs)} and outputs "
                         f"{', '.join(o for o, _ in outputs)}")
    symbolic = check_source(read_source(program.source.text), cell.name).cell.of_kind("input")[0].shape
    dim = _sole_dim(symbolic)
    if dim is None:
        raise ValueError(f"num_layers={num_layers}: the layer above sizes cell '{cell.name}''s input "
                         f"by the width of the outputs below, so the input must be sized by one dim "
                         f"alone (as x[D]); it is {inputs[0].name}{shape_str(symbolic)}")
    width = directions * _output_width(cell)
    recipe = first.recipe
    above = _Compiled(_compiled(replace(recipe, dims=tuple(
        (k, width if k == dim else v) for k, v in recipe.dims))))
    shapes = [(d.name, concrete_shape(d.shape)) for d in cell.of_kind("state")]
    if [(d.name, concrete_shape(d.shape)) for d in above.program.cell.of_kind("state")] != shapes \
            or _output_width(above.program.cell) != _output_width(cell):
        raise ValueError(f"num_layers={num_layers}: dim {dim} sizes cell '{cell.name}''s input and "
                         f"also its states or output, so the layer above (with {dim}={width}) "
                         f"would not match the one below")
    return [first] + [above] * (num_layers - 1)


def _sole_dim(shape) -> str | None:
    """The dim that alone sizes a vector (D of [D]), else None ([2*D], [D + 1], [D, H])."""
    if len(shape) != 1 or len(shape[0].terms) != 1:
        return None
    (monomial, coefficient), = shape[0].terms.items()
    return monomial[0] if len(monomial) == 1 and coefficient == 1 else None


def _last_axis(shape):
    """A per-example shape's last size (None for a scalar)."""
    return concrete_shape(shape)[-1] if shape else None


def _output_width(cell) -> int:
    """The width of a cell's (first) output per example: what a layer above reads."""
    shape = concrete_shape(cell.graph.values()[cell.outputs[0][1]].shape)
    if len(shape) != 1:
        raise ValueError(f"cell '{cell.name}': a layer's output {cell.outputs[0][0]} must be a vector "
                         f"to be concatenated over directions and read by a layer above; it is "
                         f"{shape_str(shape)}")
    return shape[0]


# --- torch's recurrent modules and the shipped cells that compute them ---------------------
# example -> (torch class, options beyond the sizes)
_TORCH_EQUIVALENTS = {
    "lstm": (nn.LSTM, {}),
    "projected_lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "elman": (nn.RNN, {"nonlinearity": "tanh"}),
    "elman_relu": (nn.RNN, {"nonlinearity": "relu"}),
}


def _shipped_source(example: str) -> str:
    """The text of examples/<example>.cell, shipped inside the package as rnnc.examples."""
    return resources.files("rnnc.examples").joinpath(f"{example}.cell").read_text()


def _example_for(net) -> str:
    """The shipped cell that computes `net`'s layers."""
    if type(net) is nn.LSTM:
        return "projected_lstm" if net.proj_size else "lstm"
    if type(net) is nn.GRU:
        return "gru"
    if type(net) is nn.RNN:
        return {"tanh": "elman", "relu": "elman_relu"}[net.nonlinearity]
    raise ValueError(f"from_torch: expected torch.nn.LSTM, GRU or RNN, got {type(net).__name__}")


def _shipped_program(example: str, net, recompute) -> Program:
    """The shipped cell `example` compiled for `net`'s sizes (cached: one per process)."""
    dims = (("D", net.input_size), ("H", net.hidden_size))
    if getattr(net, "proj_size", 0):
        dims += (("P", net.proj_size),)
    recompute = "auto" if recompute is None else recompute
    return _compiled(_Recipe(_shipped_source(example), example, dims,
                             recompute if isinstance(recompute, str) else tuple(recompute),
                             None, None, None, "float32", DEFAULT_PRECISION))


def _torch_weights(net, suffix: str) -> dict:
    """One layer and direction's parameters of a torch module, without the suffix."""
    return {n[:-len(suffix)]: p for n, p in net.named_parameters() if n.endswith(suffix)}


def _cell_params_of(w: dict, names) -> dict:
    """The params `names` of a shipped cell from torch's weights of one layer and direction
    (`weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`, `weight_hr`); differentiable."""
    zeros = w["weight_ih"].new_zeros(w["weight_ih"].shape[0])  # bias=False
    b_ih, b_hh = w.get("bias_ih", zeros), w.get("bias_hh", zeros)
    params = {"W": w["weight_ih"].t(), "U": w["weight_hh"].t()}
    if "R" in names:
        params["R"] = w["weight_hr"].t()
    if "b" in names:
        params["b"] = b_ih + b_hh
    else:
        params["b_i"], params["b_h"] = b_ih, b_hh
    return params


def _torch_weights_of(p: dict) -> dict:
    """The inverse: torch's weights of one layer from a shipped cell's params."""
    w = {"weight_ih": p["W"].t(), "weight_hh": p["U"].t()}
    if "R" in p:
        w["weight_hr"] = p["R"].t()
    if "b" in p:
        w["bias_ih"], w["bias_hh"] = p["b"], torch.zeros_like(p["b"])
    else:
        w["bias_ih"], w["bias_hh"] = p["b_i"], p["b_h"]
    return w
