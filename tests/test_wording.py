"""tinylm/wording.py: counts read as English in every message."""

from tinylm.wording import plural


def test_a_count_of_one_is_singular_and_others_plural():
    assert plural(1, "story") == "1 story" and plural(0, "story") == "0 stories"
    assert plural(2, "open story") == "2 open stories" and plural(1, "open story") == "1 open story"
    assert plural(1, "token") == "1 token" and plural(1024, "token") == "1,024 tokens"
    assert plural(3, "day") == "3 days"  # a vowel before the y keeps it
