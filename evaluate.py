"""Score models side by side on held-out stories: loss, story cloze, capability probes and story completions.

    python evaluate.py --model out/quickstart/best --model out/laptop/best --data test.txt
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from tinylm.checkpoint import load_model_and_tokenizer, run_folder_model
from tinylm.data.corpus import non_empty, read_stories, resolve_files
from tinylm.data.pieces import encode_batches
from tinylm.data.tokenizer import gpt_neo_tokenizer
from tinylm.devices import pick_device
from tinylm.evaluation.evalsets import (DEFAULT_PROBES, character_names, cloze_items, probe_continuation, read_probes,
                                        story_beginnings)
from tinylm.evaluation.harness import export_tasks
from tinylm.evaluation.judge import JudgeError, grade_all, summarize
from tinylm.evaluation.ngram import NGram, stream_logprob
from tinylm.evaluation.ngram import continuation_logprobs as ngram_continuation_logprobs
from tinylm.evaluation.report import render, table
from tinylm.evaluation.scoring import continuation_logprobs, evaluate_stories, loss_numbers, token_view
from tinylm.evaluation.storymetrics import completion_metrics
from tinylm.hub import resolve_pretrained
from tinylm.modeling.inside import heads_over
from tinylm.storage import atomic_write, read_json, storage_failure, write_json, write_text
from tinylm.wording import plural

HEAD_STORIES = 50  # held-out stories the report's heads section averages over

GUIDE = """what it measures, per model:
  loss         nats/token, perplexity and bits per UTF-8 byte on --data (what inference.py --eval_file says);
               bits/byte compare models with different vocabularies fairly
  cloze        story cloze: a held-out story up to a sentence boundary (3 or more sentences in), then its true
               next sentence and 3 sentences from other held-out stories, with the same length range, quoting,
               ending and the context's character names, so that only coherence tells them apart. Chance is 25%
  probes       short prompts in three kinds (factual, reasoning, context tracking) with one right and several
               wrong endings; --probes reads any JSONL file of {"category", "prompt", "right", "wrong"} lines;
               a prompt and an ending join with exactly one whitespace ("bed" and " bed" score the same)
  baseline     --baseline ngram: an interpolated Kneser-Ney 4-gram of GPT-Neo tokens fitted on --train, scored on
               the loss, cloze and probes: what counting alone gets
  completions  --completions held-out stories cut mid-sentence, completed by each model with the same seeded
               sampling: repeated 4-grams, distinct bigrams, the share that reach end-of-text, whether the
               beginning's named characters carry on, and whether a newcomer takes over (see storymetrics.py for
               what these measures cannot see)
An option wins when the model gives it the highest log-probability after the context: summed over its tokens
("acc", as lm-evaluation-harness) and divided by its UTF-8 bytes ("acc per byte"). Accuracies come with a 95%
Wilson interval; a model whose interval holds chance has shown nothing.

examples:
  python evaluate.py --model out/quickstart/best --data test.txt
  python evaluate.py --model out/quickstart/best --model roneneldan/TinyStories-1M --data test.txt --json out/eval.json
  python evaluate.py --model out/laptop/best --data test.txt --baseline ngram --train "train/*.txt" --report out/eval.html
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score one or more models side by side on held-out stories: loss, "
                                "story cloze, capability probes and story completions.", epilog=GUIDE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="checkpoint folder or hub id; repeat to compare")
    p.add_argument("--data", required=True, help="held-out stories separated by <|endoftext|> (.txt, .jsonl or "
                   ".parquet); never the data the models trained on")
    p.add_argument("--probes", default=DEFAULT_PROBES,
                   help="probe file (default: tinylm/evaluation/probes/capabilities.jsonl, 92 probes); a prompt "
                   "and its endings join with exactly one whitespace, so endings may or may not start with a space")
    p.add_argument("--cloze_items", type=int, default=None, help="story-cloze items, at most one per story "
                   "(default: one per story that has 4 sentences or more)")
    p.add_argument("--seed", type=int, default=0, help="chooses the cloze items (the same seed, the same items)")
    p.add_argument("--block_size", type=int, default=512, help="context of each scored piece for the loss "
                   "(lowered to a model's context)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences scored at once")
    p.add_argument("--completion_tokens", type=int, default=16, help="greedy tokens each model writes after "
                   "each probe prompt (shown in --json; 0: none)")
    p.add_argument("--completions", type=int, default=50, help="held-out stories cut mid-sentence that each model "
                   "completes (0: none)")
    p.add_argument("--story_tokens", type=int, default=200, help="at most this many tokens per completion (lowered "
                   "to fit a model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="completions' sampling temperature (0: greedy); "
                   "each completion is seeded from --seed, so a rerun writes the same stories")
    p.add_argument("--top_k", type=int, default=50, help="completions sample from the k most likely tokens (0: all)")
    p.add_argument("--baseline", choices=["ngram"], default=None, help="also score an interpolated Kneser-Ney "
                   "n-gram model of GPT-Neo tokens fitted on --train: what counting alone gets")
    p.add_argument("--train", default=None, help="the baseline's training stories (default: the data.dataset "
                   "the first --model that records it was trained on, from its training_config.json)")
    p.add_argument("--order", type=int, default=4, help="the baseline's n")
    p.add_argument("--judge", default=None, metavar="URL", help="grade each completion as the paper does, by a judge "
                   "model at this OpenAI-compatible base URL (OpenAI, vLLM, llama.cpp's server, Ollama)")
    p.add_argument("--judge_model", default=None, help="the judge's model name, e.g. gpt-4o or llama3.1")
    p.add_argument("--judge_key_env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument("--judge_cache", default="out/judge_cache", help="grades already asked for, reused on a rerun")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    p.add_argument("--report", default=None, metavar="PATH", help="write one self-contained HTML page: the table, "
                   "charts, every probe with each model's completion, held-out stories token by token, and each "
                   "model's heads (mean distance attended, weight on the previous token)")
    p.add_argument("--report_stories", type=int, default=3, help="held-out stories the report shows token by token")
    p.add_argument("--export_lm_eval", default=None, metavar="DIR", help="also write the cloze items and probes "
                   "scored here as lm-evaluation-harness tasks (tinylm_cloze, tinylm_probes) into DIR, for lm_eval "
                   "--include_path DIR; run the lm_eval command, not python -m lm_eval, from this folder (this "
                   "evaluate.py would hide the evaluate package the harness imports)")
    return p.parse_args(argv)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (better than the normal one near 0, 1 and for small n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (center - half) / (1 + z * z / n), (center + half) / (1 + z * z / n)


def is_right(options: list[tuple[float, int]], answer: int, per_byte: bool = False) -> bool:
    """An item counts only when its answer beats every other option, by summed log-probability or per byte."""
    value = (lambda nats, size: nats / size) if per_byte else (lambda nats, size: nats)
    return all(value(*options[answer]) > value(*o) for j, o in enumerate(options) if j != answer)


def accuracy(scores: list[list[tuple[float, int]]], answers: list[int]) -> dict:
    """acc (summed log-probability) and acc_bytes (per UTF-8 byte) of multiple-choice items, with intervals."""
    result = {"n": len(answers)}
    for key, per_byte in (("acc", False), ("acc_bytes", True)):
        right = sum(is_right(options, a, per_byte) for options, a in zip(scores, answers))
        result[key], result[key + "_ci"] = right / max(len(answers), 1), list(wilson(right, len(answers)))
    return result


def per_item(score_pairs, contexts: list[str], options: list[list[str]]) -> list[list]:
    """score_pairs over every (context, option) pair at once (so batches fill up), regrouped per item."""
    flat = iter(score_pairs([(c, o) for c, opts in zip(contexts, options) for o in opts]))
    return [[next(flat) for _ in opts] for opts in options]


def complete(model, tokenizer, prompt: str, max_new_tokens: int, device) -> str:
    """The model's greedy continuation of a prompt, up to the end of its line."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]
    room = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    if room <= 0:
        return ""
    out = model.generate(torch.tensor([ids], device=device), room, temperature=0, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).split("\n")[0]


def evaluate_model(name: str, args, stories, items, probes, beginnings, device) -> dict:
    """Every number of one model."""
    model, tokenizer = load_model_and_tokenizer(args.folders[name], device)
    t0 = time.time()
    result = {"params": model.num_params()}
    result.update(evaluate_stories(model, tokenizer, stories, args.batch_size, args.block_size, device))
    result.update(multiple_choice(lambda pairs: continuation_logprobs(model, tokenizer, pairs, args.batch_size, device),
                                  items, probes))
    if args.completion_tokens:
        result["probe_completions"] = [complete(model, tokenizer, p["prompt"], args.completion_tokens, device)
                                       for p in probes]
    if args.report:
        result["token_views"] = [token_view(model, tokenizer, story, device=device)
                                 for story in stories[:args.report_stories]]
        result["heads"] = heads_over(model, [tokenizer.encode(story) for story in stories[:HEAD_STORIES]])
    stories = [write_story(model, tokenizer, b, args, args.seed * 100_000 + j, device) for j, b in enumerate(beginnings)]
    result["completions"], result["completions_ended"] = [s for s, _ in stories], [e for _, e in stories]
    result["seconds"] = time.time() - t0
    return result


def evaluate_baseline(args, stories, items, probes) -> dict:
    """Loss, cloze and probes of the n-gram baseline (it writes no completions)."""
    t0 = time.time()
    tokenizer = gpt_neo_tokenizer()
    train = train_files(args.train)
    lm = NGram.fit(np.concatenate(list(encode_batches(tokenizer, non_empty(read_stories(train), {}), workers=2))),
                   args.order)
    nats, n = stream_logprob(lm, np.concatenate(list(encode_batches(tokenizer, stories))))
    result = {"params": None, **loss_numbers(-nats, n, stories)}
    result.update(multiple_choice(lambda pairs: ngram_continuation_logprobs(lm, tokenizer, pairs), items, probes))
    result["seconds"] = time.time() - t0
    return result


def multiple_choice(score_pairs, items, probes) -> dict:
    """Cloze and probe accuracies, score_pairs giving (nats, bytes) for (context, option) pairs."""
    cloze = per_item(score_pairs, [i.context for i in items], [i.options for i in items])
    result = {f"cloze_{k}": v for k, v in accuracy(cloze, [i.answer for i in items]).items()}
    result["cloze_right"] = [is_right(options, i.answer) for options, i in zip(cloze, items)]
    options = [[probe_continuation(p["prompt"], a) for a in [p["right"], *p["wrong"]]] for p in probes]
    probe_scores = per_item(score_pairs, [p["prompt"] for p in probes], options)
    result["probe_right"] = [is_right(options, 0) for options in probe_scores]
    result["probes"] = {}
    for category in sorted({p["category"] for p in probes}) + ["all"]:
        chosen = [j for j, p in enumerate(probes) if category in ("all", p["category"])]
        result["probes"][category] = accuracy([probe_scores[j] for j in chosen], [0] * len(chosen))
    return result


def write_story(model, tokenizer, beginning: str, args, seed: int, device) -> tuple[str, bool]:
    """(completion, reached end-of-text) of a beginning, sampled with the completions' settings and its own seed."""
    ids = tokenizer.encode(beginning)
    room = min(args.story_tokens, model.config.max_position_embeddings - len(ids))
    if room <= 0:
        return "", False  # a beginning as long as the model's context leaves no room
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), room, temperature=args.temperature,
                         top_k=args.top_k or None, eos_token_id=tokenizer.eos_token_id, generator=generator)
    new = out[0, len(ids):].tolist()
    ended = tokenizer.eos_token_id in new
    return tokenizer.decode(new[:new.index(tokenizer.eos_token_id)] if ended else new), ended


def chance(probes: list[dict]) -> dict:
    """What guessing scores: 1 / options, averaged over the items."""
    by = {c: [1 / (1 + len(p["wrong"])) for p in probes if c in ("all", p["category"])]
          for c in sorted({p["category"] for p in probes}) + ["all"]}
    return {"cloze": 0.25, "probes": {c: sum(v) / len(v) for c, v in by.items()}}


def train_files(spec: str) -> list[str]:
    try:
        return resolve_files(spec) or []
    except FileNotFoundError:
        return []


def recorded_train_data(folders: dict[str, str]) -> str | None:
    """The local training stories (data.dataset of training_config.json) of the first model that records them."""
    for name, folder in folders.items():
        try:
            dataset = read_json(os.path.join(resolve_pretrained(folder), "training_config.json"), "checkpoint")
            dataset = dataset["data"]["dataset"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a hub model, or a folder transformers wrote: no record
        if isinstance(dataset, str) and train_files(dataset):
            print(f"# --train not given: the baseline fits on {dataset}, what {name} was trained on",
                  file=sys.stderr)
            return dataset
    return None


def load_inputs(args):
    """The stories, cloze items and probes, checked before any model is loaded."""
    for flag, value, least in (("--batch_size", args.batch_size, 1), ("--block_size", args.block_size, 1),
                               ("--completion_tokens", args.completion_tokens, 0), ("--completions", args.completions, 0),
                               ("--story_tokens", args.story_tokens, 1), ("--temperature", args.temperature, 0),
                               ("--top_k", args.top_k, 0), ("--report_stories", args.report_stories, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if len(set(args.model)) < len(args.model):
        raise ValueError("a --model is given twice; each model is one column")
    # a run folder stands for its best/; a missing folder or config.json, or a hub id offline, fails here
    args.folders = {name: run_folder_model(name) for name in args.model}
    for name, folder in args.folders.items():
        if not os.path.isfile(os.path.join(resolve_pretrained(folder), "config.json")):
            raise ValueError(f"--model {name} has no config.json; point at a model folder, e.g. out/quickstart/best")
    for flag, path in (("--json", args.json), ("--report", args.report)):
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as e:
                raise ValueError(f"{flag} {path}: {storage_failure(e, os.path.dirname(path), flag) or e}") from None
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data} is no file; pass a file of held-out stories that the models "
                                "did not train on, separated by <|endoftext|> lines")
    stories = list(non_empty(read_stories([args.data]), {}))
    if args.cloze_items is not None and not 1 <= args.cloze_items <= len(stories):
        raise ValueError(f"--cloze_items {args.cloze_items}: {args.data} holds {plural(len(stories), 'story')} and the cloze "
                         f"takes at most one item from each; ask for 1 to {len(stories)}")
    if args.baseline and args.train is None:
        args.train = recorded_train_data(args.folders)
        if args.train is None:
            raise ValueError(f"--baseline {args.baseline} fits on the models' training stories, and no --model "
                             "records local ones (data.dataset in its training_config.json): pass them with --train")
    if args.baseline and not train_files(args.train):
        raise ValueError(f"--baseline {args.baseline} fits on --train {args.train}, which matches no file; pass the "
                         "models' training stories with --train")
    if bool(args.judge) != bool(args.judge_model):
        raise ValueError("--judge URL and --judge_model NAME go together")
    if args.judge and not args.completions:
        raise ValueError("--judge grades the completions, and --completions is 0")
    if not 1 <= args.order <= 6:
        raise ValueError(f"--order must be 1 to 6, got {args.order}")
    items = cloze_items(stories, args.cloze_items or len(stories), args.seed)
    if not items:
        raise ValueError(f"{args.data} has no story of 4 sentences or more, so no cloze item can be built")
    if not os.path.isfile(args.probes):
        raise FileNotFoundError(f"--probes {args.probes} is no file; pass a JSONL file of probes, one "
                                '{"category", "prompt", "right", "wrong"} per line, or leave --probes out for the '
                                "built-in ones")
    return stories, items, read_probes(args.probes)


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        stories, items, probes = load_inputs(args)
        beginnings = story_beginnings(stories, args.completions, args.seed)
        if args.export_lm_eval:
            export_tasks(args.export_lm_eval, items, probes)
            print(f"# lm-evaluation-harness tasks in {args.export_lm_eval}: lm_eval --model hf --model_args "
                  f"pretrained=MODEL --include_path {args.export_lm_eval} --tasks tinylm_cloze,tinylm_probes",
                  file=sys.stderr)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    report = {"data": args.data, "stories": len(stories), "cloze_items": len(items), "seed": args.seed,
              "beginnings": beginnings, "sampling": {"temperature": args.temperature, "top_k": args.top_k,
                                                     "max_new_tokens": args.story_tokens},
              "probes_file": args.probes, "probes": probes, "chance": chance(probes), "models": {}}
    for name in args.model:
        print(f"# scoring {name} ...", file=sys.stderr)
        try:
            report["models"][name] = evaluate_model(name, args, stories, items, probes, beginnings, device)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --model {name}: {e}") from None
    if args.baseline:
        print(f"# fitting the {args.order}-gram baseline on {args.train} ...", file=sys.stderr)
        report["models"][f"{args.order}-gram"] = evaluate_baseline(args, stories, items, probes)
    if args.judge:
        try:
            for name, result in report["models"].items():
                if "completions" in result:
                    print(f"# {args.judge_model} grades {name}'s completions ...", file=sys.stderr)
                    grades, counts = grade_all(list(zip(beginnings, result["completions"])), args.judge,
                                               args.judge_model, args.judge_cache, os.environ.get(args.judge_key_env))
                    result["judge"] = {**summarize(grades), **counts, "grades": grades}
        except JudgeError as e:
            raise SystemExit(f"error: --judge: {e}") from None
    # names: the held-out stories' characters, and any a model made up ("Zib said")
    names = character_names(stories + [c for m in report["models"].values() for c in m.get("completions", [])])
    for result in report["models"].values():
        if "completions" in result:
            result["story"] = completion_metrics(beginnings, result["completions"], result["completions_ended"], names)
    text = table(report)
    print(text)
    if args.report:
        atomic_write(args.report, lambda p: write_text(p, render(report)))
        print(f"# report in {args.report}", file=sys.stderr)
    if args.json:
        write_json(args.json, report)
        print(f"# every number in {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
