"""inference.py: greedy output equals transformers' generate; the CLI samples, streams and fails clearly."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPTNeoConfig as HFConfig
from transformers import GPTNeoForCausalLM

from conftest import DEVICE, hub_cache_snapshot
from helpers import ROOT
from helpers import sharpen_, small_gpt_neo
from inference import encode_prompt
from model import GPTNeo, GPTNeoConfig
from tinylm.checkpoint import newest_model
from tinylm.checkpoint import load_model_and_tokenizer

INFERENCE = os.path.join(ROOT, "inference.py")


@pytest.fixture(scope="module")
def tinystories_1m_folder(tmp_path_factory):
    """A TinyStories-1M-shaped Hugging Face folder (random weights, no tokenizer files: the GPT-Neo one applies)."""
    config = HFConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=64, num_layers=8, num_heads=16,
                      window_size=256, attention_types=[[["global", "local"], 4]])
    torch.manual_seed(0)
    hf = sharpen_(GPTNeoForCausalLM(config)).eval()
    folder = tmp_path_factory.mktemp("TinyStories-1M")
    hf.save_pretrained(folder)
    return str(folder), hf


def run_cli(*args, cwd=ROOT, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, INFERENCE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_greedy_matches_transformers_token_for_token_past_the_window(tinystories_1m_folder, backend):
    folder, hf = tinystories_1m_folder
    model, tokenizer = load_model_and_tokenizer(folder, DEVICE)
    idx = encode_prompt(tokenizer, "Once upon a time there was a little fox", DEVICE)
    n = 300  # the prompt plus 300 tokens runs well past the 256-token window of the local layers
    ours = model.generate(idx, n, temperature=0, backend=backend)
    hf = copy.deepcopy(hf).to(DEVICE)  # the fixture's copy stays on the CPU for the CLI tests
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=50256)
    assert ours.size(1) == idx.size(1) + n
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("flags", [[], ["--native"]])
def test_cli_prints_prompt_and_greedy_story(tinystories_1m_folder, flags):
    folder, hf = tinystories_1m_folder
    r = run_cli("--model", folder, "--prompt", "Once upon a time", "--max_new_tokens", "12", "--temperature", "0",
                *flags)
    if flags and r.returncode and "no C compiler" in r.stderr:
        pytest.skip(r.stderr)
    assert r.returncode == 0, r.stderr
    from tinylm.data.tokenizer import gpt_neo_tokenizer
    tok = gpt_neo_tokenizer()
    idx = torch.tensor([tok.encode("Once upon a time")])
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=50256)
    assert r.stdout == tok.decode(ref[0]) + "\n"
    assert "tokens/s" in r.stderr


def test_cli_seeded_samples_repeat(tmp_path):
    folder = tmp_path / "tiny"
    GPTNeo(GPTNeoConfig(n_layer=2, n_head=2, n_embd=16, max_position_embeddings=64)).save_pretrained(str(folder))
    args = ("--model", str(folder), "--max_new_tokens", "8", "--num_samples", "2", "--seed", "3", "--top_p", "0.9")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.count("--- sample") == 2


def test_no_arguments_uses_newest_checkpoint_else_says_what_to_do(tmp_path):
    r = run_cli(cwd=tmp_path)
    assert r.returncode != 0
    assert "train a model first" in r.stderr and "--model" in r.stderr and "Traceback" not in r.stderr
    # offline, the command it suggests must run offline: the quickstart on a text file, not the hub dataset
    assert r.stderr.startswith("error: ") and "config/quickstart.config --set data.dataset=" in r.stderr
    assert "tiny_lm_1M" not in r.stderr
    for name in ("old", "new"):
        GPTNeo(GPTNeoConfig(n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32)).save_pretrained(
            str(tmp_path / "out" / name))
    os.utime(tmp_path / "out" / "old" / "config.json", (1, 1))
    assert newest_model(str(tmp_path / "out"))[0] == str(tmp_path / "out" / "new")
    r = run_cli("--max_new_tokens", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and os.path.join("out", "new") in r.stderr


def test_cli_rejects_bad_requests(tmp_path):
    folder = tmp_path / "tiny"
    GPTNeo(GPTNeoConfig(n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32)).save_pretrained(str(folder))
    r = run_cli("--model", str(folder), "--max_new_tokens", "100", "--temperature", "0")  # more than fits: lowered
    assert r.returncode == 0 and "--max_new_tokens 100 lowered to 28: the prompt is 4 tokens" in r.stderr
    assert "# 28 tokens" in r.stderr
    r = run_cli("--model", str(folder), "--prompt", "Once upon a time" * 10)  # 40 tokens: longer than the context
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: the prompt is 40 tokens and the model's context is 32 (max_position_embeddings): shorten the " \
           "prompt to at most 31 tokens" in r.stderr
    for device, message in [("foo", "--device 'foo' is not a device TinyLM runs on; use cpu, cuda"),
                            ("cuda:7", "--device cuda:7: "), ("mps", "--device mps: ")]:
        if device.startswith("cuda") and torch.cuda.device_count() > 7 or device == "mps" and \
                torch.backends.mps.is_available():
            continue
        r = run_cli("--model", str(folder), "--device", device)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    (folder / "config.json").write_text('{"model_type": "gpt_neo",\x01')  # damaged
    r = run_cli("--model", str(folder))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{folder / 'config.json'} cannot be read" in r.stderr and "damaged" in r.stderr
    r = run_cli("--model", str(folder), "--temperature", "-1")
    assert r.returncode != 0 and "temperature must be >= 0" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", str(tmp_path / "missing"))
    assert r.returncode != 0 and "no model folder" in r.stderr and "Traceback" not in r.stderr


def test_eval_file_matches_transformers_loss(tmp_path):
    import math
    hf = small_gpt_neo(context=128, window=16, seed=1)
    hf.save_pretrained(tmp_path / "m")
    stories = ["Once upon a time, a cat sat.", "Tom ran to the park! 🙂", "The end."]
    (tmp_path / "eval.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    from tinylm.data.tokenizer import gpt_neo_tokenizer
    tok = gpt_neo_tokenizer()
    ids = torch.tensor([[i for s in stories for i in tok.encode(s) + [50256]]])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:]).item()
    r = run_cli("--model", str(tmp_path / "m"), "--eval_file", str(tmp_path / "eval.txt"), "--block_size", "128")
    assert r.returncode == 0, r.stderr
    n_bytes = sum(len(s.encode()) for s in stories)
    assert f"{ids.size(1) - 1:,} tokens scored" in r.stdout and f"{n_bytes:,} bytes" in r.stdout
    assert f"loss {ref:.4f} nats/token" in r.stdout
    assert f"{ref * (ids.size(1) - 1) / math.log(2) / n_bytes:.4f} bits/byte" in r.stdout
    r = run_cli("--model", str(tmp_path / "m"), "--eval_file", str(tmp_path / "missing.txt"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    # one sentence naming the flag, and no note about a --block_size the user never passed
    assert r.stderr.strip() == (f"error: --eval_file {tmp_path / 'missing.txt'}: no eval file there; pass a text file "
                                "of stories separated by <|endoftext|> lines")
    (tmp_path / "one.txt").write_text("Once upon a time, a cat sat.\n", encoding="utf-8")
    r = run_cli("--model", str(tmp_path / "m"), "--eval_file", str(tmp_path / "one.txt"))  # the model's 128, unsaid
    assert r.returncode == 0 and "lowered" not in r.stderr and "(1 story, 28 bytes)" in r.stdout, r.stderr


def test_sharded_evaluation_adds_up_to_the_whole():
    # train.py under torchrun: rank r of n scores every n-th batch, and the ranks' sums give the full evaluation
    from tinylm.evaluation.scoring import evaluate_loss
    model = GPTNeo(GPTNeoConfig(vocab_size=60, max_position_embeddings=32, n_layer=1, n_head=2, n_embd=16))
    tokens = torch.randint(0, 60, (1000,), generator=torch.Generator().manual_seed(1)).numpy()
    whole, n = evaluate_loss(model, tokens, batch_size=2, block_size=32)
    parts = [evaluate_loss(model, tokens, batch_size=2, block_size=32, shard=(r, 3)) for r in range(3)]
    assert n == 999 and sum(c for _, c in parts) == n and all(c > 0 for _, c in parts)
    assert sum(loss * c for loss, c in parts) / n == pytest.approx(whole, rel=1e-6)


def test_readme_start_makes_a_virtualenv_and_says_where_commands_run():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.split("## Start\n", 1)[1].split("\n## ", 1)[0]
    commands = start.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert commands[0].startswith("python3 -m venv .venv") and "pip install -r requirements.txt" in commands[1]
    assert "Python snippet below run from the repository root" in start


def test_readme_python_snippet_runs_verbatim_on_a_trained_folder(tmp_path):
    # the snippet under "Using the model from Python", with only its example path replaced by a trained model
    from helpers import train_config
    from train import main as train_main
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    snippet = readme.split("### Using the model from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"out/quickstart/best"' in snippet
    config = train_config(tmp_path, max_steps=2, eval_interval=2)
    assert train_main(["--config", config, "--set", "model.max_position_embeddings=128"]) == 0
    best = str(tmp_path / "out" / "best")
    # seeded, because a model trained 2 steps may sample end-of-text within a few tokens (one CI run did)
    program = "import torch; torch.manual_seed(0)\n" + snippet.replace('"out/quickstart/best"', repr(best))
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Once upon a time") and len(done.stdout) > len("Once upon a time") + 20


def test_generation_takes_the_fastest_exact_backend_by_default(tinystories_1m_folder, monkeypatch):
    pytest.importorskip("tinylm.kernels.native")
    from tinylm.kernels.native import load_library
    try:
        load_library()
    except RuntimeError as e:
        pytest.skip(str(e))
    model = GPTNeo.from_pretrained(tinystories_1m_folder[0])
    assert model.choose_backend() == "native" and model.choose_backend(batch_size=12) == "native"
    assert model.choose_backend(batch_size=13) == "eager"  # batched matmuls win for wide batches
    assert GPTNeo(GPTNeoConfig(n_embd=768, n_layer=1)).choose_backend(batch_size=2) == "eager"
    assert model.double().choose_backend() == "eager" and model.float().choose_backend("compile") == "compile"
    dropout = GPTNeo(GPTNeoConfig(n_layer=1, n_head=2, n_embd=16, dropout=0.1))
    assert dropout.train().choose_backend() == "eager" and dropout.eval().choose_backend() == "native"
    with pytest.raises(ValueError, match="backend must be one of auto, native, compile, eager"):
        model.choose_backend("fast")
    from tinylm.kernels import native
    built, real = [], native.native_decode_step
    monkeypatch.setattr(native, "native_decode_step", lambda m, *a: built.append(m) or real(m, *a))
    idx = torch.tensor([[7454, 2402, 257, 640]])
    assert torch.equal(model.generate(idx, 20, temperature=0), model.generate(idx, 20, temperature=0, backend="eager"))
    assert len(built) == 1  # the default ran decode.c, and gave the eager tokens


def test_cli_says_which_backend_it_runs_and_falls_back_quietly(tinystories_1m_folder):
    folder = tinystories_1m_folder[0]
    args = ("--model", folder, "--max_new_tokens", "5", "--temperature", "0")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    if "native decoding" not in r.stderr:
        pytest.skip("decode.c does not build here")
    env = {"CC": "/nonexistent/cc"}  # no C compiler: the default quietly runs PyTorch, --native says why not
    fallback = subprocess.run([sys.executable, INFERENCE, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})
    assert fallback.returncode == 0 and "eager decoding" in fallback.stderr and fallback.stdout == r.stdout
    refused = subprocess.run([sys.executable, INFERENCE, *args, "--native"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, **env})
    assert refused.returncode != 0 and "no C compiler" in refused.stderr and "Traceback" not in refused.stderr


def test_speed_line_leaves_out_the_compile():
    from inference import speed_line
    arrived = [0.0, 0.1, 10.1, 10.2, 10.3, 10.4]  # prefill 0.1 s, the first (compiling) step 10 s, then 0.1 s each
    assert speed_line(arrived, compiled=False) == "# 5 tokens, 0 tokens/s"
    assert speed_line(arrived, compiled=True) == \
        "# 5 tokens, 10 tokens/s after the first step, which compiled in 10.0 s"


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_hub_id_loads_offline_from_the_hub_cache(tinystories_1m_folder, tmp_path, monkeypatch, weights):
    # roneneldan/TinyStories-1M as a machine that downloaded it holds it: safetensors as the hub serves it now, or
    # the 2023 pytorch_model.bin, which also holds lm_head.weight and transformers 4.x's mask buffers
    folder, hf = tinystories_1m_folder
    files = {"config.json": os.path.join(folder, "config.json")}
    if weights == "model.safetensors":
        files[weights] = os.path.join(folder, weights)
    else:
        state = dict(hf.state_dict(), **{"lm_head.weight": hf.lm_head.weight})
        for i in range(8):
            state[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, 2048, 2048, dtype=torch.bool).tril()
            state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
        torch.save(state, tmp_path / weights)
        files[weights] = str(tmp_path / weights)
    from tinylm.data.tokenizer import gpt_neo_tokenizer
    gpt_neo_tokenizer().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))  # the hub repo ships one
    files["tokenizer.json"] = str(tmp_path / "tokenizer.json")
    cache = tmp_path / "hub"
    snapshot = hub_cache_snapshot(cache, "roneneldan/TinyStories-1M", files)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    model = GPTNeo.from_pretrained("roneneldan/TinyStories-1M")
    idx = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)
    model, tokenizer = load_model_and_tokenizer("roneneldan/TinyStories-1M", "cpu")
    assert len(tokenizer) == 50257

    env = {"HF_HUB_CACHE": str(cache)}
    r = run_cli("--model", "roneneldan/TinyStories-1M", "--prompt", "Once upon a time", "--max_new_tokens", "12",
                "--temperature", "0", env=env)
    assert r.returncode == 0, r.stderr
    idx = torch.tensor([tokenizer.encode("Once upon a time")])
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=50256)
    assert r.stdout == tokenizer.decode(ref[0]) + "\n"
    os.remove(os.path.join(snapshot, weights))  # an interrupted download: one sentence, no traceback
    r = run_cli("--model", "roneneldan/TinyStories-1M", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "has no model.safetensors" in r.stderr


def test_cli_says_each_mistake_in_one_sentence(tmp_path, capsys):
    from inference import main as inference_main
    run = tmp_path / "run"
    trimmed = GPTNeo(GPTNeoConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32))
    trimmed.save_pretrained(str(run / "best"))  # a model of a trimmed vocabulary, its tokenizer.json missing
    GPTNeo(GPTNeoConfig(n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32)).save_pretrained(str(tmp_path / "m"))
    (tmp_path / "eval.txt").write_text("Once upon a time there was a cat.\n<|endoftext|>\n" * 4)

    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            inference_main(list(argv))
        return str(e.value)
    assert fails("--model", str(tmp_path / "m"), "--top_k", "-1") == "error: --top_k must be >= 0 (0: no limit), got -1"
    assert fails("--serve", "--neuron_stories", str(tmp_path / "none.txt")) == (
        f"error: --neuron_stories {tmp_path / 'none.txt'}: no such file; pass held-out stories separated by "
        "<|endoftext|> lines (.txt), or .jsonl/.parquet rows with a text field")
    assert fails("--model", str(tmp_path / "m"), "--top_p", "1.5") == "error: --top_p must be in (0, 1] (1: no limit), " \
                                                                       "got 1.5"
    assert fails("--model", str(tmp_path)) == f"error: {tmp_path} is no model folder but holds some, e.g. " \
                                             f"{run / 'best'}: pass that one with --model"  # best/ comes first
    eval_args = ("--model", str(tmp_path / "m"), "--eval_file", str(tmp_path / "eval.txt"))
    assert fails(*eval_args, "--block_size", "0") == "error: --block_size must be >= 1, got 0"
    assert fails(*eval_args, "--batch_size", "0") == "error: --batch_size must be >= 1, got 0"
    assert fails("--model", str(run)) == (
        f"error: {run / 'best'} has no tokenizer.json, and its model has 300 tokens, not the 50257 of GPT-Neo's "
        f"tokenizer: copy the tokenizer.json of the run that trained it into {run / 'best'}")
    capsys.readouterr()
    inference_main([*eval_args, "--block_size", "1024"])  # longer than the model's context: lowered, and said
    assert "--block_size 1024 lowered to 32, the model's context" in capsys.readouterr().err
    inference_main(["--model", str(tmp_path / "m"), "--max_new_tokens", "0"])
    assert "# 0 tokens" in capsys.readouterr().err
    inference_main(["--model", str(tmp_path / "m"), "--prompt", "Once", "--max_new_tokens", "100"])
    assert "the prompt is 1 token and the model's context 32" in capsys.readouterr().err
    (run / "best" / "config.json").unlink()
    GPTNeo(GPTNeoConfig(n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32)).save_pretrained(str(run / "best"))
    inference_main(["--model", str(run), "--max_new_tokens", "3"])  # a run folder stands for its best model
    assert f"{run} is a training run: using its best model, {run / 'best'}" in capsys.readouterr().err


def test_loading_and_sampling_keep_dynamo_out(tmp_path):
    # importing torch._dynamo costs 0.8 s of every start: neither from_pretrained nor the native and eager steps
    # need it (it came in through a second model built on "meta", and through torch.compiler.set_stance)
    GPTNeo(GPTNeoConfig(n_layer=2, n_head=2, n_embd=16, max_position_embeddings=64)).save_pretrained(str(tmp_path))
    program = ("import sys, torch; from model import GPTNeo\n"
               f"m = GPTNeo.from_pretrained({str(tmp_path)!r})\n"
               "for backend in ('native', 'eager'):\n"
               "    m.generate(torch.tensor([[1, 2]]), 5, temperature=0, backend=backend)\n"
               "print(sorted(n for n in sys.modules if n.startswith('torch._dynamo'))[:3])")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
