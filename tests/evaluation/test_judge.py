"""judge.py against a real OpenAI-compatible HTTP server on 127.0.0.1: a 500, a timeout and a malformed reply
are retried or counted, never a crash; grades are cached so a rerun asks nothing."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tinylm.evaluation.judge import JudgeError, grade_all, parse_grade, summarize

GOOD = {"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age_group": "C"}


@pytest.fixture
def server():
    """A chat-completions server whose reply to each story is scripted: story text (or "*" for any other) -> list
    of behaviours, one per request ("500", "slow", "401", or the reply content), the last one repeating."""
    script, requests = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            story = body["messages"][-1]["content"]
            actions = script[story] if story in script else script["*"]  # "*": every story not scripted
            action = actions.pop(0) if len(actions) > 1 else actions[0]
            if action == "slow":
                time.sleep(1.0)
            if action in ("500", "401"):
                self.send_response(int(action))
                self.end_headers()
                return
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script, requests
    httpd.shutdown()


def test_errors_are_retried_or_counted_and_grades_are_cached(server, tmp_path):
    url, script, requests = server
    pairs = [("Lily had a", " red ball."), ("Tom saw a", " big dog."), ("Sue went", " home."), ("Max ran", " away.")]
    script["Lily had a*** red ball."] = ["500", json.dumps(GOOD)]  # a server error, then an answer
    script["Tom saw a*** big dog."] = ["slow", "```json\n" + json.dumps({**GOOD, "plot": 9}) + "\n```"]  # a timeout
    script["Sue went*** home."] = ["I think this story deserves a 7 for grammar."]  # no JSON: unparseable
    script["Max ran*** away."] = ["500"]  # never answers: failed after the retries
    grades, counts = grade_all(pairs, url, "judge-1", str(tmp_path), api_key="sk-test", timeout=0.5, retries=2,
                               backoff=0.01)
    assert grades == [GOOD, {**GOOD, "plot": 9}, None, None]
    assert counts == {"graded": 3, "cached": 0, "unparseable": 1, "failed": 1}
    assert requests[0]["path"] == "/v1/chat/completions" and requests[0]["auth"] == "Bearer sk-test"
    assert requests[0]["body"]["model"] == "judge-1" and requests[0]["body"]["messages"][0]["role"] == "system"
    asked = len(requests)
    again, counts = grade_all(pairs[:3], url, "judge-1", str(tmp_path), timeout=0.5, retries=2, backoff=0.01)
    assert again == grades[:3] and counts["cached"] == 3 and len(requests) == asked  # nothing asked twice
    summary = summarize(grades)
    assert summary["plot"] == 7.5 and summary["parsed"] == 2 and summary["age_groups"]["C"] == 2


def test_a_refused_key_stops_with_one_sentence(server, tmp_path):
    url, script, _ = server
    script["a***b"] = ["401"]
    with pytest.raises(JudgeError, match=r"refused the request \(HTTP 401\)"):
        grade_all([("a", "b")], url, "judge-1", str(tmp_path), backoff=0.01)


def test_no_server_at_all_stops_with_one_sentence(tmp_path):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match=rf"no judge answered at http://127.0.0.1:{port}/v1/chat/completions in 3 "
                                         "tries"):
        grade_all([("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")], f"http://127.0.0.1:{port}/v1", "j",
                  str(tmp_path), timeout=1, retries=1, backoff=0.01)


def test_replies_are_parsed_strictly():
    assert parse_grade(json.dumps(GOOD)) == GOOD
    for bad in ["", "{}", json.dumps({**GOOD, "grammar": 11}), json.dumps({**GOOD, "grammar": 7.5}),
                json.dumps({**GOOD, "age_group": "Z"}), json.dumps({**GOOD, "extra": 1}), json.dumps([GOOD])]:
        assert parse_grade(bad) is None, bad


def test_evaluate_grades_the_completions_through_the_judge(server, tmp_path, monkeypatch, capsys):
    import torch

    from evaluate import main as evaluate_main
    from model import GPTNeo, GPTNeoConfig
    from helpers import make_stories, write_txt
    url, script, requests = server

    script["*"] = [json.dumps(GOOD)]
    torch.manual_seed(0)
    GPTNeo(GPTNeoConfig(max_position_embeddings=128, n_layer=1, n_head=2, n_embd=16)).save_pretrained(
        str(tmp_path / "m"))
    data = write_txt(tmp_path / "held_out.txt", make_stories(60, 3))
    monkeypatch.setenv("JUDGE_KEY", "sk-evaluate")
    evaluate_main(["--model", str(tmp_path / "m"), "--data", data, "--completions", "3", "--story_tokens", "5",
                   "--completion_tokens", "0", "--judge", url, "--judge_model", "judge-1", "--judge_key_env",
                   "JUDGE_KEY", "--judge_cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")])
    judged = json.loads((tmp_path / "r.json").read_text())["models"][str(tmp_path / "m")]["judge"]
    assert judged["parsed"] == judged["graded"] == 3 and judged["plot"] == 6 and judged["failed"] == 0
    assert {r["auth"] for r in requests} == {"Bearer sk-evaluate"}
    assert "judge: consistency (0-10)" in capsys.readouterr().out
