"""The training examples learn: compiled cells train inside ordinary torch loops."""
import io
import math

import pytest

pytest.importorskip("torch", reason="torch is an optional dependency (pip install 'rnnc[torch]'); "
                                    "the training example needs it")
from rnnc.examples.training import TextBar  # noqa: E402
from rnnc.examples import train_tagger  # noqa: E402
from rnnc.examples.train_copy_task import ALPHABET, train  # noqa: E402

STEPS, SEED = 300, 0
# guessing scores ln(4) = 1.386 per answer; the seeded run reaches about 0.09, and 0.4
# leaves room for other BLAS builds taking a slightly different float32 path
THRESHOLD = 0.4


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: threads only add overhead, and much of it on a busy machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_copy_task_loss_falls_below_threshold():
    losses = train(steps=STEPS, seed=SEED)
    assert len(losses) == STEPS
    assert abs(sum(losses[:10]) / 10 - math.log(ALPHABET)) < 0.1  # starts at chance
    tail = losses[-20:]
    assert sum(tail) / len(tail) < THRESHOLD


def test_bidirectional_tagger_learns_what_one_direction_cannot():
    """A tag needs both neighbours: one direction stays at chance, ln(4) = 1.386; the seeded
    run falls to about 0.17 in 80 steps (seeds 0 to 3: 0.14 to 0.27), and to 0.001 in 200."""
    losses = train_tagger.train(steps=80, seed=0)
    chance = math.log(train_tagger.ALPHABET)
    assert abs(sum(losses[:10]) / 10 - chance) < 0.1
    assert sum(losses[-10:]) / 10 < 0.5


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_text_bar_redraws_on_a_terminal():
    out = Terminal()
    bar = TextBar(total=20, width=10, out=out)
    for step in range(20):
        bar(step, 4.0 if step < 10 else 1.0)
    text = out.getvalue()
    assert text.count("\r") == 20  # every step redraws the line
    assert "\r[#.........] 2/20 loss 4.000\n" in text  # a line kept every tenth of the way
    assert "\r[..........] 1/20 loss 4.000\r" in text  # the others overwritten
    assert text.endswith("\r[##########] 20/20 loss 1.000\n")


def test_text_bar_prints_plain_lines_elsewhere():
    out = io.StringIO()  # a log file or a pipe
    bar = TextBar(total=20, width=10, out=out)
    for step in range(20):
        bar(step, 4.0 if step < 10 else 1.0)
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and len(lines) == 10 + 1
    assert lines[0] == "[#.........] 2/20 loss 4.000"
    assert lines[-2] == "[##########] 20/20 loss 1.000"
