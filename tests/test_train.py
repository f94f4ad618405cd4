"""train.py: INI configs map onto the dataclasses with types checked and unknown keys rejected."""

import glob
import json
import os
import subprocess
import sys

import pytest
from transformers import GPTNeoConfig as HFConfig
from transformers import GPTNeoForCausalLM

from model import GPTNeo
import torch

from train import load_config
from train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (n_embd, n_layer) of the released TinyStories models
FAMILY = {"1M": (64, 8), "3M": (128, 8), "8M": (256, 8), "28M": (512, 8), "33M": (768, 4)}


@pytest.mark.parametrize("name", FAMILY)
def test_tinystories_family_configs(name):
    m = load_config(os.path.join(ROOT, "config", f"tinystories_{name}.config"))["model"]
    assert (m.n_embd, m.n_layer) == FAMILY[name]
    assert (m.vocab_size, m.max_position_embeddings, m.n_head, m.window_size) == (50257, 2048, 16, 256)
    assert m.attention_types == ("global", "local") * (m.n_layer // 2)


def test_every_shipped_config_builds_a_model():
    files = glob.glob(os.path.join(ROOT, "config", "*.config"))
    assert any(f.endswith("tiny_lm_1M.config") for f in files)
    for path in files:
        config = load_config(path)["model"]
        assert config.gpt_neo_compatible, path
    model = GPTNeo(load_config(os.path.join(ROOT, "config", "tinystories_1M.config"))["model"])
    hf = GPTNeoForCausalLM(HFConfig(hidden_size=64, num_layers=8, num_heads=16, attention_types=[[["global", "local"], 4]]))
    assert model.num_params() == hf.num_parameters() == 3_745_984  # the tied LM head counts once


def write(tmp_path, text):
    path = tmp_path / "x.config"
    path.write_text(text)
    return str(path)


def test_types_overrides_and_both_head_forms(tmp_path):
    path = write(tmp_path, "[model]\nn_layer = 4  # inline comments are fine\nn_head = 4\nn_embd = 32\n"
                           "local_heads = 0,4,2,1\nintermediate_size = none\ndropout = 0.1\n")
    m = load_config(path)["model"]
    assert m.local_heads == (0, 4, 2, 1) and m.attention_types == ("global", "local", "mixed", "mixed")
    assert m.intermediate_size is None and m.dropout == 0.1
    m = load_config(path, ["model.local_heads=2", "model.n_layer=2"])["model"]
    assert m.local_heads == (2, 2) and m.n_layer == 2


@pytest.mark.parametrize("text, overrides, message", [
    ("[model]\nn_embed = 64\n", [], "unknown key.*n_embed"),
    ("[model]\nn_layer = eight\n", [], "n_layer = 'eight' is not a valid int"),
    ("[model]\ndropout = lots\n", [], "dropout"),
    ("[modle]\nn_layer = 2\n", [], r"unknown section.*\[modle\]"),
    ("[model]\nn_head = 5\n", [], "divisible"),
    ("[model]\n", ["n_layer=3"], "section.key=value"),
    ("[model]\n", ["model.windowsize=3"], "unknown key.*windowsize"),
    ("[model]\nattention_types = global,local\n", ["model.local_heads=8"], "attention_types = none"),
])
def test_bad_configs_name_the_problem(tmp_path, text, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "nope.config"))


# ---- the training loop, on a corpus the tests write ----

def train_config(tmp_path, **train):
    from test_dataload import make_stories, write_txt
    data = tmp_path / "stories.txt"
    if not data.exists():
        write_txt(data, make_stories(300))
    settings = {**dict(batch_size=8, max_steps=30, eval_interval=10, eval_tokens=2000, warmup_steps=5, lr=3e-3,
                       out_dir=str(tmp_path / "out")), **train}
    text = ("[model]\nvocab_size = 400\nn_layer = 2\nn_head = 2\nn_embd = 32\nmax_position_embeddings = 64\n"
            "window_size = 8\n[data]\ndataset = {data}\nval_fraction = 0.1\nblock_size = 32\ncache_dir = {cache}\n"
            "[train]\n").format(data=data, cache=tmp_path / "cache")
    text += "".join(f"{k} = {v}\n" for k, v in settings.items())
    return write(tmp_path, text)


def read_metrics(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]


def test_training_lowers_loss_and_leaves_checkpoints_inference_loads(tmp_path):
    assert train_main(["--config", train_config(tmp_path)]) == 0
    metrics = read_metrics(tmp_path)
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.5
    assert metrics[-1]["stop"] == "max_steps reached"
    from inference import load_model_and_tokenizer
    for name in ("best", "last"):
        saved = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert saved["step"] == 30 and saved["best_val"] == vals[-1]
        model, tok = load_model_and_tokenizer(str(tmp_path / "out" / name), "cpu")
        assert len(tok) == 400 == model.config.vocab_size and model.config.eos_token_id == tok.eos_token_id == 399
        out = model.generate(torch.tensor([[tok.eos_token_id]]), 10, temperature=0)
        assert tok.decode(out[0].tolist())
    hf = GPTNeoForCausalLM.from_pretrained(str(tmp_path / "out" / "best"))  # a plain GPT-Neo folder
    assert hf.config.vocab_size == 400
    assert (tmp_path / "out" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_early_stopping_on_a_plateau(tmp_path):
    # lr 0: the validation loss never moves, so after `patience` evaluations without improvement training stops
    train_main(["--config", train_config(tmp_path, lr=0.0, min_lr=0.0, patience=2, max_steps=1000)])
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["stop"].startswith("early stopping")
    assert len([m for m in metrics if "val_loss" in m]) == 3 and metrics[-1]["step"] == 20


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    train_main(["--config", train_config(straight, max_steps=20)])
    # stopped after 13 steps (the schedule still aims at 20), between evaluations
    train_main(["--config", train_config(split, max_steps=20), "--set", f"train.max_tokens={13 * 8 * 32}"])
    assert GPTNeo.from_pretrained(str(split / "out" / "last")) is not None
    train_main(["--config", train_config(split, max_steps=20), "--resume"])
    losses = lambda p: {m["step"]: m["loss"] for m in read_metrics(p) if "loss" in m}
    assert losses(straight) == losses(split) and len(losses(split)) == 20
    a = GPTNeo.from_pretrained(str(straight / "out" / "last")).state_dict()
    b = GPTNeo.from_pretrained(str(split / "out" / "last")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_training_values_fail_before_training(tmp_path):
    with pytest.raises(SystemExit, match=r"\[train\].*lr must be >= 0"):
        train_main(["--config", train_config(tmp_path, lr=-1)])
    with pytest.raises(SystemExit, match=r"unknown key.*learning_rate"):
        train_main(["--config", train_config(tmp_path), "--set", "train.learning_rate=1"])
    with pytest.raises(SystemExit, match="no data at"):
        train_main(["--config", train_config(tmp_path), "--set", "data.dataset=missing.txt"])
    with pytest.raises(SystemExit, match="cannot resume"):
        train_main(["--config", train_config(tmp_path), "--set", f"train.out_dir={tmp_path / 'fresh'}", "--resume"])
    assert not (tmp_path / "out").exists()


def test_two_process_ddp_equals_one_process_with_twice_the_grad_accum(tmp_path):
    # rank r of 2 takes batch 2 * step + r, which is what one process with grad_accum = 2 takes, and DDP averages
    # gradients as grad_accum does: the two runs must agree to rounding
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir(), single.mkdir()
    settings = dict(batch_size=4, max_steps=6, eval_interval=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--config", train_config(ddp, **settings)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout and done.stdout.count("stopped: max_steps reached") == 1  # rank 0 logs
    train_main(["--config", train_config(single, grad_accum=2, **settings)])
    losses = lambda p: [m["loss"] for m in read_metrics(p) if "loss" in m]
    assert len(losses(ddp)) == 6 and losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    vals = lambda p: [m["val_loss"] for m in read_metrics(p) if "val_loss" in m]  # the ranks split each evaluation
    assert len(vals(ddp)) == 3 and vals(ddp) == pytest.approx(vals(single), rel=1e-5)
    a = GPTNeo.from_pretrained(str(ddp / "out" / "last")).state_dict()
    b = GPTNeo.from_pretrained(str(single / "out" / "last")).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bfloat16_autocast_trains(tmp_path):
    assert train_main(["--config", train_config(tmp_path, dtype="bfloat16", max_steps=20)]) == 0
    vals = [m["val_loss"] for m in read_metrics(tmp_path) if "val_loss" in m]
    assert vals[-1] < vals[0] - 0.5


def test_wandb_needs_no_account(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    # no API key anywhere and WANDB_MODE unset: the run logs offline instead of failing
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = train_config(tmp_path, max_steps=4, eval_interval=2)
    assert train_main(["--config", config, "--use_wandb", "--wandb_project", "p", "--wandb_run_name", "r"]) == 0
    assert "logging offline" in capsys.readouterr().out
    runs = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = train_config(tmp_path, max_steps=4, eval_interval=2, out_dir=tmp_path / "off")
    assert train_main(["--config", config, "--use_wandb"]) == 0
    assert not (tmp_path / "off" / "wandb").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"train": 0}
    forward = GPTNeo.forward

    def poisoned(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] > 13:  # from step 14 on
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(GPTNeo, "forward", poisoned)
    assert train_main(["--config", train_config(tmp_path)]) == 0
    stop = read_metrics(tmp_path)[-1]["stop"]
    assert stop.startswith("loss became nan at step 13") and "last good checkpoint" in stop
    saved = torch.load(tmp_path / "out" / "last" / "train_state.pt", weights_only=True)
    assert saved["state"]["step"] == 10  # the evaluation at step 10 saved it; nothing after the NaN did
    assert GPTNeo.from_pretrained(str(tmp_path / "out" / "last")).wte.weight.isfinite().all()
