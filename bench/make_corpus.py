"""Write a deterministic synthetic TinyStories-format corpus of a requested size from seed stories, for measuring
data loading and training at full scale (TinyStories is 1.9 GB; the shared sample is 6 MB).

    python bench/make_corpus.py --size 2GB --out /tmp/corpus/ts-2GB.txt [--seed_text "other/stories_*.txt"]

Stories are recombined, not repeated: each output story takes a seed story's sentences and swaps about a third of
them for sentences of other stories. Real text also keeps adding words as it grows (Heaps' law: distinct words ~
words^beta; beta is 0.50 on the shared train files, measured over doublings from 73K to 1.2M words), while
recombination alone would stop at the seed's vocabulary. So a few words are replaced: by a new word (a typo of a
seed word or a made-up name) whenever the running distinct-word count falls below the seed's Heaps curve, else by
an earlier new word, favouring the earliest (rare words recur, as names in a story do). `--stats` prints the
distinct-word count at each doubling of the output, beside that curve.
"""

import argparse
import glob
import os
import re
import sys

import numpy as np

EOT = "<|endoftext|>"
SENTENCE_END = re.compile(r"(?<=[.!?])(?:[\"”’']?)\s+")
SYLLABLES = [c + v for c in "bdfgklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ee", "oo", "ay")]
SWAP_FRACTION = 0.35  # of a story's sentences, taken from other stories
REPLACE_RATE = 0.004  # of words, replaced by a new or earlier-new word


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise SystemExit(f"error: --size {text!r}: give a size like 60MB, 600MB or 2GB")
    return int(float(m[1]) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m[2]])


def seed_stories(pattern: str) -> list[list[str]]:
    """Each seed story as its list of sentences (with their trailing punctuation and whitespace)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"error: --seed_text {pattern!r} matches no files; give TinyStories .txt files")
    stories = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for story in f.read().split(EOT):
                story = story.strip()
                if story:
                    # split after sentence ends, keeping each separator with the sentence before it
                    cuts = [m.end() for m in SENTENCE_END.finditer(story)]
                    stories.append([story[a:b] for a, b in zip([0] + cuts, cuts + [len(story)]) if b > a])
    return stories


def heaps_beta(words: list[str]) -> tuple[float, float]:
    """(K, beta) of distinct(n) = K * n^beta, fitted on the seed's doublings."""
    marks = [len(words) >> k for k in range(4, -1, -1)]
    seen, counts, i = set(), [], 0
    for mark in marks:
        seen.update(words[i:mark])
        counts.append(len(seen))
        i = mark
    beta, log_k = np.polyfit(np.log(marks), np.log(counts), 1)
    return float(np.exp(log_k)), float(beta)


def made_up_word(rng, seed_words: list[str]) -> str:
    """A word no seed story has: a one-letter typo of a seed word, or a name of 2-4 syllables."""
    if rng.random() < 0.5:
        word = seed_words[rng.integers(len(seed_words))]
        i = int(rng.integers(len(word)))
        letter = "abcdefghijklmnopqrstuvwxyz"[rng.integers(26)]
        return word[:i] + letter + word[i + 1:] if rng.random() < 0.5 else word[:i] + letter + word[i:]
    return "".join(SYLLABLES[k] for k in rng.integers(len(SYLLABLES), size=rng.integers(2, 5))).capitalize()


def write_corpus(out: str, size: int, stories: list[list[str]], seed: int = 0, log=print) -> dict:
    """Write about `size` bytes of stories to `out` (through a temporary name); returns counts."""
    rng = np.random.default_rng(seed)
    all_sentences = [s for story in stories for s in story]
    words_in = {s: len(s.split()) for s in all_sentences}
    seed_words = sorted({w for s in all_sentences for w in s.split() if w.isalpha() and len(w) > 3})
    k, beta = heaps_beta(" ".join(all_sentences).split())
    seed_distinct = len({w for s in all_sentences for w in s.split()})
    new_words, seen_new = [], set()
    written = n_words = n_stories = 0
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            picks = rng.integers(len(stories), size=1024)
            for pick in picks:
                sentences = list(stories[pick])
                swaps = rng.random(len(sentences)) < SWAP_FRACTION
                for i in np.flatnonzero(swaps):
                    sentences[i] = all_sentences[rng.integers(len(all_sentences))]
                story_words = sum(words_in[s] for s in sentences)
                for _ in range(rng.poisson(REPLACE_RATE * story_words)):
                    # below the seed's Heaps curve (extended past the seed): a new word, else an earlier one
                    target = k * (n_words + story_words) ** beta - seed_distinct
                    if len(new_words) < target or not new_words:
                        word = made_up_word(rng, seed_words)
                        if word not in seen_new:
                            seen_new.add(word)
                            new_words.append(word)
                    else:
                        word = new_words[int(len(new_words) * rng.random() ** 3)]
                    i = int(rng.integers(len(sentences)))
                    parts = sentences[i].split(" ")
                    j = int(rng.integers(len(parts)))
                    tail = parts[j][len(parts[j].rstrip(".,!?\"”’'\n")):]  # keep punctuation and line breaks
                    parts[j] = word + tail
                    sentences[i] = " ".join(parts)
                text = "".join(sentences).strip() + f"\n{EOT}\n"
                f.write(text)
                written += len(text.encode("utf-8"))
                n_words += story_words
                n_stories += 1
                if written >= size:
                    break
    os.replace(tmp, out)
    return {"bytes": written, "stories": n_stories, "words": n_words, "new_words": len(new_words),
            "heaps_k": k, "heaps_beta": beta}


def distinct_word_curve(path: str, chunk_bytes: int = 8 << 20):
    """(words, distinct words) at each doubling of the word count, reading the file in chunks."""
    seen, n, mark, rows, tail = set(), 0, 1 << 16, [], ""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(chunk_bytes):
            words = (tail + chunk).split(" ")
            tail = words.pop()
            for w in " ".join(words).split():
                n += 1
                seen.add(w)
                if n == mark:
                    rows.append((n, len(seen)))
                    mark *= 2
    seen.update(tail.split())
    rows.append((n + len(tail.split()), len(seen)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True, help="e.g. 60MB, 600MB, 2GB")
    p.add_argument("--out", required=True, help="the .txt file to write")
    p.add_argument("--seed_text", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "tinystories_train_*.txt"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", action="store_true", help="print distinct words at each doubling beside Heaps' curve")
    args = p.parse_args()
    size = parse_size(args.size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stories = seed_stories(args.seed_text)
    r = write_corpus(args.out, size, stories, args.seed)
    print(f"wrote {args.out}: {r['bytes'] / 1e6:,.1f} MB, {r['stories']:,} stories, {r['words']:,} words, "
          f"{r['new_words']:,} words the seed lacks "
          f"(seed: distinct = {r['heaps_k']:.2f} * words^{r['heaps_beta']:.3f})")
    if args.stats:
        print("words          distinct   Heaps curve of the seed")
        for n, d in distinct_word_curve(args.out):
            print(f"{n:>13,}  {d:>9,}   {r['heaps_k'] * n ** r['heaps_beta']:>11,.0f}")


if __name__ == "__main__":
    sys.exit(main())
