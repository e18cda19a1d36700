"""Compiled modules on disk: `rnnc compile -o DIR` writes one, `rnnc.load(DIR)` reads it.

A directory holds `module.json` (format version, rnnc version, the cell's
source text and its hash, dims, recompute policy, precision, the Plan, kernel names,
launches and buffer layout, and the hash of every other file), `kernels.cu`,
`kernels.<arch>.cubin` when nvcc was there, and `cell.ir` (the IR, hoisting
and plan, for people).

An artifact may come from anyone, so loading trusts nothing in it: it reads
JSON and cubins only, never pickle; it opens only plain files directly inside
the directory, by the names the format allows (no links, no separators), each
up to the format's size limit; module.json is checked field by field before
any other file is opened; the program is rebuilt from the stored source, dims
and policy, and the stored plan, kernels and launches must be the ones this
rnnc makes of it; every other file must match its hash.

Writing goes to a temporary sibling directory that is renamed into place,
replacing only a complete artifact. Writers and loaders of a directory lock
its parent, so the copies a killed writer stranded (`.DIR.tmp-*`, `.DIR.old-*`)
are recovered by the next compile or load.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .driver import compile as compile_program
from .errors import CellError, Source
from .ir import format_cell
from .dtypes import NAMES as DTYPES
from .dtypes import storage
from .precision import PRECISIONS
from .precision import precision as find_precision

FORMAT = 1
MODULE = "module.json"
MiB = 1 << 20
# the files a directory may hold, each with the most bytes it may have (beyond: damage, never read)
LIMITS = {MODULE: 16 * MiB, "kernels.cu": 16 * MiB, "cell.ir": 16 * MiB, "cubin": 64 * MiB}
LISTED = re.compile(r"kernels\.cu|cell\.ir|kernels\.sm_[0-9]+[a-z]?\.cubin")  # names `files` may hold
REBUILD = "rebuild it with rnnc compile -o"
LOCK_WAIT = 30.0  # seconds a writer or loader waits for another one to finish with the parent directory


class ArtifactError(ValueError):
    """A missing, damaged or incompatible artifact file: `where` (the file or
    directory), `what` is wrong with it, and what to do."""

    def __init__(self, where, what: str, advice: str | None = REBUILD):
        self.where, self.what, self.advice = where, what, advice
        super().__init__(f"{where}: {what}" + (f"; {advice}" if advice else ""))

    def __reduce__(self):  # pickled (as multiprocessing does) with all three parts
        return type(self), (self.where, self.what, self.advice)


def rnnc_version() -> str:
    from . import __version__  # late: rnnc/__init__.py imports this module
    return __version__


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def policy_json(recompute):
    return recompute if isinstance(recompute, str) else list(recompute)


def size_limit(name: str) -> int:
    return LIMITS["cubin" if name.endswith(".cubin") else name]


# --- writing ---------------------------------------------------------------------------
def write(program, out_dir, arch: str | None = None, build: bool = True) -> dict:
    """Write `program` as an artifact directory; returns its module.json data.
    The program's `cuda` and `cubin` stages (rnnc/driver.py) make its files;
    the cubin is built for `arch` (default: the program's, else the local
    GPU's, else sm_80) when nvcc is there; `build=False` skips it."""
    from .backends.cuda.build import BuildError, check_arch, default_arch

    out = Path(out_dir)
    with _locked(out):  # checked before the build, and again before replacing
        _check_target(out)
    made = program.build("cuda")
    generated = made["cuda"]
    files = {"kernels.cu": generated.source.encode(), "cell.ir": describe(program).encode()}
    notes = []
    if build:
        arch = check_arch(arch or program.options.arch or default_arch())
        try:
            files[f"kernels.{arch}.cubin"] = program.build("cubin", made, arch=arch)["cubin"].data
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
        "recompute": policy_json(program.options.recompute),
        "precision": program.precision,
        "plan": program.plan.as_dict(),
        "target": "cuda",
        "kernels": generated.launches.kernels(),
        "launches": generated.launches.to_json(),
        "files": {name: sha256(data) for name, data in files.items()},
    }
    files[MODULE] = (json.dumps(module, indent=1) + "\n").encode()
    for name, data in files.items():  # never write what no loader would read
        if len(data) > size_limit(name):
            raise ArtifactError(name, f"{len(data)} bytes, more than the artifact format's "
                                      f"limit of {size_limit(name)}", None)
    _write_dir(out, files)
    return {**module, "notes": notes}


def describe(program) -> str:
    return "\n\n".join([format_cell(program.cell), program.hoisted.format(), program.plan.format()]) + "\n"


def _write_dir(out: Path, files: dict):
    """All files into a fresh temporary sibling of `out`, then renamed to `out`,
    replacing only a complete artifact (the old one is moved aside, then removed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _check_target(out)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            if out.exists():
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.replace(out, old / "artifact")
                os.replace(staging, out)
                shutil.rmtree(old)
            else:
                os.replace(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging)


def _check_target(out: Path):
    """`out` is absent, an empty directory, or a complete artifact holding only
    its own files: nothing of the user's is ever replaced."""
    here = Path.cwd().resolve()
    if out.name in ("", ".", "..") or out.resolve() in (here, *here.parents):
        raise ArtifactError(f"-o {out}", "name a directory of its own for the artifact (it is replaced "
                            "as a whole), not the current, parent or root directory", None)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise ArtifactError(out, f"exists and is {kind}, not an artifact directory", "refusing to "
                            "replace it (choose another -o)")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        module = _read(out).module
    except ArtifactError as err:
        raise ArtifactError(out, f"exists and is not a complete rnnc artifact ({Path(err.where).name}: "
                            f"{err.what})", "refusing to replace it: remove it yourself or choose "
                            "another -o") from None
    extra = sorted({p.name for p in out.iterdir()} - {MODULE, *module["files"]})
    if extra:
        raise ArtifactError(out, f"an rnnc artifact, but it also holds {', '.join(extra)}, which rnnc "
                            "did not write", "refusing to replace it (move them or choose another -o)")


# --- a parent directory's lock, and what killed writers left in it ------------------------------
@contextmanager
def _locked(out: Path):
    """Hold the lock of `out`'s parent directory, after recovering what a
    killed writer of `out` left there. Where the file system has no locks,
    nothing is locked (and nothing recovered)."""
    try:
        fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # no parent (the loader says so) or one we may not read: nothing to lock
        yield
        return
    try:
        if _lock(fd, out):
            _recover(out)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _lock(fd: int, out: Path) -> bool:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False  # locks unsupported here
        if time.monotonic() > deadline:
            raise ArtifactError(out, f"another rnnc process has held {out.parent} for {LOCK_WAIT:.0f} s "
                                "(compiling into or loading from it)", "try again when it has finished")
        time.sleep(0.05)


def _stranded(out: Path, kind: str) -> list:
    """The temporary directories of `kind` (tmp or old) writers of `out` left, newest first."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{kind}-[A-Za-z0-9_]{{8}}")
    found = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and not p.is_symlink() and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _recover(out: Path):
    """Under the lock, nobody is writing `out`: a copy moved aside by a writer
    killed between its two renames goes back in place, and every temporary
    copy left behind is removed."""
    try:
        if not os.path.lexists(out):
            for old in _stranded(out, "old"):
                if (old / "artifact").is_dir():
                    os.replace(old / "artifact", out)
                    break
        for left in _stranded(out, "tmp") + _stranded(out, "old"):
            shutil.rmtree(left, ignore_errors=True)
    except OSError:  # a directory we may not change: what is left stays, and loading says what is missing
        pass


# --- reading -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    directory: Path
    module: dict  # module.json, checked
    files: dict  # name -> bytes of every file module.json lists, each matching its hash


def read(directory) -> Artifact:
    """module.json, checked field by field, and every file it lists, read and
    checked against its hash."""
    d = Path(directory)
    with _locked(d):
        return _read(d)


def _read(d: Path) -> Artifact:
    try:
        dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        raise ArtifactError(d, "not a directory (an artifact is the directory `rnnc compile -o` "
                            "writes)", None) from None
    try:
        module = _parse(d / MODULE, _read_file(dir_fd, d, MODULE))
        return Artifact(d, module, {name: _checked(dir_fd, d, name, digest)
                                    for name, digest in module["files"].items()})
    finally:
        os.close(dir_fd)


def _read_file(dir_fd: int, d: Path, name: str) -> bytes:
    """The bytes of the plain file `name` directly inside the directory, up to its size limit.
    Opened without following links and without blocking, so a link, FIFO or
    device in the artifact's place is refused before anything is read."""
    path, limit = d / name, size_limit(name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ArtifactError(path, f"missing; {d} is not a complete rnnc artifact") from None
    except OSError as err:
        what = "a symbolic link" if err.errno == errno.ELOOP else f"unreadable ({err.strerror})"
        raise ArtifactError(path, f"{what}; an artifact holds plain files only") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(path, "not a plain file; an artifact holds plain files only")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ArtifactError(path, f"damaged (larger than the format's limit of {limit} bytes)")
    return data


def _checked(dir_fd: int, d: Path, name: str, digest: str) -> bytes:
    data = _read_file(dir_fd, d, name)
    if sha256(data) != digest:
        raise ArtifactError(d / name, f"damaged (its hash differs from the one in {MODULE})")
    return data


def _parse(path: Path, data: bytes) -> dict:
    """module.json as data, every field checked before anything else is read."""
    try:
        module = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ArtifactError(path, f"damaged (not valid JSON: {reason})") from None
    if not isinstance(module, dict) or not _is_int(module.get("format")) or module["format"] != FORMAT:
        found = module.get("format") if isinstance(module, dict) else None
        raise ArtifactError(path, f"format version {found!r:.40}, but this rnnc ({rnnc_version()}) "
                                  f"reads version {FORMAT}")
    for field, ok, expected in SCHEMA:
        value = _field(module, field)
        if not ok(value):
            raise ArtifactError(path, f"damaged ({field} is {_describe(value)}; expected {expected})")
    for name, digest in module["files"].items():
        if not LISTED.fullmatch(name):
            raise ArtifactError(path, f"damaged (files lists {json.dumps(name)[:60]}, which is not a file "
                                      "an artifact holds: kernels.cu, cell.ir, kernels.sm_NN.cubin)")
        if not _is_hash(digest):
            raise ArtifactError(path, f"damaged (the hash of {name} is {_describe(digest)}; expected "
                                      "64 hex digits)")
    if sha256(module["source"]["text"].encode()) != module["source"]["sha256"]:
        raise ArtifactError(path, "damaged (the cell source does not match its hash)")
    return module


_MISSING = object()


def _field(module: dict, dotted: str):
    value = module
    for key in dotted.split("."):
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
    return value


def _describe(value) -> str:
    return "missing" if value is _MISSING else f"{type(value).__name__} {json.dumps(value)[:40]}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_hash(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_count(v) -> bool:
    return v is None or (_is_int(v) and v > 0)


# each field of module.json that loading reads, what it must be, and how that is said
SCHEMA = (
    ("rnnc_version", lambda v: isinstance(v, str), "a string"),
    ("cell", lambda v: isinstance(v, str), "a cell name"),
    ("source", lambda v: isinstance(v, dict), "an object"),
    ("source.name", lambda v: isinstance(v, str), "a string"),
    ("source.text", lambda v: isinstance(v, str), "the cell's text"),
    ("source.sha256", _is_hash, "64 hex digits"),
    ("dims", lambda v: isinstance(v, dict) and all(_is_int(n) and n > 0 for n in v.values()),
     "dim names with positive integers"),
    ("recompute", lambda v: isinstance(v, str) or _is_str_list(v), "a policy or a list of names"),
    ("precision", lambda v: v in PRECISIONS, " or ".join(PRECISIONS)),
    ("plan", lambda v: isinstance(v, dict), "an object"),
    ("plan.budget", _is_count, "null or a positive integer"),
    ("plan.seq_len", _is_count, "null or a positive integer"),
    ("plan.batch", _is_count, "null or a positive integer"),
    ("plan.dtype", lambda v: v in DTYPES, " or ".join(DTYPES)),
    ("target", lambda v: v == "cuda", '"cuda"'),
    ("kernels", _is_str_list, "a list of kernel names"),
    ("launches", lambda v: isinstance(v, dict), "an object"),
    ("files", lambda v: isinstance(v, dict) and {"kernels.cu", "cell.ir"} <= set(v),
     "an object listing kernels.cu and cell.ir"),
)


def load(directory, backend: str = "numpy", dtype: str | None = None, precision: str | None = None):
    """A module from an artifact directory, on the NumPy or CUDA backend: the
    program is rebuilt from the stored source, dims, policy, budget and
    precision, and must be the one module.json and kernels.cu describe (see
    `_rebuild`). The NumPy backend runs any `precision`; the CUDA backend runs
    the kernels, so only the precision and dtype they were compiled for
    (a 16-bit dtype's artifact loads in it by default, on both)."""
    artifact = read(directory)
    program, generated = _rebuild(artifact)
    if backend != "cuda":
        return program.load(backend=backend, dtype=dtype, precision=precision)
    if precision is not None and find_precision(precision).name != program.precision:
        raise ArtifactError(artifact.directory, f"its kernels were compiled for precision "
                            f"{program.precision!r}, not {precision!r}",
                            f"rebuild it with rnnc compile --precision {precision}")
    if dtype is not None and storage(dtype).name != generated.dtype:
        raise ArtifactError(artifact.directory, f"its kernels were compiled for {generated.dtype} arrays, "
                            f"not {storage(dtype).name}", f"rebuild it with rnnc compile --dtype {storage(dtype).name}")
    from .backends.cuda.runtime import load as load_cuda
    d = artifact.directory

    def cubin_for(arch: str) -> Path:
        name = f"kernels.{arch}.cubin"
        if name not in artifact.files:
            built = [n for n in artifact.files if n.endswith(".cubin")]
            raise ArtifactError(d / name, f"missing; this GPU is {arch} and the artifact has "
                                f"{', '.join(built) or 'no cubin'}", f"rebuild it with rnnc compile --arch {arch}")
        return d / name  # a plain file, checked against its hash by `read`
    return load_cuda(program, generated.dtype, cubin_for=cubin_for, made={"cuda": generated})


def _rebuild(artifact: Artifact):
    """The program and CUDA code of the stored cell, which must be what module.json
    and kernels.cu say: an edit of either, or an artifact another rnnc version
    would build differently, is refused rather than run with kernels that do not fit."""
    module, path = artifact.module, artifact.directory / MODULE
    plan = module["plan"]
    source = Source(f"{path} (the cell source)", module["source"]["text"])
    try:
        program = compile_program(source, dims=module["dims"], cell=module["cell"],
                                  recompute=module["recompute"], memory_budget=plan["budget"],
                                  seq_len=plan["seq_len"], batch=plan["batch"], dtype=plan["dtype"],
                                  precision=module["precision"])
        generated = program.build("cuda")["cuda"]  # refuses sizes its kernels cannot index
    except (CellError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise ArtifactError(path, f"damaged (its cell does not compile: {first})") from None
    made = {"plan": program.plan.as_dict(), "kernels": generated.launches.kernels(),
            "launches": generated.launches.to_json()}
    for key, value in made.items():
        if json.loads(json.dumps(value)) != module[key]:
            raise ArtifactError(path, f"damaged ({key} is not what rnnc {rnnc_version()} makes of the "
                                f"stored cell; written by rnnc {module['rnnc_version']!r:.24}?)")
    if artifact.files["kernels.cu"] != generated.source.encode():
        raise ArtifactError(artifact.directory / "kernels.cu", f"not what rnnc {rnnc_version()} makes of "
                            f"the stored cell (written by rnnc {module['rnnc_version']!r:.24}?)")
    return program, generated
