"""playground.py and `inference.py --serve`: the real server on a free loopback port, spoken to over HTTP."""

import contextlib
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers import ROOT
from helpers import ctrl_c_reaches_it, small_gpt_neo
from tinylm.evaluation.scoring import token_view
from tinylm.modeling.generation import GenerationMixin
from tinylm.serving.playground import make_server



@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A small GPT-Neo folder with random weights and no tokenizer files (GPT-Neo's tokenizer applies)."""
    folder = tmp_path_factory.mktemp("playground_model")
    small_gpt_neo(context=128, window=16).save_pretrained(folder)
    return str(folder)


@contextlib.contextmanager
def serving(models: list[str], **limits):
    """The playground serving in a thread, on a free port, until the block ends: its open work stopped (the
    neurons' contexts being built included), then the server shut."""
    running = make_server(models, torch.device("cpu"), port=0, **limits)
    threading.Thread(target=running.serve_forever, daemon=True).start()
    try:
        yield running
    finally:
        running.playground.stop()
        running.shutdown()
        running.server_close()


@pytest.fixture
def server(model_folder):
    """The playground serving in a thread, on a free port; yields (server, folder)."""
    with serving([model_folder], max_streams=1, max_prompt_chars=400) as running:
        yield running, model_folder


def request(server, method: str, path: str, body=None, raw: bytes | None = None):
    """(status, JSON or text) of one request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(data) if kind.startswith("application/json") else data


def events_of(text: str) -> list[dict]:
    return [json.loads(chunk.removeprefix("data: ")) for chunk in text.split("\n\n") if chunk.strip()]


def test_the_page_is_served_whole_and_fetches_nothing_from_the_network(server):
    running, folder = server
    status, page = request(running, "GET", "/")
    assert status == 200 and "<title>TinyLM playground</title>" in page
    for outside in ("http://", "https://", "//cdn", "@import"):  # no script, style, font or image from elsewhere
        assert outside not in page
    status, models = request(running, "GET", "/api/models")
    assert status == 200 and models["models"] == [folder] and models["limits"]["max_streams"] == 1


def test_a_streamed_story_has_the_tokens_generate_gives_with_the_same_seed(server):
    running, folder = server
    body = {"prompt": "Once upon a time", "temperature": 0.9, "top_k": 20, "top_p": 0.9, "max_new_tokens": 40, "seed": 3}
    status, text = request(running, "POST", "/api/generate", body)
    events = events_of(text)
    head, tokens, done = events[0], [e for e in events if "id" in e], events[-1]
    assert status == 200 and head["model"] == folder and head["seed"] == 3 and done["tokens"] == len(tokens) == 40
    model, tokenizer = running.playground.model(folder)
    idx = torch.tensor([head["ids"]])
    want = model.generate(idx, 40, 0.9, 20, 0.9, eos_token_id=tokenizer.eos_token_id,
                          generator=torch.Generator().manual_seed(3))[0, idx.size(1):].tolist()
    assert [e["id"] for e in tokens] == want
    assert head["prompt"] + "".join(e["text"] for e in tokens) == tokenizer.decode(head["ids"] + want)
    with torch.no_grad():  # each token's probability is the model's, before temperature and filtering
        probs = model(torch.tensor([head["ids"] + want]))[0][0, idx.size(1) - 1:-1].softmax(-1)
    for e, p in zip(tokens, probs):
        assert e["p"] == pytest.approx(p[e["id"]].item(), abs=1e-5)
        assert [c[2] for c in e["top"]] == p.topk(5).indices.tolist()
    # a branch: the story so far plus a chosen candidate continues from exactly there
    ids = head["ids"] + want[:5] + [tokens[5]["top"][1][2]]
    status, text = request(running, "POST", "/api/generate", {"ids": ids, "max_new_tokens": 3, "seed": 1})
    assert status == 200 and events_of(text)[0]["ids"] == ids and len([e for e in events_of(text) if "id" in e]) == 3


@pytest.mark.parametrize("body, says", [
    ({"temperature": -1}, "temperature must be a number from 0 (greedy) to 10, got -1"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1]"),
    ({"top_k": "ten"}, "top_k must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer from 1 to 1000"),
    ({"prompt": "a " * 300}, "prompt is 600 characters; this server takes at most 400 (--max_prompt_chars)"),
    ({"model": "out/nothing"}, "model 'out/nothing' is not one this server offers"),
    ({"temprature": 1}, "unknown field 'temprature'"),
    ({"ids": [1, 99999999]}, "ids must hold 1 or more token ids from 0 to 50256"),
    ({"ids": list(range(130))}, "prompt is 130 tokens and the model's context is 128"),
    ([1, 2], "the request body must be a JSON object"),
])
def test_a_bad_request_is_one_sentence_naming_the_field(server, body, says):
    running, _ = server
    status, answer = request(running, "POST", "/api/generate", body)
    assert status == 400 and answer["error"].startswith(says) and "Traceback" not in answer["error"]
    assert request(running, "POST", "/api/generate", raw=b"{not json")[0] == 400
    assert request(running, "GET", "/api/status")[1] == {"active": 0, "recent": []}  # refused, never started


def test_past_the_limit_the_server_is_busy_and_a_client_that_leaves_stops_its_story(server, monkeypatch):
    running, _ = server
    per_token_step = GenerationMixin.per_token_step

    def slow(self, backend, device, **options):
        step = per_token_step(self, backend, device, **options)
        return lambda *a: time.sleep(0.02) or step(*a)
    monkeypatch.setattr(GenerationMixin, "per_token_step", slow)
    conn = http.client.HTTPConnection(*running.server_address[:2], timeout=30)
    conn.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": 100, "seed": 0}))
    sock = conn.sock  # the response takes it over: a stream's end is the connection's
    stream = conn.getresponse()
    assert stream.status == 200 and stream.fp.readline().startswith(b"data: ")  # the story has started
    status, answer = request(running, "POST", "/api/generate", {"max_new_tokens": 5})
    assert status == 429 and answer["error"].startswith("the server is busy: it writes 1 story at once")
    sock.shutdown(2)  # the client leaves mid-story
    stream.close()
    sock.close()
    end = time.time() + 10
    while request(running, "GET", "/api/status")[1]["active"] and time.time() < end:
        time.sleep(0.05)
    last = request(running, "GET", "/api/status")[1]["recent"][-1]
    assert last["ended"] == "client disconnected" and last["tokens"] < 50
    assert request(running, "POST", "/api/generate", {"max_new_tokens": 2})[0] == 200  # the slot is free again


def test_a_failure_mid_story_is_the_last_event_not_a_second_response(server, monkeypatch):
    running, _ = server
    per_token_step = GenerationMixin.per_token_step

    def failing(self, backend, device, **options):
        step, calls = per_token_step(self, backend, device, **options), []

        def fail_at_the_third(*a):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("out of memory")
            return step(*a)
        return fail_at_the_third
    monkeypatch.setattr(GenerationMixin, "per_token_step", failing)
    status, text = request(running, "POST", "/api/generate", {"max_new_tokens": 10, "seed": 0})
    events = events_of(text)  # before the fix, an HTTP 500 response was written into the event stream
    assert status == 200 and "HTTP/" not in text
    assert [("id" in e, "error" in e) for e in events[1:]] == [(True, False)] * 3 + [(False, True)]
    assert events[-1]["error"] == "the server failed mid-story: RuntimeError: out of memory"
    assert request(running, "GET", "/api/status")[1]["recent"][-1]["ended"] == "failed"
    monkeypatch.undo()
    assert request(running, "POST", "/api/generate", {"max_new_tokens": 2})[0] == 200  # the slot is free again


def test_score_colours_each_token_by_its_loss_and_gives_bits_per_byte(server):
    running, folder = server
    text = "Once upon a time there was a little cat. The cat liked milk."
    status, answer = request(running, "POST", "/api/score", {"text": text})
    model, tokenizer = running.playground.model(folder)
    view = token_view(model, tokenizer, text)
    assert status == 200 and [t["id"] for t in answer["tokens"]] == [t["id"] for t in view]
    assert [t["loss"] for t in answer["tokens"]] == pytest.approx([t["loss"] for t in view], abs=1e-5)
    total = sum(t["loss"] for t in view)
    assert answer["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-5)
    assert not answer["cut"]
    assert request(running, "POST", "/api/score", {"text": "  "})[1]["error"].startswith("text must be some text")


def test_serve_prints_its_address_warns_when_opened_wider_and_stops_on_ctrl_c(model_folder):
    cmd = [sys.executable, "inference.py", "--serve", "--port", "0", "--host", "0.0.0.0", "--model", model_folder]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=ctrl_c_reaches_it)
    try:
        line = proc.stdout.readline()
        assert line.startswith("# TinyLM playground: http://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
        taken = subprocess.run([sys.executable, "inference.py", "--serve", "--port", str(port), "--model",
                                model_folder], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert taken.returncode == 1 and taken.stderr.startswith(f"error: --host 127.0.0.1 --port {port} cannot be "
                                                                 "served") and "Traceback" not in taken.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "playground stopped" in err and "Traceback" not in err
    assert "warning: --host 0.0.0.0 serves every machine that can reach port" in err


SLOW_SERVER = """
import sys, time
from tinylm.modeling.generation import GenerationMixin
real = GenerationMixin.generate_stream
def slow(self, *args, **kwargs):  # past the 5th token, a token every 50 ms: the story is streaming at Ctrl-C
    for i, item in enumerate(real(self, *args, **kwargs)):
        if i >= 5:
            time.sleep(0.05)
        yield item
GenerationMixin.generate_stream = slow
import inference
inference.main(sys.argv[1:])
"""


def next_event(response) -> dict:
    """The next server-sent event of a streaming response: "data: {...}" and a blank line."""
    line = response.readline().decode()
    assert response.readline() == b"\n"
    return json.loads(line.removeprefix("data: "))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_mid_story_ends_the_stream_with_a_last_event_and_exits_0(tmp_path, stop):
    small_gpt_neo(context=1024, window=16).save_pretrained(tmp_path)
    cmd = [sys.executable, "-c", SLOW_SERVER, "--serve", "--port", "0", "--model", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=ctrl_c_reaches_it)
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": 1000, "temperature": 1.0,
                                                               "top_k": 0, "seed": 1}))
        response = conn.getresponse()
        assert response.status == 200
        first = [next_event(response) for _ in range(10)]
        assert "model" in first[0] and all("id" in event for event in first[1:])
        proc.send_signal(stop)
        rest = events_of(response.read().decode())
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert rest and rest[-1]["stopped"].startswith("the server was stopped") and "done" not in rest[-1]
    assert rest[-1]["tokens"] == 9 + sum("id" in event for event in rest[:-1]) < 1000
    assert proc.returncode == 0, err
    assert "playground stopped (1 open story ended)" in err and "terminate called" not in err, err
