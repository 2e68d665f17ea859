"""Unit tests of the pure on-policy splice (no server)."""

import pytest

from sglgym.engine.onpolicy import CarriedIdsError, nth_index, splice_carried_prefix

EOS = 2


def test_nth_index():
    assert nth_index([5, 2, 7, 2, 2], 2, 1) == 1
    assert nth_index([5, 2, 7, 2, 2], 2, 3) == 4
    assert nth_index([5, 2, 7, 2, 2], 2, 4) == -1


def test_carried_ids_replace_retokenized_prefix():
    # The model generated [30, 31] where re-tokenizing its text gives [99]: the prompt must keep [30, 31].
    carried = [1, 10, 11, EOS, 1, 20, 30, 31, EOS]
    template_prefix = [1, 10, 11, EOS, 1, 20, 99, EOS]
    template = [1, 10, 11, EOS, 1, 20, 99, EOS, 3, 1, 40, 41, EOS, 3, 1, 20]
    out = splice_carried_prefix(carried, template_prefix, template, EOS)
    assert out == [1, 10, 11, EOS, 1, 20, 30, 31, EOS, 3, 1, 40, 41, EOS, 3, 1, 20]
    assert out[: len(carried)] == carried  # contiguity: everything seen so far is a prefix


def test_generation_without_eos_stopped_by_max_tokens():
    carried = [1, 10, EOS, 1, 20, 30]  # no trailing EOS: the template's own EOS closes the turn
    template_prefix = [1, 10, EOS, 1, 20, 31, EOS]
    template = template_prefix + [3, 1, 50, EOS, 3, 1, 20]
    out = splice_carried_prefix(carried, template_prefix, template, EOS)
    assert out == [1, 10, EOS, 1, 20, 30, EOS, 3, 1, 50, EOS, 3, 1, 20]


def test_template_that_drops_earlier_reasoning_uses_nth_eos():
    # The prefix render keeps <think> tokens (7, 8) that the full render drops from history: the tail
    # must start at the 2nd EOS of the full render, not at len(template_prefix).
    carried = [1, 10, EOS, 1, 7, 8, 20, EOS]
    template_prefix = [1, 10, EOS, 1, 7, 8, 20, EOS]
    template = [1, 10, EOS, 1, 20, EOS, 3, 1, 60, EOS, 3, 1]
    out = splice_carried_prefix(carried, template_prefix, template, EOS)
    assert out == [1, 10, EOS, 1, 7, 8, 20, EOS, 3, 1, 60, EOS, 3, 1]


def test_empty_carried_returns_template():
    assert splice_carried_prefix([], [1, EOS], [1, EOS, 3], EOS) == [1, EOS, 3]


def test_errors():
    with pytest.raises(CarriedIdsError, match="no EOS token"):
        splice_carried_prefix([1, 2], [1, EOS], [1, EOS], None)
    with pytest.raises(CarriedIdsError, match="fewer than 2 EOS"):
        splice_carried_prefix([1, EOS, 5, EOS], [1, EOS, 5, EOS], [1, EOS, 5], EOS)
    with pytest.raises(CarriedIdsError, match="no EOS after"):
        splice_carried_prefix([1, 5], [1, 5], [1, 5, 6], EOS)
