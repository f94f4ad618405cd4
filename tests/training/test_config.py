"""config.py: INI configs map onto the dataclasses with types checked, unknown keys rejected, and every error
blamed on the file or the --set item that caused it."""

import glob
import os

import pytest
import torch
from transformers import GPTNeoConfig as HFConfig
from transformers import GPTNeoForCausalLM

from conftest import hub_cache_snapshot
from helpers import ROOT
from model import GPTNeo
from tinylm.training.config import TrainConfig, load_config

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
    hf = GPTNeoForCausalLM(HFConfig(hidden_size=64, num_layers=8, num_heads=16,
                                    attention_types=[[["global", "local"], 4]]))
    assert model.num_params() == hf.num_parameters() == 3_745_984  # the tied LM head counts once


def test_resizing_a_shipped_config_is_editing_n_layer(tmp_path):
    # a copy of quickstart.config with n_layer = 5: its attention_types = global,local is a pattern, cut at 5
    text = open(os.path.join(ROOT, "config", "quickstart.config")).read()
    assert "\nn_layer = 3\n" in text
    m = load_config(write(tmp_path, text.replace("\nn_layer = 3\n", "\nn_layer = 5\n")))["model"]
    assert m.attention_types == ("global", "local", "global", "local", "global") and m.local_heads == (0, 8, 0, 8, 0)
    m = load_config(os.path.join(ROOT, "config", "tinystories_1M.config"), ["model.n_layer=5"])["model"]
    assert m.attention_types == ("global", "local", "global", "local", "global")


def write(tmp_path, text):
    path = tmp_path / "x.config"
    path.write_text(text)
    return str(path)


def test_types_overrides_and_both_head_forms(tmp_path):
    path = write(tmp_path, "[model]\nn_layer = 4  # inline comments are fine\nn_head = 4\nn_embd = 32\n"
                           "local_heads = 0,4,2,1\nintermediate_size = none\ndropout = 0.1\n")
    m = load_config(path)["model"]
    assert m.local_heads == (0, 4, 2, 1) and m.attention_types == ("global", "local", "mixed", "mixed")
    assert m.intermediate_size is None and m.dropout == 0.1 and m.attention_dropout == 0.1
    assert load_config(path, ["model.attention_dropout=0"])["model"].attention_dropout == 0.0
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
    ("[train]\nout_dir =\n", [], "out_dir must name a folder"),
    ("[data]\n", ["data.cache_dir= "], "cache_dir must name a folder"),
])
def test_bad_configs_name_the_problem(tmp_path, text, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "nope.config"))


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=1"], r"^--set optim\.lr=1: unknown section \[optim\]"),
    (["train.learning_rate=1"], r"^--set train\.learning_rate=1: unknown key 'learning_rate' in \[train\]"),
    (["train.lr=-1"], r"^--set train\.lr=-1: \[train\] lr must be >= 0"),
    (["train.lr=fast"], r"^--set train\.lr=fast: \[train\] lr = 'fast' is not a valid float"),
    (["train.device=foo"], r"^--set train\.device=foo: \[train\] device must be auto, cpu, cuda"),
    (["model.n_head=5"], r"^--set model\.n_head=5: \[model\] invalid model config: n_embd \(64\) must be divisible"),
])
def test_a_bad_set_is_blamed_on_the_set_not_the_file(tmp_path, overrides, message):
    path = write(tmp_path, "[model]\nn_embd = 64\nn_head = 4\n[train]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match=message):
        load_config(path, overrides)


def test_a_bad_file_value_is_blamed_on_the_file(tmp_path):
    path = write(tmp_path, "[model]\nn_embd = 64\nn_head = 5\n")
    with pytest.raises(ValueError, match=rf"^{path}: \[model\] invalid model config"):
        load_config(path, ["train.lr=1e-3"])


@pytest.mark.parametrize("name", ["3M", "8M", "28M", "33M"])
def test_each_family_config_builds_and_loads_by_hub_id(name, tmp_path, monkeypatch):
    # the model a family config builds, laid out in the hub cache as roneneldan/TinyStories-<name>, loads by its hub
    # id in TinyLM and as a folder in transformers, with the same logits
    torch.manual_seed(0)
    model = GPTNeo(load_config(os.path.join(ROOT, "config", f"tinystories_{name}.config"))["model"]).eval()
    model.save_pretrained(str(tmp_path / "saved"))
    files = {f: str(tmp_path / "saved" / f) for f in ("config.json", "model.safetensors")}
    snapshot = hub_cache_snapshot(tmp_path / "hub", f"roneneldan/TinyStories-{name}", files)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = GPTNeo.from_pretrained(f"roneneldan/TinyStories-{name}")
    assert loaded.config == model.config
    hf = GPTNeoForCausalLM.from_pretrained(snapshot).eval()
    idx = torch.randint(0, 50257, (1, 24))
    with torch.no_grad():
        ours = loaded(idx)[0]
        assert torch.equal(ours, model(idx)[0])
        torch.testing.assert_close(ours, hf(idx).logits, rtol=0, atol=1e-4)


def test_out_dir_is_taken_as_the_folder_it_names(tmp_path):
    # out/x/../y is out/y: before, making it also made an empty out/x that no run owned
    (tmp_path / "x.config").write_text(f"[train]\nout_dir = {tmp_path}/runs/x/../y\n")
    t = load_config(str(tmp_path / "x.config"), ["train.max_steps=3"])["train"]
    assert t.out_dir == os.path.join(str(tmp_path), "runs", "y")
    assert TrainConfig(out_dir="out/./a//b/").out_dir == os.path.join("out", "a", "b")


@pytest.mark.parametrize("setting, message", [
    ("train.max_minutes=0", r"max_minutes must be a positive number of minutes, or none for no limit, got 0$"),
    ("train.max_minutes=-1", r"max_minutes must be a positive number of minutes, or none for no limit, got -1$"),
    ("train.max_tokens=0", r"max_tokens must be a positive number of tokens, or none for no limit, got 0$"),
    ("train.max_tokens=-5", r"max_tokens must be a positive number of tokens"),
    ("train.max_steps=-5", r"max_steps must be a positive number of steps"),
    ("train.max_steps=0", r"max_steps must be a positive number of steps"),
    ("train.patience=-1", r"patience must be a positive number of evaluations, or 0 for no early stopping"),
    ("train.eval_interval=0", r"eval_interval must be positive"),
    ("train.eval_budget_fraction=0", r"eval_budget_fraction must be in \(0, 1\], or none for eval_interval alone"),
])
def test_every_limit_is_a_positive_number_or_its_way_of_saying_no_limit(tmp_path, setting, message):
    path = write(tmp_path, "[train]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match=rf"^--set {setting}: \[train\] {message}"):
        load_config(path, [setting])
    train = load_config(path, ["train.max_minutes=none", "train.max_tokens=none", "train.patience=0",
                               "train.max_steps=1"])["train"]
    assert (train.max_minutes, train.max_tokens, train.patience, train.max_steps) == (None, None, 0, 1)
    assert load_config(path, ["train.max_minutes=0.5", "train.max_tokens=1000"])["train"].max_minutes == 0.5
