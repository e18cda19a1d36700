"""`rnnc gradcheck`, `rnnc run` and `rnnc emit --stage hoist|grad` from the command line."""
import pytest

from conftest import example
from rnnc.cli import main



def test_gradcheck_passes_and_reports_every_argument(capsys):
    code = main(["gradcheck", str(example("gru")), "-D", "D=3", "-D", "H=2", "--lengths"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("params['W']", "inputs['x']", "states['h']", "worst relative error", "ok"):
        assert name in out


def test_gradcheck_fails_above_tolerance(capsys):
    # float64 central differences are good to ~1e-9 here, never to 1e-30
    code = main(["gradcheck", str(example("lstm")), "-D", "D=2", "-D", "H=2",
                 "--tolerance", "1e-30"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out


def test_run_prints_shapes(capsys):
    code = main(["run", str(example("attention_lstm")), "-D", "D=3", "-D", "H=4", "-D", "E=5",
                 "-D", "S=6", "--seq-len", "7", "--batch", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "output y: [7, 2, 4]" in out and "state ctx: [2, 5]" in out and "d param We: [5, 5]" in out


def test_missing_dims_is_a_user_error(capsys):
    assert main(["run", str(example("lstm"))]) == 1
    assert "D, H" in capsys.readouterr().err


@pytest.mark.parametrize("stage,words", [
    ("hoist", ["once per sequence", "all steps at once", "per step", "dot(x, W"]),
    ("grad", ["backward of step", "d:h_new", "gives"]),
])
def test_emit_later_stages(capsys, stage, words):
    assert main(["emit", str(example("lstm")), "--stage", stage, "-D", "D=3", "-D", "H=2"]) == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out


def test_a_path_with_a_brace_is_still_a_path(tmp_path, capsys):
    path = tmp_path / "odd{name}.cell"
    path.write_text(example("indrnn").read_text())
    assert main(["check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["plan", "cuda"])
def test_emit_of_sized_stages_needs_dims(capsys, stage):
    assert main(["emit", str(example("lstm")), "--stage", stage]) == 1
    assert "need values" in capsys.readouterr().err


def test_emit_plan_follows_recompute(capsys):
    args = ["emit", str(example("lstm")), "--stage", "plan", "-D", "D=3", "-D", "H=2"]
    assert main(args + ["--recompute", "none"]) == 0
    assert "recomputed: (none)" in capsys.readouterr().out
    assert main(args + ["--recompute", "all"]) == 0
    out = capsys.readouterr().out
    assert "stored per step: h, c\n" in out and "recompute=all" in out
