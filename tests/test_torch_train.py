"""examples/train_copy_task.py learns: a compiled cell trains inside an ordinary torch loop."""
import io
import math

import pytest

pytest.importorskip("torch", reason="torch is an optional dependency (pip install 'rnnc[torch]'); "
                                    "the training example needs it")
from rnnc.examples.train_copy_task import ALPHABET, TextBar, train  # noqa: E402

STEPS, SEED = 300, 0
# guessing scores ln(4) = 1.386 per answer; the seeded run reaches about 0.09, and 0.4
# leaves room for other BLAS builds taking a slightly different float32 path
THRESHOLD = 0.4


def test_copy_task_loss_falls_below_threshold():
    losses = train(steps=STEPS, seed=SEED)
    assert len(losses) == STEPS
    assert abs(sum(losses[:10]) / 10 - math.log(ALPHABET)) < 0.1  # starts at chance
    tail = losses[-20:]
    assert sum(tail) / len(tail) < THRESHOLD


def test_text_bar_shows_progress_and_recent_loss():
    out = io.StringIO()
    bar = TextBar(total=4, width=8, out=out)
    for step, loss in enumerate([4.0, 2.0, 1.0, 1.0]):
        bar(step, loss)
    text = out.getvalue()
    assert "[####....] 2/4 loss 3.000" in text
    assert text.endswith("[########] 4/4 loss 2.000\n")
