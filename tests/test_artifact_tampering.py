"""Loading an artifact someone else made: it never reads outside its directory.

Every open while loading goes through a spy. A trap directory beside the
artifact holds a secret file and a FIFO; the spy fails the test when anything
under the trap is opened, or when a FIFO is opened in a way that would block.
Random edits of every manifest field and of every file must then give either
a one-line ArtifactError naming the artifact, or (for an edit that changes
nothing loading uses) a module that computes what the original did.
"""
from __future__ import annotations

import builtins
import copy
import hashlib
import io
import json
import os
import random
import stat
import sys

import numpy as np
import pytest

import rnnc
from rnnc.artifact import ArtifactError, load, write

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the spy reads /proc/self/fd")

# a cell of these tests' own: a gated update with a learned mixing vector
CELL = """
cell leaky {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H], U[H, H], b[H] = 0.1, mix[H] = 0.5

    cand = tanh(x @ W + h @ U + b)
    next h = mix * cand + (1 - mix) * h
    output y = cand * 2
}
"""
DIMS = {"D": 2, "H": 3}


class Escape(BaseException):
    """Raised by the spy: not an Exception, so nothing in rnnc can swallow it."""


class Spy:
    """Wraps os.open, io.open and builtins.open while installed."""

    def __init__(self, trap):
        self.traps = (os.path.realpath(trap), "/dev/zero")  # /dev/zero: a whole read never ends
        self.opened = []  # real paths opened

    @staticmethod
    def real(path, dir_fd, follow: bool) -> str:
        """The file an open reaches (a last link is not followed with O_NOFOLLOW: that open fails)."""
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        if follow:
            return os.path.realpath(path)
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def check(self, path, flags: int, dir_fd=None):
        follow = not flags & os.O_NOFOLLOW
        real = self.real(path, dir_fd, follow)
        self.opened.append(real)
        if any(real == t or real.startswith(t + os.sep) for t in self.traps):
            raise Escape(f"opened {real}, outside the artifact")
        try:
            fifo = stat.S_ISFIFO(os.stat(path, dir_fd=dir_fd, follow_symlinks=follow).st_mode)
        except OSError:
            fifo = False
        if fifo and not flags & os.O_NONBLOCK:
            raise Escape(f"opened the FIFO {real} in a way that blocks")

    def install(self, monkeypatch):
        real_os_open, real_io_open = os.open, io.open

        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            self.check(path, flags, dir_fd)
            return real_os_open(path, flags, mode, dir_fd=dir_fd)

        def any_open(file, *args, **kwargs):
            if not isinstance(file, int):
                self.check(file, 0)
            return real_io_open(file, *args, **kwargs)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(io, "open", any_open)
        monkeypatch.setattr(builtins, "open", any_open)


@pytest.fixture
def setting(tmp_path, monkeypatch):
    """(artifact directory, trap directory, spy, the original's outputs)."""
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "secret").write_bytes(b"secret\n")
    os.mkfifo(trap / "fifo")
    original = tmp_path / "original"
    write(rnnc.compile(CELL, dims=DIMS), original, build=False)
    add_file(original, "kernels.sm_80.cubin", b"\x7fELF not really a cubin")
    spy = Spy(trap)
    spy.install(monkeypatch)
    return original, trap, spy, outputs(load(original))


def add_file(d, name: str, data: bytes):
    (d / name).write_bytes(data)
    module = json.loads((d / "module.json").read_text())
    module["files"][name] = hashlib.sha256(data).hexdigest()
    (d / "module.json").write_text(json.dumps(module))


def outputs(module) -> dict:
    rng = np.random.default_rng(0)
    params = module.init_params(1)
    result = module.forward(inputs={"x": rng.normal(size=(3, 2, DIMS["D"]))}, params=params)
    grads = module.backward(result, {"y": np.ones_like(result.outputs["y"])})
    return {"y": result.outputs["y"], **{f"d{k}": v for k, v in grads.params.items()}}


def outcome(d, expected: dict) -> str:
    """'error' (after checking it is clean) or 'same' (after checking the results are)."""
    try:
        module = load(d)
    except ArtifactError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(str(d)), message
        return "error"
    got = outputs(module)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    return "same"


# --- what a tampered value becomes -------------------------------------------------------------
def replacements(value, trap, rng) -> list:
    outside = [str(trap / "secret"), "../trap/secret", str(trap / "fifo"), "../trap/fifo", "/dev/zero"]
    generic = [None, True, False, 0, -1, 1, 2 ** 70, 1.5, float("inf"), "", "x", "kernels.cu",
               "sm_\u0668\u0660", [], {}, [1, [2]], {"a": 1}, *outside]
    typed = []
    if isinstance(value, bool):
        typed = [not value]
    elif isinstance(value, int):
        typed = [value + 1, value - 1, value * 1000]
    elif isinstance(value, str):
        typed = [value + "x", value[:-1], value.upper(), "../" + value, value + "/..", outside[0]]
    elif isinstance(value, list) and value:
        typed = [value[1:], value + value[:1], value[::-1]]
    elif isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        typed = [{k: v for k, v in value.items() if k != key}, {**value, "extra": 1},
                 {**value, **{outside[1]: value[key]}}, {**value, **{outside[0]: value[key]}}]
    return typed + generic


def leaf_paths(data, prefix=()):
    """Every path into the JSON data, containers and leaves."""
    yield prefix
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        yield from leaf_paths(v, prefix + (k,))


def set_at(data, path, value):
    if not path:
        return value
    target = data
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return data


def test_random_edits_of_every_manifest_field(setting, tmp_path):
    original, trap, spy, expected = setting
    module = json.loads((original / "module.json").read_text())
    rng = random.Random(7)
    paths = list(leaf_paths(module))
    # every field near the top, and a sample of the launches' thousands of leaves
    chosen = [p for p in paths if len(p) <= 2 or p[0] != "launches"]
    chosen += rng.sample([p for p in paths if len(p) > 2 and p[0] == "launches"], 25)
    seen = {"error": 0, "same": 0}
    for n, path in enumerate(chosen):
        value = _get(module, path)
        new = rng.choice([r for r in replacements(value, trap, rng) if json.dumps(r) != json.dumps(value)])
        d = tmp_path / f"edit{n}"
        os.mkdir(d)
        for f in original.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        (d / "module.json").write_text(json.dumps(set_at(copy.deepcopy(module), path, new)))
        result = outcome(d, expected)
        if result == "same":  # only a field loading does not use may change harmlessly
            assert path[:1] in (("rnnc_version",), ("source",)) and path[:2] != ("source", "text"), path
        seen[result] += 1
    assert seen["error"] > len(chosen) // 2
    assert not any(p.startswith(str(trap)) for p in spy.opened)


def _get(data, path):
    for k in path:
        data = data[k]
    return data


def damage_file(d, name, trap, rng) -> str:
    path = d / name
    data = path.read_bytes()
    how = rng.choice(["truncate", "flip", "append", "delete", "link out", "link in", "fifo", "directory",
                      "empty"])
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "flip":
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])
    elif how == "append":
        path.write_bytes(data + b"\n{}")
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        if how == "link out":
            path.symlink_to(trap / rng.choice(["secret", "fifo"]))
        elif how == "link in":  # a link to the artifact's own intact copy is refused too
            (d / f".{name}.copy").write_bytes(data)
            path.symlink_to(d / f".{name}.copy")
        elif how == "fifo":
            os.mkfifo(path)
        elif how == "directory":
            path.mkdir()
    return how


def test_random_damage_of_every_file(setting, tmp_path):
    original, trap, spy, expected = setting
    rng = random.Random(11)
    names = sorted(p.name for p in original.iterdir())
    for n in range(40):
        d = tmp_path / f"damage{n}"
        os.mkdir(d)
        for f in original.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        name = names[n % len(names)]
        how = damage_file(d, name, trap, rng)
        assert outcome(d, expected) == "error", (name, how)
    assert not any(p.startswith(str(trap)) for p in spy.opened)


@pytest.mark.parametrize("listed", ["{trap}/secret", "../trap/secret", "{trap}/fifo", "../trap/fifo",
                                    "/dev/zero", "sub/kernels.cu", "..", ".", "kernels.sm_\u0668\u0660.cubin"])
def test_names_outside_the_format_are_refused_unread(setting, listed):
    """Whether the hash of an outside file matches or not, the answer is the same
    and nothing outside is opened: the loader does not tell what a file holds."""
    original, trap, spy, _ = setting
    name = listed.format(trap=trap)
    module = json.loads((original / "module.json").read_text())
    messages = []
    for digest in (hashlib.sha256(b"secret\n").hexdigest(), "0" * 64):
        module["files"][name] = digest
        (original / "module.json").write_text(json.dumps(module))
        with pytest.raises(ArtifactError, match="not a file an artifact holds") as err:
            load(original)
        messages.append(str(err.value).replace(digest, ""))
    assert messages[0] == messages[1]
    assert not any(p.startswith(str(trap)) for p in spy.opened)


def test_nothing_is_read_before_module_json_validates(setting):
    original, trap, spy, _ = setting
    module = json.loads((original / "module.json").read_text())
    module["dims"]["H"] = "3"
    (original / "module.json").write_text(json.dumps(module))
    spy.opened.clear()
    with pytest.raises(ArtifactError, match=r"dims is dict .*expected dim names with positive integers"):
        load(original)
    inside = [p for p in spy.opened if p.startswith(str(original.resolve()) + os.sep)]
    assert inside == [str((original / "module.json").resolve())]


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"format": 1, "files": ' * 50_000])
def test_deeply_nested_module_json_is_a_clean_error(setting, text):
    original = setting[0]
    (original / "module.json").write_text(text)
    assert outcome(original, {}) == "error"


def test_files_over_the_size_limit_are_not_read_whole(setting, monkeypatch):
    original = setting[0]
    monkeypatch.setitem(rnnc.artifact.LIMITS, "cell.ir", 100)
    with pytest.raises(ArtifactError, match=r"cell\.ir: damaged \(larger than the format's limit of 100 bytes\)"):
        load(original)
