"""PyTorch integration: a compiled cell as an `nn.Module` with autograd.

    import rnnc.torch
    cell = rnnc.torch.Cell("examples/lstm.cell", dims={"D": 32, "H": 64})
    outputs, states = cell(x)          # x: [T, B, D]; outputs["y"]: [T, B, H]
    outputs["y"].sum().backward()      # gradients reach cell.W, cell.U, cell.b

The whole sequence, forward and backward through time, is one
`torch.autograd.Function`. CPU tensors (float32, float64, bfloat16 or
float16) run on rnnc's NumPy backend, sharing memory with the tensors. Under
`torch.autocast` (bfloat16 or float16) the Cell casts its float tensors,
params included, to the autocast dtype on the way in, so the parameters and
their gradients stay float32, as autocast's own ops do. CUDA tensors run on rnnc's
CUDA backend without a copy through the host, relying on what that backend
does:

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

PyTorch is an optional extra: `pip install 'rnnc[torch]'`.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from importlib import resources

import numpy as np

try:
    import torch
    from torch import nn
    from torch.autograd.function import once_differentiable
except ImportError as err:  # rnnc itself does not need torch
    raise ImportError("rnnc.torch needs PyTorch, an optional extra of rnnc: "
                      "pip install 'rnnc[torch]'") from err

from .driver import Program
from .driver import compile as compile_cell
from .dtypes import storage
from .ir import format_cell

__all__ = ["Cell"]

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
                f"loaded: {err} (or keep the cell and its tensors on the CPU: cell.cpu(), .cpu())"
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


def _run_forward(backend, layout, lengths, draws: dict, tensors, train: bool):
    """(backend result, output tensors in cell order, final state tensors in cell order);
    `draws`: forward's `seed` and `stochastic`."""
    args = _unflatten(layout, [backend.to_array(t) for t in tensors])
    with backend.call():
        res = backend.module.forward(**args, lengths=lengths, train=train, **draws)
    outs = backend.to_tensors(list(res.outputs.values()) + list(res.states.values()))
    return res, outs[:len(res.outputs)], outs[len(res.outputs):]


def _cotangents(backend, names, grads) -> dict:
    """{name: array} of the cotangents torch gives; an unused result's (None) is left out,
    which the backends read as zero."""
    return {n: backend.to_array(g) for n, g in zip(names, grads) if g is not None}


class _CellFunction(torch.autograd.Function):
    """forward(backend, layout, lengths, draws, *tensors) -> (*outputs, *final states)."""

    ARGUMENTS = 4  # before the tensors

    @staticmethod
    def forward(ctx, backend, layout, lengths, draws, *tensors):
        res, outputs, finals = _run_forward(backend, layout, lengths, draws, tensors, train=True)
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


# --- the module ---------------------------------------------------------------------------
class Cell(nn.Module):
    """A compiled recurrent cell as an `nn.Module`.

    `Cell(path_or_text, dims=..., recompute="auto", cell=None)` compiles a
    `.cell` file (or text); `Cell(program)` takes an `rnnc.compile` result.
    Each param of the cell is an `nn.Parameter` of the same name (`cell.W`;
    a name that `nn.Module` already uses, such as `float`, is reachable as
    `cell.params["float"]` and in `named_parameters()`), initialised by the
    cell's initialisers with `seed`, in `dtype` (default: torch's default).

    `forward(inputs, states=None, contexts=None, lengths=None)` takes dicts of
    tensors by name (`inputs` may be a single tensor when the cell has one
    input): inputs `[T, B, ...]`, states and contexts `[B, ...]`, `lengths`
    `[B]` integers (a tensor, array or list). It returns `(outputs,
    final_states)`, dicts of tensors. Missing initial states are zeros. Past
    an element's length its states carry over and its outputs are zero, as
    with PyTorch's packed sequences. All tensors share one device and dtype:
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
                 cell: str | None = None, seed: int = 0, dtype: torch.dtype | None = None):
        super().__init__()
        self.program = _program(program_or_path, dims, recompute, cell)
        self._backends = {}  # (device, dtype) -> backend, made on first use
        dtype = dtype or torch.get_default_dtype()
        cpu = self._backend(torch.device("cpu"), dtype)
        # plain attributes above, parameters below: nn.Module refuses a plain
        # attribute over a parameter's name, and a param may be named `program`
        initial = cpu.module.init_params(seed)
        for name, tensor in zip(initial, cpu.to_tensors(list(initial.values()))):
            self._add_parameter(name, nn.Parameter(tensor))

    def _add_parameter(self, name: str, param: nn.Parameter):
        if hasattr(self, name):
            # register_parameter refuses names nn.Module already has ('float', 'train');
            # held in _parameters they still take part in everything torch does with them
            self._parameters[name] = param
        else:
            self.register_parameter(name, param)

    @property
    def params(self) -> dict:
        """{name: parameter} in the cell's declaration order."""
        return {d.name: self._parameters[d.name] for d in self.program.cell.of_kind("param")}

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.program.cell.dims)
        return f"{self.program.cell.name}, {dims}"

    def _backend(self, device: torch.device, dtype: torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"rnnc.torch.Cell: dtype {dtype} is not supported (float32, float64, "
                             f"bfloat16 or float16: convert with .float(), say)")
        key = (device, dtype)
        if key not in self._backends:
            kind = {"cpu": _NumpyBackend, "cuda": _CudaBackend}.get(device.type)
            if kind is None:
                raise ValueError(f"rnnc.torch.Cell: device {device} is not supported (cpu or cuda)")
            self._backends[key] = kind(self.program, DTYPES[dtype], device)
        return self._backends[key]

    def forward(self, inputs, states: dict | None = None, contexts: dict | None = None,
                lengths=None):
        named = {"inputs": self._named_inputs(inputs), "params": self.params,
                 "states": dict(states or {}), "contexts": dict(contexts or {})}
        layout = tuple((kind, name) for kind in KINDS for name in named[kind])
        tensors = _autocast([named[kind][name] for kind, name in layout])
        device, dtype = _common_device_dtype(layout, tensors)
        backend = self._backend(device, dtype)
        lengths = _host_lengths(lengths)
        draws = self._draws()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            results = _CellFunction.apply(backend, layout, lengths, draws, *tensors)
            n_out = len(self.program.cell.outputs)
            outputs, finals = results[:n_out], results[n_out:]
        else:  # nothing to differentiate: keep nothing for a backward
            _, outputs, finals = _run_forward(backend, layout, lengths, draws, tensors, train=False)
        cell = self.program.cell
        return (dict(zip((o for o, _ in cell.outputs), outputs)),
                dict(zip((d.name for d in cell.of_kind("state")), finals)))

    def _draws(self) -> dict:
        """forward's `seed` and `stochastic` for this call: a cell that draws
        takes its seed from torch's default generator (one that does not
        leaves the generator as it is)."""
        draws = any(d.kind == "key" for d in self.program.cell.decls)
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if draws else 0
        return {"seed": seed, "stochastic": self.training}

    def _named_inputs(self, inputs) -> dict:
        if isinstance(inputs, torch.Tensor):
            names = [d.name for d in self.program.cell.of_kind("input")]
            if len(names) != 1:
                raise ValueError(f"inputs: cell '{self.program.cell.name}' has inputs "
                                 f"{', '.join(names)}; pass a dict {{name: tensor}}")
            return {names[0]: inputs}
        return dict(inputs)

    # --- weights from and to torch.nn.LSTM / torch.nn.GRU --------------------------------
    @classmethod
    def from_torch(cls, net: nn.Module, recompute=None) -> "Cell":
        """A Cell running the shipped `lstm` or `gru` example with `net`'s weights.

        `net` is a single-layer, unidirectional `nn.LSTM` (no projection) or
        `nn.GRU`; its input size is D and hidden size H. Gate rows keep
        torch's order along the last axis (LSTM i, f, g, o; GRU r, z, n):
        `W = weight_ih_l0.T` [D, G*H], `U = weight_hh_l0.T` [H, G*H].
        Biases: the LSTM's `b = bias_ih_l0 + bias_hh_l0` (it only ever uses
        their sum); the GRU keeps both, `b_i = bias_ih_l0`, `b_h = bias_hh_l0`
        (r multiplies the hidden bias of n). Without biases (`bias=False`)
        they are zero. `batch_first` does not change the weights, but Cell
        always takes `[T, B, ...]`. The Cell has `net`'s dtype and device.
        """
        kind = _torch_kind(net)
        D, H = net.input_size, net.hidden_size
        w = dict(net.named_parameters())
        like = w["weight_ih_l0"]
        cell = cls(_shipped_source(kind), dims={"D": D, "H": H}, recompute=recompute,
                   dtype=like.dtype).to(like.device)
        zeros = torch.zeros(len(_GATES[kind]) * H, dtype=like.dtype, device=like.device)
        b_ih, b_hh = w.get("bias_ih_l0", zeros), w.get("bias_hh_l0", zeros)
        biases = {"b": b_ih + b_hh} if kind == "lstm" else {"b_i": b_ih, "b_h": b_hh}
        new = {"W": w["weight_ih_l0"].t(), "U": w["weight_hh_l0"].t(), **biases}
        with torch.no_grad():
            for name, value in new.items():
                cell.params[name].copy_(value)
        return cell

    def to_torch(self) -> nn.Module:
        """The `nn.LSTM` or `nn.GRU` with this Cell's weights (inverse of `from_torch`).

        Only for Cells of the shipped `lstm` or `gru` example. The LSTM's single
        bias `b` goes to `bias_ih_l0`, and `bias_hh_l0` is zero (torch adds the two).
        """
        kind = self._shipped_kind()
        p = self.params
        D, H = p["W"].shape[0], p["U"].shape[0]
        net = (nn.LSTM if kind == "lstm" else nn.GRU)(D, H, dtype=p["W"].dtype, device=p["W"].device)
        b_ih, b_hh = (p["b"], torch.zeros_like(p["b"])) if kind == "lstm" else (p["b_i"], p["b_h"])
        new = {"weight_ih_l0": p["W"].t(), "weight_hh_l0": p["U"].t(),
               "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
        with torch.no_grad():
            for name, value in net.named_parameters():
                value.copy_(new[name])
        return net

    def _shipped_kind(self) -> str:
        """'lstm' or 'gru' when this Cell's step is exactly that shipped example's."""
        cell = self.program.cell
        dims = dict(cell.dims)
        if set(dims) == {"D", "H"}:
            for kind in _GATES:
                shipped = compile_cell(_shipped_source(kind), dims=dims).cell
                if format_cell(shipped) == format_cell(cell):
                    return kind
        raise ValueError(f"to_torch: cell '{cell.name}' is not the shipped lstm or gru example, "
                         f"so it has no torch.nn equivalent")


_GATES = {"lstm": "ifgo", "gru": "rzn"}  # torch's gate order along the weights' gate axis


def _shipped_source(kind: str) -> str:
    """The text of examples/<kind>.cell, shipped inside the package as rnnc.examples."""
    return resources.files("rnnc.examples").joinpath(f"{kind}.cell").read_text()


def _torch_kind(net) -> str:
    """'lstm' or 'gru' for an nn.LSTM/nn.GRU that the shipped cells can represent."""
    kind = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(type(net))
    if kind is None:
        raise ValueError(f"from_torch: expected torch.nn.LSTM or torch.nn.GRU, got {type(net).__name__}")
    unsupported = [what for what, bad in (
        (f"num_layers={net.num_layers} (only 1)", net.num_layers != 1),
        ("bidirectional=True (only unidirectional)", net.bidirectional),
        (f"proj_size={getattr(net, 'proj_size', 0)} (only 0)", getattr(net, "proj_size", 0)),
    ) if bad]
    if unsupported:
        raise ValueError(f"from_torch: unsupported {type(net).__name__}: {', '.join(unsupported)}; "
                         f"stack single-layer Cells instead")
    return kind


def _program(program_or_path, dims, recompute, cell) -> Program:
    if isinstance(program_or_path, Program):
        options = (("dims", dims), ("recompute", recompute), ("cell", cell))
        given = [k for k, v in options if v is not None]
        if given:
            raise ValueError(f"Cell: {', '.join(given)} apply only when compiling from a path or text; "
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
                             f"{device}; all tensors of a Cell share one (use .to(...))")
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
