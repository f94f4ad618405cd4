"""What evaluate.py measures models on, built from held-out stories and probe files.

    items = cloze_items(stories, n_items=500, seed=0)    # a story's beginning, its next sentence and 3 distractors
    probes = read_probes(DEFAULT_PROBES)    # {"category", "prompt", "right", "wrong"} per line

Story cloze (after Mostafazadeh et al. 2016, built here from TinyStories' own held-out stories): the context is a
story up to a sentence boundary at least 3 sentences in, and the options are its true next sentence and
sentences from other held-out stories. Surface cues are taken away so that only coherence separates them: the
four lengths are drawn alike (within 25% of a common center, the true one at a random place in that window), every
distractor opens with a quote exactly when the true sentence does, ends with the same punctuation, is never a
story's first sentence, and has its characters' names replaced by names from the context (a distractor naming
someone is used only when the context names someone).
"""

import dataclasses
import json
import math
import os
import random
import re
from collections import Counter

# the probes evaluate.py asks by default: 92 prompts in the stories' language, written for TinyLM
DEFAULT_PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes", "capabilities.jsonl")
# a sentence ends at . ! or ? (maybe closing a quote) where whitespace and a capital or an opening quote follow
SENTENCE_BREAK = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["”’]))\s+(?=["“‘]?[A-Z])')
TITLES = {"Mr", "Mrs", "Ms", "Miss", "Dr"}  # "said Mr. Brown": a title, not the name
ACTIONS = "said|asked|replied|shouted|smiled|laughed|nodded|cried|thought|wanted|looked|felt"
CAPITALIZED = re.compile(r"\b[A-Z][a-z]+\b")
WINDOW, LENGTH_BINS = 1.25, 8  # the options' lengths: within 25% of a center, drawn across 8 bins (cloze_items)
PROBE_KEYS = {"category": str, "prompt": str, "right": str, "wrong": list}


@dataclasses.dataclass
class ClozeItem:
    context: str
    options: list[str]  # each with the whitespace that follows the context, the true one at `answer`
    answer: int


def split_sentences(story: str) -> tuple[list[str], list[str]]:
    """(sentences, the whitespace before each): "".join(g + s for g, s in zip(gaps, sentences)) is the story. A
    break inside a quotation ("Stop! Come back!" she said) does not end a sentence."""
    sentences, gaps, start = [], [""], 0
    for m in SENTENCE_BREAK.finditer(story):
        before = story[start:m.start()]
        if (before.count('"') + before.count("“") + before.count("”")) % 2:
            continue  # inside a quote that has not closed yet
        sentences.append(before)
        gaps.append(m.group())
        start = m.end()
    sentences.append(story[start:])
    return sentences, gaps


def character_names(stories: list[str]) -> set[str]:
    """The characters' names in the stories (Lily, Tom, Spot): capitalized words that a story introduces ("a dog
    named Spot") or that do what characters do ("Tom said", "asked Lily", "Max smiled"), and that never occur in
    lower case (so Mom, which is also "his mom", is no name; neither is a quote's first word)."""
    text = "\n".join(stories)
    lower = set(re.findall(r"\b[a-z]+\b", text))
    evidence = re.findall(rf"\b(?:named|{ACTIONS}) ([A-Z][a-z]+)\b|\b([A-Z][a-z]+) (?:{ACTIONS})\b", text)
    return {name for pair in evidence for name in pair if name and name.lower() not in lower} - TITLES


def names_in(text: str, names: set[str]) -> list[str]:
    """The names a text mentions, most mentioned first (first mention breaks ties)."""
    found = [w for w in CAPITALIZED.findall(text) if w in names]
    counts = Counter(found)
    return sorted(dict.fromkeys(found), key=lambda w: -counts[w])


def rename(sentence: str, names: set[str], cast: list[str]) -> str | None:
    """The sentence with its i-th named character replaced by cast[i] (cycling); None when it names someone and
    the cast is empty."""
    own = list(dict.fromkeys(w for w in CAPITALIZED.findall(sentence) if w in names))
    if own and not cast:
        return None
    mapping = {name: cast[i % len(cast)] for i, name in enumerate(own)}
    return CAPITALIZED.sub(lambda m: mapping.get(m.group(), m.group()), sentence) if own else sentence


def shape(sentence: str) -> tuple[bool, str, bool]:
    """The surface a reader sees first: does it open a quote, how does it end, does it close a quote."""
    return sentence[:1] in "\"“‘", sentence.rstrip("\"”’")[-1:], sentence[-1:] in "\"”’"


def cloze_items(stories: list[str], n_items: int, seed: int = 0, n_distractors: int = 3) -> list[ClozeItem]:
    """Up to n_items story-cloze items, at most one per story, the same for the same stories and seed."""
    rng = random.Random(seed)
    names = character_names(stories)
    split = [split_sentences(story.strip()) for story in stories]
    # (sentence, its story, its shape, does it name someone) of every sentence that does not open a story
    pool = sorted({(s, i, shape(s), any(w in names for w in CAPITALIZED.findall(s)))
                   for i, (sentences, _) in enumerate(split) for s in sentences[1:] if len(s.split()) >= 3})
    items = []
    for i in rng.sample(range(len(stories)), len(stories)):
        if len(items) == n_items:
            break
        sentences, gaps = split[i]
        if len(sentences) < 4:
            continue
        k = rng.randrange(3, len(sentences))
        true = sentences[k]
        context = "".join(g + s for g, s in zip(gaps[:k], sentences[:k]))
        cast = names_in(context, names)
        # All four lengths are drawn alike, so that no rule on lengths (the longest, the shortest, the middle one)
        # finds the true sentence: a window of +-25% around a center placed at random about the true length holds
        # the true sentence at a uniform place, and distractors are drawn uniformly across the window (a bin of
        # it first, then a sentence in the bin), not as the pool has them, with more short sentences than long.
        # A window with an empty bin (a very short or very long true sentence) would skew the draw: skip the story.
        center = len(true) * WINDOW ** rng.uniform(-1, 1)
        bins = [[] for _ in range(LENGTH_BINS)]
        for s, story, form, named in pool:
            place = math.log(len(s) / center) / math.log(WINDOW)  # -1 to 1 inside the window
            if story != i and form == shape(true) and -1 <= place <= 1 and (cast or not named):
                bins[min(int(LENGTH_BINS * (place + 1) / 2), LENGTH_BINS - 1)].append(s)
        if not all(bins):
            continue
        distractors = []
        for sentence in draw_across(bins, rng):
            renamed = rename(sentence, names, cast)
            if renamed != true and renamed not in distractors and 1 / WINDOW <= len(renamed) / center <= WINDOW:
                distractors.append(renamed)
            if len(distractors) == n_distractors:
                break
        if len(distractors) < n_distractors:
            continue
        options = [true] + distractors
        order = rng.sample(range(len(options)), len(options))
        items.append(ClozeItem(context, [gaps[k] + options[j] for j in order], order.index(0)))
    return items


def story_beginnings(stories: list[str], n: int, seed: int = 0) -> list[str]:
    """Up to n beginnings of different stories, cut mid-sentence as the paper's prompts are: the story up to a
    word inside its second, third or fourth sentence (at least two words in, two words before its end)."""
    rng = random.Random(seed)
    beginnings = []
    for i in rng.sample(range(len(stories)), len(stories)):
        if len(beginnings) == n:
            break
        story = stories[i].strip()
        sentences, gaps = split_sentences(story)
        if len(sentences) < 3:
            continue
        k = rng.randrange(1, min(len(sentences) - 1, 4))
        ends = [m.end() for m in re.finditer(r"\S+", sentences[k])]
        if len(ends) < 5:
            continue
        prefix = "".join(g + s for g, s in zip(gaps[:k + 1], sentences[:k])) + gaps[k]
        beginnings.append(prefix + sentences[k][:ends[rng.randrange(1, len(ends) - 2)]])
    return beginnings


def draw_across(bins: list[list[str]], rng: random.Random):
    """Sentences drawn without replacement: each draw picks a non-empty bin uniformly, then a sentence in it."""
    bins = [rng.sample(b, len(b)) for b in bins if b]
    while bins:
        chosen = bins[rng.randrange(len(bins))]
        yield chosen.pop()
        bins = [b for b in bins if b]


def probe_continuation(prompt: str, answer: str) -> str:
    """What a probe's answer adds to its prompt. They join with exactly one separating whitespace, never two, as
    lm-evaluation-harness joins a context and a choice with its target_delimiter " ": "went to" + "bed" and
    "went to" + " bed" both score " bed"; after a prompt that ends in whitespace the answer's own leading
    whitespace is dropped."""
    if not prompt:
        return answer
    if prompt[-1].isspace():
        return answer.lstrip()
    return answer if answer[:1].isspace() else " " + answer


def read_probes(path: str) -> list[dict]:
    """Probe items of a JSONL file, one {"category": str, "prompt": str, "right": str, "wrong": [str, ...]} per
    line (blank lines and lines starting with # are skipped); a line that breaks the schema is a ValueError
    naming it."""
    probes = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path} line {n}"
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not JSON ({e})") from None
            if not isinstance(item, dict) or set(item) != set(PROBE_KEYS):
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise ValueError(f"{where} has {keys}; a probe has exactly the keys category, prompt, right and wrong")
            for key, kind in PROBE_KEYS.items():
                if not isinstance(item[key], kind) or not item[key]:
                    raise ValueError(f"{where}: {key} must be a non-empty {kind.__name__}")
            if not all(isinstance(w, str) and w for w in item["wrong"]) or item["right"] in item["wrong"]:
                raise ValueError(f"{where}: wrong must list non-empty strings, none of them the right answer")
            probes.append(item)
    if not probes:
        raise ValueError(f"{path} holds no probes")
    return probes
