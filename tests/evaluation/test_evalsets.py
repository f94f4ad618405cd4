"""evalsets.py: story-cloze items are deterministic and carry no surface cue; probe files are read strictly."""

import json
import os

import pytest

from helpers import ROOT
from tinylm.evaluation.evalsets import (character_names, cloze_items, probe_continuation, read_probes, shape,
                                       split_sentences)

STORIES = [
    'Once upon a time, there was a girl named Lily. She had a red ball. "Look, Mom!" said Lily. She threw the ball '
    'high. It flew over the tree. Lily laughed and ran after it.',
    "Tom was a boy who liked boats. One day, Tom went to the lake. He saw a big boat with a white sail. Tom smiled "
    "and waved at the boat. The man on the boat waved back.",
    "There was a little dog named Spot. Spot liked to dig in the garden. One day he found an old shoe. He carried "
    "the shoe to his bed. Spot was proud of his find.",
    "Sue and Ben went to the park. They played on the swings all day. Ben said, \"Push me higher!\" Sue pushed him "
    "and he laughed. When the sun went down, they walked home.",
]


def test_sentences_split_at_ends_but_not_inside_quotes():
    sentences, gaps = split_sentences('Tom said, "Stop! Come back!" The dog ran.\nThe end.')
    assert sentences == ['Tom said, "Stop! Come back!"', "The dog ran.", "The end."] and gaps == ["", " ", "\n"]
    for story in STORIES:
        sentences, gaps = split_sentences(story)
        assert "".join(g + s for g, s in zip(gaps, sentences)) == story


def test_names_are_the_characters():
    assert character_names(STORIES) == {"Lily", "Tom", "Spot", "Ben"}  # Mom is also "his mom"; Sue only pushes


def test_cloze_items_are_deterministic_and_carry_no_surface_cue():
    from helpers import make_stories
    stories = STORIES * 10 + make_stories(400)  # distractors of every length come from other stories
    names = character_names(stories)
    items = cloze_items(stories, 50, seed=3)
    assert len(items) == 50 and items == cloze_items(stories, 50, seed=3) != cloze_items(stories, 50, seed=4)
    answers = [item.answer for item in items]
    assert len(set(answers)) == 4  # the true sentence is not always in one place
    for item in items:
        true = item.options[item.answer].strip()
        assert len(item.options) == 4 and len(set(item.options)) == 4
        assert len(split_sentences(item.context.strip())[0]) >= 3
        gap = item.options[0][:len(item.options[0]) - len(item.options[0].lstrip())]
        for j, option in enumerate(item.options):
            assert option.startswith(gap) and shape(option.strip()) == shape(true)
            assert 0.64 <= len(option.strip()) / len(true) <= 1.5625  # within 25% of a center near the true one
            if j == item.answer:
                continue  # a true next sentence may bring in someone new; a distractor names only the context's
            named = {w for w in option.replace('"', " ").replace(".", " ").split() if w in names}
            assert named <= set(item.context.replace('"', " ").replace(".", " ").replace(",", " ").split())


def test_the_shipped_probes_cover_three_kinds(tmp_path):
    probes = read_probes(os.path.join(ROOT, "tinylm", "evaluation", "probes", "capabilities.jsonl"))
    counts = {c: sum(p["category"] == c for p in probes) for c in ("factual", "reasoning", "context")}
    assert len(probes) >= 90 and min(counts.values()) >= 30
    good = {"category": "factual", "prompt": "Fish swim in the", "right": "water", "wrong": ["sky"]}
    for bad, message in [("{not json", "line 2 is not JSON"),
                         (json.dumps({**good, "answer": "x"}), "line 2 has .*exactly the keys"),
                         (json.dumps({**good, "wrong": "sky"}), "line 2: wrong must be a non-empty list"),
                         (json.dumps({**good, "wrong": ["water"]}), "line 2: wrong must list .* none of them the right")]:
        (tmp_path / "p.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=message):
            read_probes(str(tmp_path / "p.jsonl"))


def test_an_answer_with_its_own_leading_space_scores_as_one_without():
    # lm-evaluation-harness' rule (target_delimiter " "): a prompt and an answer join with exactly one whitespace.
    # Many datasets' choices carry their own space; " warm coat." was scored as "  warm coat." before
    import torch
    from model import GPTNeo, GPTNeoConfig
    from tinylm.data.tokenizer import gpt_neo_tokenizer
    from tinylm.evaluation.scoring import continuation_logprobs
    prompt = "It was cold, so Lily put on her"
    assert probe_continuation(prompt, "warm coat.") == probe_continuation(prompt, " warm coat.") == " warm coat."
    assert probe_continuation(prompt + " ", " warm coat.") == probe_continuation(prompt + " ", "warm coat.") == \
        "warm coat."
    assert probe_continuation("", "Once") == "Once"  # an empty prompt: the answer as it is
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig(max_position_embeddings=64, n_layer=1, n_head=2, n_embd=16, window_size=8)).eval()
    pairs = [(prompt, probe_continuation(prompt, answer)) for answer in ("warm coat.", " warm coat.")]
    spaced, plain = continuation_logprobs(model, gpt_neo_tokenizer(), pairs)
    assert spaced == plain  # the same summed log-probability and bytes
