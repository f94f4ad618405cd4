"""Measures of stories a model wrote, computed from the text alone (evaluate.py's completions).

    m = completion_metrics(beginnings, completions, ended, names)
    # {"repetition", "distinct_2", "ended", "cast_kept", "newcomer_takes_over", "new_creatures"}

- repetition: per completion, the share of its word 4-grams that occur in it more than once (a model stuck in a
  loop scores near 1), averaged over completions.
- distinct_2: distinct word bigrams over all bigrams of all completions (the same story every time scores low).
- ended: the share of completions that reached end-of-text within the token budget.
- cast_kept: of the beginnings that name a character, the share whose completion names one of them again.
- newcomer_takes_over: of the beginnings that name a character, the share whose completion mentions a name the
  beginning never used more often than all of the beginning's names together.
- new_creatures: the share of completions that bring in an animal or creature ("the lion") that the beginning
  does not have (people are left out: "the girl" is mostly a character already named).

What these cannot see: a newcomer who only names someone the beginning left unnamed ("Her little brother, Tom");
pronouns that change a character's sex ("Lily was a persistent boy"); a character renamed
between two names that both occur in the beginning; facts that contradict the beginning (a broken toy that works
again); a plot that does not make sense. A judge model (the paper's GPT-4 grading) or a human reads for those.
"""

import re
from collections import Counter

from tinylm.evaluation.evalsets import CAPITALIZED, names_in

WORDS = re.compile(r"[a-z']+")
# animals and creatures TinyStories' characters are made of: a completion that brings in one the beginning lacks
# has a character who was never introduced
CREATURES = frozenset(
    "ant bear bee bird bug bunny butterfly cat chicken cow crab deer dinosaur dog dolphin dragon duck elephant "
    "fairy fish fox frog giraffe goat horse kitten lion monkey monster mouse owl pig pony puppy rabbit robot sheep "
    "snake spider squirrel tiger turtle whale wolf worm zebra".split())


def repetition(text: str, n: int = 4) -> float:
    """Share of the word n-grams of a text that occur in it more than once."""
    words = WORDS.findall(text.lower())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return sum(c for c in grams.values() if c > 1) / total if total else 0.0


def distinct(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all word n-grams of the texts."""
    grams = [tuple(w[i:i + n]) for w in (WORDS.findall(t.lower()) for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def creatures_in(text: str) -> set[str]:
    return {w for w in WORDS.findall(text.lower()) if w in CREATURES}


def completion_metrics(beginnings: list[str], completions: list[str], ended: list[bool], names: set[str]) -> dict:
    """The measures above, for completions of the beginnings (and whether each reached end-of-text)."""
    named = [(cast, c) for cast, c in ((names_in(b, names), c) for b, c in zip(beginnings, completions)) if cast]
    takeovers = 0
    for cast, completion in named:
        mentions = Counter(w for w in CAPITALIZED.findall(completion) if w in names)
        newcomers = [count for name, count in mentions.items() if name not in cast]
        takeovers += bool(newcomers) and max(newcomers) > sum(mentions[name] for name in cast)
    n = max(len(completions), 1)
    return {"repetition": sum(map(repetition, completions)) / n,
            "distinct_2": distinct(completions),
            "ended": sum(ended) / n,
            "cast_kept": sum(bool(set(cast) & set(CAPITALIZED.findall(c))) for cast, c in named) / max(len(named), 1),
            "newcomer_takes_over": takeovers / max(len(named), 1),
            "new_creatures": sum(bool(creatures_in(c) - creatures_in(b)) for b, c in zip(beginnings, completions)) / n}
