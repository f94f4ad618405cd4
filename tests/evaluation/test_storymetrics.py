"""storymetrics.py: each measure of a completion on stories written to show it."""

import pytest

from tinylm.evaluation.storymetrics import completion_metrics, distinct, repetition


def test_repetition_and_distinct_bigrams():
    assert repetition("Tom ran to the park. Then he ate a cake.") == 0.0
    loop = "the cat sat on the mat " * 4  # 24 words, 21 4-grams, every one of them repeated
    assert repetition(loop) == 1.0
    assert distinct(["a b c", "a b c"]) == pytest.approx(2 / 4) and distinct(["a b", "c d"]) == 1.0


def test_characters_carry_on_or_a_newcomer_takes_over():
    names = {"Lily", "Tom", "Max"}
    beginnings = ["Lily had a red ball. She threw", "Tom went to the", "The sun was"]
    completions = [" it to Tom. Lily laughed.",  # Lily carries on; Tom is new but mentioned less than Lily
                   " park. Max saw Max and Max ran. Max was happy.",  # Max, never in the beginning, takes over
                   " hot. A lion came to the town."]  # nobody named; a lion appears from nowhere
    m = completion_metrics(beginnings, completions, [True, False, True], names)
    assert m["cast_kept"] == 0.5  # of the two beginnings that name someone, Lily's story keeps her, Tom's loses him
    assert m["newcomer_takes_over"] == 0.5 and m["new_creatures"] == pytest.approx(1 / 3)  # of the named, Max's
    assert m["ended"] == pytest.approx(2 / 3)
