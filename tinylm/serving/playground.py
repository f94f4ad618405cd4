"""The story playground behind `python inference.py --serve`: a local web page that streams a story token by token,
colours each token by the probability the model gave it, shows the model's top-5 candidates at any token and
continues the story from the one clicked, and scores a pasted text token by token.

    server = make_server(models, device, host="127.0.0.1", port=8000)   # models: [name or folder, ...]
    server.serve_forever()

The stack is Python's standard library (http.server, one thread per request): it installs nothing, runs on every
Python TinyLM runs on, and streams as well as the page needs, since a story is a few hundred small events. Starlette
with uvicorn would add two packages for the same stream, and Gradio about a hundred megabytes of dependencies and
a page that fetches from the network. The page itself is playground.html, served as it is: it fetches nothing else.

API (JSON in, JSON or server-sent events out; any mistake is HTTP 400 with {"error": one sentence naming the field}):
    GET  /                 the page
    GET  /api/models       {"models": [names], "limits": {...}}
    GET  /api/status       {"active": streams now, "recent": the last streams: model, tokens, how each ended}
    POST /api/generate     {model, prompt | ids, temperature, top_k, top_p, max_new_tokens, seed} -> events:
                           {"model", "seed", "prompt", "ids"}, then per token {"id", "text", "p", "top": [[text, p,
                           id], ...]}, then {"done", "tokens", "seconds"}, or {"error"} if the server fails
                           mid-story, or {"stopped", "tokens"} if the server is stopped (Ctrl-C) mid-story;
                           429 while max_streams are being written, 503 once the server is stopping
    POST /api/score        {model, text} -> {"tokens": [{"token", "id", "loss", "top"}], "loss", "bits_per_byte"}
    POST /api/inside       {model, text | ids, position (default: the last token), pattern: [layer, head] or null}
                           -> {"tokens": [{"id", "text"}], "position", "layers": [{"layer", "heads": [{"head",
                           "type": "local" | "global", "window", "weights": the picked token's attention over tokens
                           0..position, "distance", "previous", "entropy"}]}], "lens": [{"layer": "embedding" | i |
                           "output", "top": [[text, p, id] x 5]}], "neurons": {"layers", "per_layer"}, and with
                           pattern "pattern": {"layer", "head", "weights": row t over tokens 0..t, every t}}. The
                           weights are the softmax probabilities of the forward pass (transformers'
                           output_attentions); distance, previous and entropy are the head's mean over the text.
    POST /api/neuron       {model, text | ids, layer, index} -> {"tokens", "activations": one per token (the MLP's
                           hidden activation after GELU), "top": {"state": "none" | "computing" (with "done" and
                           "of" stories) | "ready" (with "contexts": [{"before", "token", "after", "activation"}]) |
                           "failed" (with "why")}}: the top contexts come from --neuron_stories, computed once per
                           model, the first request starting it
The text of /api/inside and /api/neuron is bounded by the model's context and --max_prompt_chars.
"""

import contextlib
import dataclasses
import http.server
import json
import math
import os
import random
import threading
import time

import torch

from tinylm.checkpoint import load_model_and_tokenizer
from tinylm.data.tokenizer import text_stream
from tinylm.evaluation.scoring import token_view
from tinylm.serving.inside_api import inside_request, neuron_request
from tinylm.serving.requests import IDS_FIELD, RequestError, checked, checked_ids

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")
MAX_BODY_BYTES = 1 << 20
TOP = 5  # candidates shown at each token


@dataclasses.dataclass
class Playground:
    """What the request threads share: the models on offer (loaded on first use and kept), the limits, and a
    count of the stories being written."""
    models: list[str]
    device: torch.device
    max_streams: int = 4
    max_prompt_chars: int = 4000
    max_new_tokens: int = 1000
    loaded: dict = dataclasses.field(default_factory=dict)
    recent: list = dataclasses.field(default_factory=list)
    active: int = 0
    lock: threading.Condition = dataclasses.field(default_factory=threading.Condition)  # active and recent
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)  # set by stop()
    workers: set = dataclasses.field(default_factory=set)  # the request threads that used a model
    load_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    neuron_stories: str | None = None  # --neuron_stories: held-out stories for the neurons' top contexts
    neuron_index: dict = dataclasses.field(default_factory=dict)  # per model: their state, then the contexts

    def model(self, name):
        """(model, tokenizer) of a model on offer; a name not on offer is a RequestError naming `model`."""
        if name not in self.models:
            raise RequestError(f"model {name!r} is not one this server offers: {', '.join(self.models)}")
        with self.load_lock:  # one load at a time; later requests find it loaded
            if name not in self.loaded:
                self.loaded[name] = load_model_and_tokenizer(name, self.device)
        return self.loaded[name]

    def start_stream(self):
        with self.lock:
            if self.stopping.is_set():
                raise RequestError("the server is stopping and starts no new story", status=503)
            if self.active >= self.max_streams:
                raise RequestError(f"the server is busy: it writes {self.max_streams} "
                                   f"stor{'y' if self.max_streams == 1 else 'ies'} at once (--max_streams) and is "
                                   "writing that many now; try again in a moment", status=429)
            self.active += 1

    def end_stream(self, model: str, tokens: int, ended: str | None):
        with self.lock:
            self.active -= 1
            if ended is not None:
                self.recent = (self.recent + [{"model": model, "tokens": tokens, "ended": ended}])[-20:]
            self.lock.notify_all()

    def add_worker(self):
        """Counts the calling request thread among those stop() waits for (POSTs: they run the model)."""
        with self.lock:
            self.workers = {t for t in self.workers if t.is_alive()} | {threading.current_thread()}

    def stop(self, timeout: float = 30.0) -> int:
        """Ends every open story: each stream sends a last {"stopped"} event and its generation ends. Returns how
        many streams were open, once they have ended and every request thread that ran the model has exited (or
        `timeout` seconds passed). The process may then exit: a thread still running when the interpreter shuts
        down is killed where it stands, and inside PyTorch that aborts the process ("terminate called")."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.stopping.set()
            open_streams = self.active
            self.lock.wait_for(lambda: self.active == 0, timeout)
            workers = set(self.workers)
        for thread in workers - {threading.current_thread()}:
            thread.join(max(0.0, deadline - time.monotonic()))
        return open_streams


def generate_request(playground: Playground, body: dict) -> dict:
    name = playground.models[0]
    values = checked(body, {
        "model": (name, str, None, "the name of a model on offer"),
        "prompt": ("Once upon a time", str, None, "text"),
        "ids": IDS_FIELD,
        "temperature": (0.8, float, lambda v: 0 <= v <= 10, "a number from 0 (greedy) to 10"),
        "top_k": (50, int, lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
        "top_p": (None, float, lambda v: 0 < v <= 1, "a number in (0, 1], or null for no limit"),
        "max_new_tokens": (200, int, lambda v: 1 <= v <= playground.max_new_tokens,
                           f"an integer from 1 to {playground.max_new_tokens}"),
        "seed": (None, int, lambda v: 0 <= v < 2 ** 63, "an integer >= 0, or null for a random one"),
    })
    if len(values["prompt"]) > playground.max_prompt_chars:
        raise RequestError(f"prompt is {len(values['prompt']):,} characters; this server takes at most "
                           f"{playground.max_prompt_chars:,} (--max_prompt_chars)")
    return values


def story_events(playground: Playground, request: dict):
    """The events of one story (dicts), as generate_stream draws its tokens. A generator: closing it, as a
    client that leaves does, ends the generation."""
    model, tokenizer = playground.model(request["model"])
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if request["ids"] is not None:  # a branch: the story so far, in tokens, ending with the one chosen
        ids = checked_ids(request["ids"], vocab)
    else:
        ids = tokenizer.encode(request["prompt"]) or [tokenizer.eos_token_id]
    if len(ids) >= context:
        raise RequestError(f"prompt is {len(ids)} tokens and the model's context is {context}: shorten it to at "
                           f"most {context - 1} tokens")
    seed = request["seed"] if request["seed"] is not None else random.randrange(2 ** 31)
    generator = torch.Generator(device=playground.device).manual_seed(seed)
    max_new_tokens = min(request["max_new_tokens"], context - len(ids))
    prompt = tokenizer.decode(ids, skip_special_tokens=True)
    yield {"model": request["model"], "seed": seed, "prompt": prompt, "ids": ids, "max_new_tokens": max_new_tokens,
           "eos_id": tokenizer.eos_token_id}
    idx = torch.tensor([ids], device=playground.device)
    new_text, started = text_stream(tokenizer, ids), time.perf_counter()
    for token, logits in model.generate_stream(idx, max_new_tokens, request["temperature"], request["top_k"] or None,
                                               request["top_p"], eos_token_id=tokenizer.eos_token_id,
                                               generator=generator, output_logits=True):
        token = token.item()
        probs = logits[0].float().softmax(-1)  # what the model gave each token, before temperature and filters
        best = probs.topk(TOP)
        ids = ids + [token]
        yield {"id": token, "text": new_text(token), "p": round(probs[token].item(), 5),
               "eos": token == tokenizer.eos_token_id, "top": [[tokenizer.decode([i]), round(p, 5), i] for p, i in zip(best.values.tolist(),
                                                                                best.indices.tolist())]}
    yield {"done": True, "tokens": len(ids) - idx.size(1), "seconds": round(time.perf_counter() - started, 3)}


def score(playground: Playground, body: dict) -> dict:
    """Each token of a pasted text with its loss and the model's top candidates there, and the text's loss in
    nats/token and bits per UTF-8 byte (scoring.token_view, which evaluate.py's report shows too)."""
    values = checked(body, {"model": (playground.models[0], str, None, "the name of a model on offer"),
                            "text": ("", str, lambda v: v.strip() != "", "some text to score")})
    if len(values["text"]) > 20 * playground.max_prompt_chars:
        raise RequestError(f"text is {len(values['text']):,} characters; this server scores at most "
                           f"{20 * playground.max_prompt_chars:,}")
    model, tokenizer = playground.model(values["model"])
    with torch.inference_mode():
        view = token_view(model, tokenizer, values["text"], top=TOP, device=playground.device)
    total = sum(t["loss"] for t in view)
    scored = tokenizer.decode([t["id"] for t in view])  # the text as far as the model's context reached
    return {"model": values["model"], "tokens": view, "loss": total / len(view),
            "bits_per_byte": total / math.log(2) / max(1, len(scored.encode("utf-8"))),
            "cut": len(scored) < len(values["text"])}


class Handler(http.server.BaseHTTPRequestHandler):
    """One request, in its own thread; the server's `playground` holds what the threads share."""
    server_version = "TinyLM-playground"

    def do_GET(self):
        playground = self.server.playground
        if self.path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                self.reply(200, f.read(), "text/html; charset=utf-8")
        elif self.path == "/api/models":
            self.reply_json(200, {"models": playground.models, "limits": {
                "max_streams": playground.max_streams, "max_prompt_chars": playground.max_prompt_chars,
                "max_new_tokens": playground.max_new_tokens}})
        elif self.path == "/api/status":
            with playground.lock:
                self.reply_json(200, {"active": playground.active, "recent": playground.recent})
        else:
            self.reply_json(404, {"error": f"no page at {self.path}; the playground is at /"})

    def do_POST(self):
        self.server.playground.add_worker()
        try:
            body = self.read_body()
            if self.path == "/api/generate":
                self.stream(generate_request(self.server.playground, body))
            elif self.path == "/api/score":
                self.reply_json(200, score(self.server.playground, body))
            elif self.path == "/api/inside":
                self.reply_json(200, inside_request(self.server.playground, body))
            elif self.path == "/api/neuron":
                self.reply_json(200, neuron_request(self.server.playground, body))
            else:
                self.reply_json(404, {"error": f"no API at {self.path}: POST /api/generate, /api/score, /api/inside "
                                               "or /api/neuron"})
        except RequestError as e:
            self.reply_json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left before its answer
        except Exception as e:  # never a traceback to the page; the server's log keeps it
            self.log_error("%s", f"{type(e).__name__}: {e}")
            self.reply_json(500, {"error": f"the server failed: {type(e).__name__}: {e}"})

    def read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the request body is {length:,} bytes; at most {MAX_BODY_BYTES:,}")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body must be a JSON object ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object, e.g. {\"prompt\": \"Once upon a time\"}")
        return body

    def stream(self, request: dict):
        """Server-sent events, one per token, until the story ends or the client leaves (a failed write)."""
        playground = self.server.playground
        playground.start_stream()
        events, tokens, ended, started = story_events(playground, request), 0, "finished", False
        try:
            first = next(events)  # a mistake in the request is still a 400 here
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            started = True
            self.send_event(first)
            for event in events:
                if playground.stopping.is_set():
                    ended = "server stopped"
                    self.send_event({"stopped": "the server was stopped (Ctrl-C): the story ends here",
                                     "tokens": tokens})
                    break
                tokens += "id" in event
                self.send_event(event)
        except (BrokenPipeError, ConnectionResetError):
            ended = "client disconnected"
        except RequestError:
            ended = None  # refused before it started: not a story
            raise
        except Exception as e:
            ended = "failed"
            if not started:
                raise  # do_POST answers 500
            # the 200 and some tokens are out: the failure is the stream's last event, which the page shows
            self.log_error("%s", f"{type(e).__name__}: {e}")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_event({"error": f"the server failed mid-story: {type(e).__name__}: {e}"})
        except BaseException:
            ended = "failed"
            raise
        finally:
            events.close()  # stops the generation
            playground.end_stream(request["model"], tokens, ended)

    def send_event(self, event: dict):
        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.flush()

    def reply_json(self, status: int, data: dict):
        self.reply(status, json.dumps(data).encode(), "application/json")

    def reply(self, status: int, payload: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_request(self, code="-", size="-"):  # a line for a request that failed, not for every token page load
        if str(int(code) if isinstance(code, int) else code)[:1] in "45":
            super().log_request(code, size)


def make_server(models: list[str], device, host: str = "127.0.0.1", port: int = 8000, **limits):
    """A ThreadingHTTPServer for the playground, bound but not yet serving; the first model is loaded now, so a
    model that cannot load fails here, before a page is served. OSError where the port cannot be had."""
    playground = Playground(models, device, **limits)
    playground.model(models[0])
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True  # a stream still open does not keep Ctrl-C from ending the server
    server.playground = playground
    return server
