"""The story playground in a real browser: starts `inference.py --serve`, drives headless Chromium through the
DevTools protocol (a WebSocket; the client below is standard library only) the way a user would, and saves a
screenshot. bench/browser_check.sh runs it.

    python bench/browser_check.py --chromium /usr/bin/chromium [--model out/quickstart/best] [--out docs/playground.png]

Without --model it serves a small model with random weights that it builds (GPT-Neo's tokenizer), so it needs no
trained run: what CI runs.

Checks, each printed as `ok ...` (the first failure ends it with exit status 1):
  the page loads and lists the models; a typed prompt and a click on Generate stream a story whose tokens carry
  their probability's colour; hovering a token shows the model's top-5 there; clicking a candidate continues the
  story from it; Stop ends a long story; the score tab scores a pasted text in bits per byte; the Inside tab shows
  every head's attention from a clicked token, a clicked head's whole pattern, the logit lens, and a neuron's
  activations with its top contexts in held-out stories (saved as a second screenshot, NAME_inside.png).
"""

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DevTools:
    """A WebSocket to one Chromium page, speaking the DevTools protocol (JSON commands, answers by id)."""

    def __init__(self, ws_url: str):
        host_port, path = ws_url.removeprefix("ws://").split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(4096)
        if b" 101 " not in answer.split(b"\r\n")[0]:
            raise RuntimeError(f"the DevTools WebSocket refused: {answer[:200]!r}")
        self.next_id = 0

    def send_frame(self, text: str):
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                  if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools connection")
            data += chunk
        return data

    def read_message(self) -> dict:
        message = b""
        while True:
            first, second = self.read_exactly(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self.read_exactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.read_exactly(8))[0]
            message += self.read_exactly(n)
            if first & 0x80:  # the last fragment
                return json.loads(message)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.send_frame(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self.read_message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def mouse(self, kind: str, x: float, y: float):
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click(self, selector: str):
        x, y = self.centre(selector)
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def centre(self, selector: str) -> tuple[float, float]:
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                      "{block: 'center'}); const b = e.getBoundingClientRect(); return [b.x + b.width / 2, "
                      "b.y + b.height / 2]; })()")
        return box[0], box[1]

    def wait_for(self, expression: str, what: str, seconds: float = 30):
        end = time.time() + seconds
        while time.time() < end:
            if self.js(expression):
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")


def start(cmd: list[str], marker: str, stream: str) -> tuple[subprocess.Popen, str]:
    """A process and the first line of its `stream` (stdout/stderr) that holds `marker`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in getattr(proc, stream):
        if marker in line:
            return proc, line
    raise RuntimeError(f"{cmd[0]} ended without printing {marker!r}: {proc.stderr.read()[-2000:]}")


def check(ok: bool, what: str):
    if not ok:
        raise RuntimeError(f"FAILED: {what}")
    print(f"ok {what}", flush=True)


def run_checks(page: DevTools, url: str, shot: str):
    page.call("Emulation.setDeviceMetricsOverride", width=1100, height=760, deviceScaleFactor=1, mobile=False)
    page.call("Page.navigate", url=url)
    page.wait_for("document.readyState === 'complete' && document.querySelector('#model').options.length > 0",
                  "the page and its model list")
    models = page.js("document.querySelector('#model').options.length")
    check(True, f"the page loads from {url} and lists {models} model(s)")
    page.js("(() => { const p = document.querySelector('#prompt'); p.value = ''; p.focus(); })()")
    page.call("Input.insertText", text="Once upon a time, a little fox")
    page.js("document.querySelector('#seed').value = '7'; document.querySelector('#max_new_tokens').value = '80'")
    page.click("#generate")
    page.wait_for("document.querySelectorAll('.story .tok').length > 0", "the first streamed token")
    page.wait_for("!document.querySelector('#generate').disabled", "the story to end")
    story = page.js("document.querySelector('.story .prompt').textContent + document.querySelector('.story .body')"
                    ".textContent")
    tokens = page.js("document.querySelectorAll('.story .tok').length")
    check(story.startswith("Once upon a time, a little fox") and tokens >= 10,
          f"typing a prompt and clicking Generate streams a story: {tokens} tokens, {story[:70]!r}...")
    colours = page.js("[...document.querySelectorAll('.story .tok')].map(t => getComputedStyle(t).backgroundColor)")
    check(len(set(colours)) >= 3 and not any(c in ("rgba(0, 0, 0, 0)", "transparent") for c in colours),
          f"each token is coloured by its probability: {len(set(colours))} colours over {len(colours)} tokens")
    x, y = page.centre(".story .tok:nth-of-type(4)")
    page.mouse("mouseMoved", x, y)
    page.wait_for("getComputedStyle(document.querySelector('#tip')).display === 'block'", "the hover tooltip", 5)
    candidates = page.js("document.querySelectorAll('#tip button').length")
    check(candidates == 5, f"hovering a token shows the model's top {candidates} candidates there")
    page.call("Page.bringToFront")
    shot_data = page.call("Page.captureScreenshot", format="png")["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(shot_data))
    check(os.path.getsize(shot) > 10_000, f"screenshot saved: {shot}")
    before = page.js("document.querySelector('.story .body').textContent")
    chosen = page.js("document.querySelectorAll('#tip button')[1].firstChild.textContent")
    page.click("#tip button:nth-of-type(2)")
    page.wait_for("!document.querySelector('#generate').disabled && document.querySelectorAll('.story .tok')"
                  ".length > 4", "the branched story to end")
    after = page.js("document.querySelector('.story .body').textContent")
    fourth = page.js("document.querySelectorAll('.story .tok')[3].textContent")
    check(after != before and json.dumps(fourth)[1:-1] == chosen,
          f"clicking the candidate {chosen!r} continues the story from it")
    page.js("document.querySelector('#max_new_tokens').value = '1000'; document.querySelector('#seed').value = ''")
    page.click("#generate")
    page.wait_for("document.querySelectorAll('.story')[0].querySelectorAll('.tok').length > 2", "a long story")
    page.click("#stop")
    page.wait_for("!document.querySelector('#generate').disabled", "Stop to end the story", 10)
    page.wait_for("fetch('/api/status').then(r => r.json()).then(s => s.active === 0)", "the server to stop", 10)
    last = page.js("fetch('/api/status').then(r => r.json())")["recent"][-1]
    check(last["ended"] in ("client disconnected", "finished"),
          "Stop ends the story in the page and the server writes no more: "
          + (f"it stopped after {last['tokens']} tokens" if last["ended"] != "finished" else
             f"(this model wrote all {last['tokens']} tokens before the click)"))
    page.click("#tab-score")
    page.js("document.querySelector('#text').value = 'Once upon a time there was a little girl named Lily. "
            "She liked to play in the park.'")
    page.click("#score-go")
    page.wait_for("document.querySelector('#summary').textContent.includes('bits/byte')", "the score")
    summary = page.js("document.querySelector('#summary').textContent")
    check(True, f"the score tab scores a pasted text: {summary}")
    inside_checks(page, shot.removesuffix(".png") + "_inside.png")


def inside_checks(page: DevTools, shot: str):
    page.click("#tab-inside")
    page.js("document.querySelector('#inside-text').value = 'Once upon a time, Lily and Tom went to the park. Lily "
            "found a red ball and gave it to Tom. Tom smiled and said thank you to Lily.'")
    page.click("#inside-go")
    page.wait_for("document.querySelectorAll('#strips .strip').length > 0", "the Inside view")
    heads, strips = page.js("document.querySelectorAll('#heads td').length"), page.js(
        "document.querySelectorAll('#strips .strip').length")
    check(heads == strips >= 2, f"the Inside view shows {heads} heads in a grid and the picked token's attention in "
                                "each")
    page.click("#inside-tokens .tok:nth-of-type(6)")
    page.wait_for("document.querySelector('#inside-tokens .tok.picked') === "
                  "document.querySelectorAll('#inside-tokens .tok')[5]", "the clicked token to be picked")
    cells = page.js("document.querySelector('#strips .cells').children.length")
    check(cells == 6, f"clicking token 6 shows each head's attention over its {cells} tokens so far")
    page.click("#heads td")
    page.wait_for("!document.querySelector('#pattern').classList.contains('hidden')", "the head's pattern")
    check(True, "clicking a head draws its whole pattern: " + page.js("document.querySelector('#pattern-title')"
                                                                       ".textContent"))
    lens = page.js("document.querySelectorAll('#lens tr').length")
    check(lens >= 2, f"the logit lens lists {lens} rows: the embedding, each layer, the output")
    page.js("document.querySelector('#n-layer').value = '1'; document.querySelector('#n-index').value = '5'")
    page.click("#neuron-go")
    page.wait_for("document.querySelector('#neuron-state').textContent.startsWith('its top contexts')",
                  "the neuron's top contexts", 60)
    contexts = page.js("document.querySelectorAll('#contexts div').length")
    check(contexts > 0, f"a neuron shows its activation on each token and its top {contexts} contexts in held-out "
                        "stories")
    shot_data = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
    with open(shot, "wb") as f:
        f.write(base64.b64decode(shot_data))
    check(os.path.getsize(shot) > 10_000, f"screenshot of the Inside view saved: {shot}")


def random_model(folder: str) -> str:
    """A small GPT-Neo with random weights large enough to spread its probabilities (at GPT-Neo's 0.02 init every
    token would get the same colour), saved without tokenizer files: GPT-Neo's tokenizer applies."""
    import torch

    sys.path.insert(0, ROOT)
    from model import GPTNeo, GPTNeoConfig

    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig(vocab_size=50257, max_position_embeddings=512, n_layer=2, n_head=4, n_embd=64,
                                window_size=64, bos_token_id=50256, eos_token_id=50256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if name.startswith(("wte", "wpe")) else p.size(1) ** -0.5)
    model.save_pretrained(folder)
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chromium", required=True)
    p.add_argument("--model", default=None, help="the model to serve (default: a small one with random weights)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "playground.png"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or random_model(os.path.join(scratch, "random_model"))
        stories = os.path.join(scratch, "stories.txt")  # for the Inside view's neuron contexts
        with open(stories, "w") as f:
            f.write("".join(f"{name} went to the {place}. {name} saw a {thing} and smiled.\n<|endoftext|>\n"
                            for name in ("Lily", "Tom", "Sue") for place in ("park", "lake")
                            for thing in ("dog", "red ball")))
        server, line = start([sys.executable, "inference.py", "--serve", "--port", "0", "--model", model,
                              "--neuron_stories", stories], "http://", "stdout")
        check_in_browser(args.chromium, server, line.split("http://", 1)[1].split()[0], scratch, args.out)
    print("all browser checks passed")


def check_in_browser(chromium: str, server: subprocess.Popen, url: str, scratch: str, out: str):
    """Start headless Chromium (flags that keep it off this machine's closed network), run the checks, stop both."""
    profile = os.path.join(scratch, "profile")
    browser, line = start([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-quic", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                           "about:blank"], "DevTools listening on", "stderr")
    try:
        port = line.split("ws://", 1)[1].split("/")[0].split(":")[1]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        run_checks(page, "http://" + url, out)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    finally:
        browser.terminate()
        server.terminate()
        browser.wait(10)
        server.wait(10)

if __name__ == "__main__":
    main()
