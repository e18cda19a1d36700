"""Compiled modules on disk: `rnnc compile -o DIR` writes one, `rnnc.load(DIR)` reads it.

A directory holds `module.json` (format version, rnnc version, the cell's
source text and its hash, dims, recompute policy, the Plan, kernel names,
launches and buffer layout, and the hash of every other file), `kernels.cu`,
`kernels.<arch>.cubin` when nvcc was there, and `cell.ir` (the IR, hoisting
and plan, for people). Loading reads JSON and cubins only, never pickle: the
program is rebuilt from the stored source, dims and policy, and every file is
checked against its hash. Writing goes to a temporary directory that is
renamed into place, so an interrupted compile leaves no half-written artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .driver import compile as compile_program
from .ir import format_cell

FORMAT = 1
MODULE = "module.json"


class ArtifactError(ValueError):
    """A missing, damaged or incompatible artifact file (the message names it)."""


def rnnc_version() -> str:
    from . import __version__  # late: rnnc/__init__.py imports this module
    return __version__


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def policy_json(recompute):
    return recompute if isinstance(recompute, str) else list(recompute)


# --- writing ---------------------------------------------------------------------------
def write(program, out_dir, recompute="auto", arch: str | None = None, build: bool = True) -> dict:
    """Write `program` as an artifact directory; returns its module.json data.
    The cubin is built for `arch` (default: the local GPU's, else sm_80) when
    nvcc is there; `build=False` skips it."""
    from .backends.cuda.build import BuildError, check_arch, compile_cubin, default_arch
    from .backends.cuda.lowering import generate

    generated = generate(program)
    files = {"kernels.cu": generated.source.encode(), "cell.ir": describe(program).encode()}
    notes = []
    if build:
        arch = check_arch(arch or default_arch())
        try:
            files[f"kernels.{arch}.cubin"] = compile_cubin(generated.source, arch).path.read_bytes()
        except BuildError as err:
            if "not found" not in str(err):
                raise
            notes.append(f"no cubin: {err}")
    source = program.source.text
    module = {
        "format": FORMAT,
        "rnnc_version": rnnc_version(),
        "cell": program.cell.name,
        "source": {"name": Path(program.source.name).name, "text": source, "sha256": sha256(source.encode())},
        "dims": {k: v for k, v in program.cell.dims},
        "recompute": policy_json(recompute),
        "plan": program.plan.as_dict(),
        "target": "cuda",
        "kernels": generated.schedule.kernels(),
        "schedule": generated.schedule.to_json(),
        "files": {name: sha256(data) for name, data in files.items()},
    }
    files[MODULE] = (json.dumps(module, indent=1) + "\n").encode()
    _write_dir(Path(out_dir), files)
    return {**module, "notes": notes}


def describe(program) -> str:
    return "\n\n".join([format_cell(program.cell), program.hoisted.format(), program.plan.format()]) + "\n"


def _write_dir(out: Path, files: dict):
    """All files into a fresh temporary sibling of `out`, then renamed to `out`."""
    if out.exists() and not (out / MODULE).exists() and any(out.iterdir()):
        raise ArtifactError(f"{out}: exists and is not an rnnc artifact; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if out.exists():  # an old artifact: moved aside, replaced, then removed
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "artifact")
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# --- reading -------------------------------------------------------------------------------
def read_module(directory) -> dict:
    """module.json, checked, and every file it lists checked against its hash."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d}: not a directory (an artifact is the directory `rnnc compile -o` writes)")
    path = d / MODULE
    try:
        module = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; {d} is not a complete rnnc artifact "
                            "(rebuild it with rnnc compile -o)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: damaged (not valid JSON: {err}); rebuild it with rnnc compile -o") from None
    if not isinstance(module, dict) or module.get("format") != FORMAT:
        found = module.get("format") if isinstance(module, dict) else None
        raise ArtifactError(f"{path}: format version {found!r}, but this rnnc ({rnnc_version()}) reads "
                            f"version {FORMAT}; rebuild it with rnnc compile -o")
    try:
        text, digest, listed = module["source"]["text"], module["source"]["sha256"], module["files"]
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: damaged (no {err} entry); rebuild it with rnnc compile -o") from None
    if sha256(text.encode()) != digest:
        raise ArtifactError(f"{path}: damaged (the cell source does not match its hash)")
    for name, expected in listed.items():
        try:
            data = (d / name).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{d / name}: missing (listed in {MODULE}); rebuild the artifact "
                                "with rnnc compile -o") from None
        if sha256(data) != expected:
            raise ArtifactError(f"{d / name}: damaged (its hash differs from the one in {MODULE})")
    return module


def load(directory, backend: str = "numpy", dtype: str | None = None):
    """A module from an artifact directory, on the NumPy or CUDA backend: the
    program is rebuilt from the stored source, dims, policy and budget."""
    d = Path(directory)
    module = read_module(d)
    plan = module["plan"]
    program = compile_program(module["source"]["text"], dims=module["dims"], cell=module["cell"],
                              recompute=module["recompute"], memory_budget=plan["budget"],
                              seq_len=plan["seq_len"], batch=plan["batch"], dtype=plan["dtype"])
    if backend != "cuda":
        return program.load(backend=backend, dtype=dtype)
    from .backends.cuda.schedule import Generated, Schedule
    from .backends.cuda.runtime import load as load_cuda
    generated = Generated((d / "kernels.cu").read_text(), Schedule.from_json(module["schedule"]))

    def cubin_for(arch: str) -> Path:
        path = d / f"kernels.{arch}.cubin"
        if f"kernels.{arch}.cubin" not in module["files"]:
            built = [n for n in module["files"] if n.endswith(".cubin")]
            raise ArtifactError(f"{path}: missing; this GPU is {arch} and the artifact has "
                                f"{', '.join(built) or 'no cubin'} (rebuild with rnnc compile --arch {arch})")
        return path
    return load_cuda(program, dtype or "float32", generated, cubin_for)
