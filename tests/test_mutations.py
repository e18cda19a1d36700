"""tests/mutations.py stays runnable: every planted mistake finds the text it replaces."""
import pytest

import mutations


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.what)
def test_each_mistake_finds_its_text(mutation):
    assert mutations.planted(mutation) != (mutations.ROOT / mutation.path).read_text()


def test_the_mistakes_the_issue_names_are_planted():
    named = {m.what for m in mutations.MUTATIONS}
    assert {"min as fmaxf", "log as log2f", "abs as the identity", "softplus as relu",
            "transpose as the identity", "softmax without the max shift"} <= named
