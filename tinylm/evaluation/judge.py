"""The TinyStories paper's grading of story completions by a judge model, through any OpenAI-compatible
chat-completions endpoint (OpenAI, vLLM, llama.cpp's server, Ollama), with the standard library only.

    grades, counts = grade_all(pairs, url="http://127.0.0.1:11434/v1", model="llama3.1", cache_dir="out/judge")
    # grades: per (beginning, completion) {"grammar", "creativity", "consistency", "plot": 0-10, "age_group": "A"-"F"}
    #         or None; counts: {"graded", "cached", "unparseable", "failed"}

Each request has a timeout and is retried with exponential backoff on a connection error, a timeout, HTTP 429 or
a 5xx. A reply is parsed strictly (one JSON object with exactly those keys and ranges); one that is not counts
as unparseable and never stops the run. Grades are cached on disk, keyed by the rubric, the judge model and the
story, so a rerun asks nothing it asked before. The key is read from the environment (OPENAI_API_KEY by default).
"""

import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request

from tinylm.storage import write_json

GIVE_UP = 3  # stories in a row that no judge answered, each after its retries, before the first answer: stop
SCORES = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
RUBRIC = (
    "You grade a student's exercise. The student was given the beginning of a children's story and wrote the rest. "
    "The symbol *** separates the given beginning from the student's part; the beginning may stop in the middle of "
    "a sentence, which the student should complete. Judge only the student's part: its grammar; its creativity; "
    "its consistency with the beginning (the same characters, objects and facts); and whether its plot makes sense. "
    "Give each an integer from 0 to 10, and guess the student's age group: A (3 or under), B (4-5), C (6-7), "
    "D (8-9), E (10-12) or F (13-16). Reply with one JSON object and nothing else, for example "
    '{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age_group": "C"}')


class JudgeError(Exception):
    """The judge cannot be used at all (it refuses the key, or the URL is no chat-completions endpoint)."""


def endpoint(url: str) -> str:
    """The chat-completions URL of a base URL (http://host/v1) or of the endpoint itself."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_grade(content: str) -> dict | None:
    """The grade in a reply, or None unless it is exactly one JSON object (a ```json fence allowed) with an
    integer 0-10 for each score and an age group A-F."""
    text = content.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        grade = json.loads(text)
    except ValueError:
        return None
    if not isinstance(grade, dict) or set(grade) != set(SCORES) | {"age_group"}:
        return None
    if not all(type(grade[s]) is int and 0 <= grade[s] <= 10 for s in SCORES) or grade["age_group"] not in AGE_GROUPS:
        return None
    return grade


def ask(url: str, model: str, story: str, api_key: str | None, timeout: float, retries: int, backoff: float) -> str:
    """The judge's reply text; retried on errors that may pass, JudgeError on ones that will not."""
    body = json.dumps({"model": model, "temperature": 0, "messages": [
        {"role": "system", "content": RUBRIC}, {"role": "user", "content": story}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(endpoint(url), data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise JudgeError(f"the judge at {endpoint(url)} refused the request (HTTP {e.code}); put its key in "
                                 "the environment variable --judge_key_env names") from None
            if e.code == 404:
                raise JudgeError(f"{endpoint(url)} is no chat-completions endpoint (HTTP 404); pass the server's "
                                 "OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1") from None
            if e.code != 429 and e.code < 500 or attempt == retries:
                raise
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError):
            if attempt == retries:
                raise
        time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def grade_all(pairs: list[tuple[str, str]], url: str, model: str, cache_dir: str, api_key: str | None = None,
              timeout: float = 60.0, retries: int = 3, backoff: float = 1.0) -> tuple[list[dict | None], dict]:
    """Grades of (beginning, completion) pairs, and how many were graded, cached, unparseable or failed."""
    os.makedirs(cache_dir, exist_ok=True)
    grades, counts = [], {"graded": 0, "cached": 0, "unparseable": 0, "failed": 0}
    for beginning, completion in pairs:
        story = f"{beginning}***{completion}"
        key = hashlib.sha256(json.dumps([RUBRIC, model, story]).encode()).hexdigest()
        path = os.path.join(cache_dir, f"{key}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                grade = parse_grade(json.load(f)["reply"])
            counts["cached"] += 1
        else:
            try:
                reply = ask(url, model, story, api_key, timeout, retries, backoff)
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                grades.append(None)
                counts["failed"] += 1
                if counts["failed"] == GIVE_UP and not counts["graded"] + counts["cached"]:
                    raise JudgeError(f"no judge answered at {endpoint(url)} in {GIVE_UP} tries ({type(e).__name__}: "
                                     f"{e}); is the server running, and is the URL its OpenAI-compatible base?") from None
                continue
            grade = parse_grade(reply if isinstance(reply, str) else "")
            record = {"model": model, "story": story, "reply": reply}
            write_json(path, record)
            counts["graded"] += 1
        counts["unparseable"] += grade is None
        grades.append(grade)
    return grades, counts


def summarize(grades: list[dict | None]) -> dict:
    """Mean of each score over the parsed grades, and how often each age group was guessed."""
    parsed = [g for g in grades if g is not None]
    summary = {s: sum(g[s] for g in parsed) / len(parsed) if parsed else None for s in SCORES}
    summary["age_groups"] = {a: sum(g["age_group"] == a for g in parsed) for a in AGE_GROUPS}
    summary["parsed"] = len(parsed)
    return summary
