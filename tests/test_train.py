"""train.py: the training loop, checkpoints, exact resume, and what a run does when it stops, is interrupted or
meets a folder that already holds a run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import GPTNeoForCausalLM

from helpers import ROOT, FakeClock, train_config
from model import GPTNeo
from train import main as train_main



# ---- the training loop, on a corpus the tests write ----


def read_metrics(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]


def test_training_lowers_loss_and_leaves_checkpoints_inference_loads(tmp_path, capsys):
    assert train_main(["--config", train_config(tmp_path)]) == 0
    out = capsys.readouterr().out
    # the printed [model] is the model trained: its vocabulary and end-of-text id are the tokenizer's
    model_line = next(line for line in out.splitlines() if line.startswith("[model]"))
    assert "vocab_size=400," in model_line and "eos_token_id=399" in model_line and "50256" not in model_line
    assert "--set train.max_steps=60 --resume" in out.splitlines()[-1]  # a max_steps stop says how to go on
    metrics = read_metrics(tmp_path)
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.5
    assert metrics[-1]["stop"] == "max_steps reached"
    from tinylm.checkpoint import load_model_and_tokenizer
    for name in ("best", "last"):
        saved = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert saved["step"] == 30 and saved["best_val"] == vals[-1]
        model, tok = load_model_and_tokenizer(str(tmp_path / "out" / name), "cpu")
        assert len(tok) == 400 == model.config.vocab_size and model.config.eos_token_id == tok.eos_token_id == 399
        out = model.generate(torch.tensor([[tok.eos_token_id]]), 10, temperature=0)
        assert tok.decode(out[0].tolist())
    # best/ is what people share: the model and what describes it; the optimizer state --resume needs is in last/
    assert not (tmp_path / "out" / "best" / "train_state.pt").exists()
    assert (tmp_path / "out" / "last" / "train_state.pt").exists()
    hf = GPTNeoForCausalLM.from_pretrained(str(tmp_path / "out" / "best"))  # a plain GPT-Neo folder
    assert hf.config.vocab_size == 400
    from transformers import AutoTokenizer  # and its tokenizer knows the end-of-text token generate stops at,
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "best"))
    assert hf_tokenizer.eos_token_id == 399
    assert hf_tokenizer.model_max_length == 64  # and the model's context (it said 2048, GPT-Neo's, before)
    assert (tmp_path / "out" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_early_stopping_on_a_plateau(tmp_path):
    # lr 0: the validation loss never moves, so after `patience` evaluations without improvement training stops
    train_main(["--config", train_config(tmp_path, lr=0.0, min_lr=0.0, patience=2, max_steps=1000)])
    metrics = read_metrics(tmp_path)
    assert metrics[-1]["stop"].startswith("early stopping")
    assert len([m for m in metrics if "val_loss" in m]) == 3 and metrics[-1]["step"] == 20


def interrupt_at_train_step(monkeypatch, n: int, sig=signal.SIGINT):
    """Make the n-th training forward pass send this process `sig`, as Ctrl-C (or a job scheduler) would."""
    forward, calls = GPTNeo.forward, {"train": 0}

    def forward_and_interrupt(self, idx, targets=None, kv_cache=None):
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == n:
                os.kill(os.getpid(), sig)
        return forward(self, idx, targets, kv_cache)
    monkeypatch.setattr(GPTNeo, "forward", forward_and_interrupt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, monkeypatch, dtype):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    train_main(["--config", train_config(straight, max_steps=20, dtype=dtype)])
    with monkeypatch.context() as patch:  # interrupted after 13 steps, between evaluations
        interrupt_at_train_step(patch, 13)
        assert train_main(["--config", train_config(split, max_steps=20, dtype=dtype)], pass_on_signals=False) == 130
    last = GPTNeo.from_pretrained(str(split / "out" / "last"))
    assert all(p.dtype == torch.float32 for p in last.parameters())  # mixed precision saves the fp32 weights
    train_main(["--config", train_config(split, max_steps=20, dtype=dtype), "--resume"])
    losses = lambda p: {m["step"]: m["loss"] for m in read_metrics(p) if "loss" in m}
    lrs = lambda p: {m["step"]: m["lr"] for m in read_metrics(p) if "lr" in m}
    assert losses(straight) == losses(split) and len(losses(split)) == 20 and lrs(straight) == lrs(split)
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


def test_bfloat16_autocast_trains(tmp_path, capsys):
    assert train_main(["--config", train_config(tmp_path, dtype="bfloat16", max_steps=20)]) == 0
    vals = [m["val_loss"] for m in read_metrics(tmp_path) if "val_loss" in m]
    assert vals[-1] < vals[0] - 0.5
    assert ", bf16 mixed precision\n" in capsys.readouterr().out


@pytest.mark.parametrize("bf16_speed", [1.5, 0.78, None])
def test_auto_dtype_trains_in_the_precision_measured_faster(tmp_path, monkeypatch, capsys, bf16_speed):
    # bf16 1.5x fp32 (an AMD EPYC's avx512_bf16), 0.78x (a Xeon's oneDNN kept from AMX), or no bf16 instructions
    from tinylm.training import precision
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: bf16_speed and "avx512_bf16")
    monkeypatch.setattr(GPTNeo, "c_kernels", lambda self: [])  # this machine's C builds: another test's subject
    monkeypatch.setattr(precision, "step_seconds", lambda model, rows, block_size, ways, clock: {
        "float32": 1.0, "bfloat16": 1.0 / bf16_speed})
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: seen.append(k["enabled"]) or torch.amp.autocast(*a, **k))
    assert train_main(["--config", train_config(tmp_path, max_steps=2, device="cpu", dtype="auto")]) == 0
    out = capsys.readouterr().out
    said = {1.5: "bf16 mixed precision (train.dtype = auto: bf16 mixed precision trains this model at 1.50x fp32's "
                 "speed on this CPU (avx512_bf16); measured now, remembered in ",
            0.78: "float32 (train.dtype = auto: bf16 mixed precision trains this model at 0.78x fp32's speed on this "
                  "CPU (avx512_bf16); measured now, remembered in ",
            None: "float32 (train.dtype = auto: this CPU has no bf16 instructions (AMX or avx512_bf16))"}[bf16_speed]
    assert said in out and seen[0] == (bf16_speed == 1.5)  # the first autocast is the training loop's


def test_auto_trains_without_a_c_kernel_measured_slower_here(tmp_path, monkeypatch, capsys):
    # attention.c's size rule takes head size 8, but on this (pretend) machine its build loses: auto leaves it out
    from tinylm.kernels import native
    from tinylm.training import precision
    if native.build_library("attention")[0] is None:
        pytest.skip("no C compiler: attention.c never runs here")
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)
    monkeypatch.setattr(native, "faster_here", lambda name, library: True)  # whatever this build's own speed
    monkeypatch.setattr(precision, "step_seconds", lambda model, rows, block_size, ways, clock: {
        "float32": 1.0, "float32 without attention.c": 0.8})
    calls, attention = [], native.native_attention
    monkeypatch.setattr(native, "native_attention", lambda *a: calls.append(1) or attention(*a))
    heads = ["--set", "model.n_head=4"]  # width 32: head size 8
    assert train_main(["--config", train_config(tmp_path, max_steps=2, dtype="auto")] + heads) == 0
    assert "float32 (train.dtype = auto: this CPU has no bf16 instructions (AMX or avx512_bf16); attention.c runs a " \
        "fp32 step at 0.80x PyTorch's speed, so PyTorch runs it; measured now" in capsys.readouterr().out
    assert calls == []
    assert train_main(["--config", train_config(tmp_path, max_steps=2, out_dir=tmp_path / "fp32")] + heads) == 0
    assert calls  # train.dtype = float32: the size rule's choice, unmeasured


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
    assert train_main(["--config", train_config(tmp_path)]) == 1  # scripts and CI see the failure
    stop = read_metrics(tmp_path)[-1]["stop"]
    assert stop.startswith("loss became nan at step 13") and "last good checkpoint" in stop
    saved = torch.load(tmp_path / "out" / "last" / "train_state.pt", weights_only=True)
    assert saved["state"]["step"] == 10  # the evaluation at step 10 saved it; nothing after the NaN did
    assert GPTNeo.from_pretrained(str(tmp_path / "out" / "last")).wte.weight.isfinite().all()


# ---- stops, interrupts and reused folders: nothing lost, nothing confusing ----

def saved_state(tmp_path, name):
    return json.loads((tmp_path / "out" / name / "metrics.json").read_text())


@pytest.mark.parametrize("limit", [{"max_tokens": 13 * 8 * 32}, {"max_minutes": 0.02, "eval_interval": 1000}])
def test_a_limit_evaluates_the_final_model_before_it_stops(tmp_path, limit):
    # stopped between two evaluations: the final weights are scored, and best/ holds them when they are better
    assert train_main(["--config", train_config(tmp_path, **{"max_steps": 1000, **limit})], clock=FakeClock()) == 0
    metrics = read_metrics(tmp_path)
    stop_step = metrics[-1]["step"]
    assert metrics[-1]["stop"].startswith(next(iter(limit))) and 0 < stop_step < 1000
    vals = [m for m in metrics if "val_loss" in m]
    assert vals[-1]["step"] == stop_step and vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert saved_state(tmp_path, "best")["step"] == saved_state(tmp_path, "last")["step"] == stop_step


def test_a_second_run_into_the_same_out_dir_is_refused_unless_overwrite(tmp_path, capsys):
    config = train_config(tmp_path, max_steps=4, eval_interval=2)
    assert train_main(["--config", config]) == 0
    best = (tmp_path / "out" / "best" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a training run \(best, last, metrics.jsonl, loss.png\): "
                                         r"continue it with --resume, .*--set train.out_dir=NEW_DIR.*--overwrite"):
        train_main(["--config", config, "--set", "train.lr=0.1"])
    assert (tmp_path / "out" / "best" / "model.safetensors").read_bytes() == best
    assert train_main(["--config", config, "--set", "train.max_steps=2", "--overwrite"]) == 0
    metrics = read_metrics(tmp_path)
    assert [m["stop"] for m in metrics if "stop" in m] == ["max_steps reached"] and metrics[-1]["step"] == 2
    with pytest.raises(SystemExit, match="pass one of them"):
        train_main(["--config", config, "--resume", "--overwrite"])


def test_resume_keeps_the_checkpoints_tokenizer_and_refuses_another_model_shape(tmp_path, capsys):
    from helpers import write_txt
    config = train_config(tmp_path, max_steps=4, eval_interval=2)
    assert train_main(["--config", config]) == 0
    tokenizer = (tmp_path / "out" / "last" / "tokenizer.json").read_text()
    other = tmp_path / "other.txt"  # other words: a tokenizer built from them would differ
    write_txt(other, [f"Zed the zebra zigzagged {i} times in a quiet zoo at night." for i in range(200)])
    capsys.readouterr()
    assert train_main(["--config", config, "--resume", "--set", "train.max_steps=6",
                       "--set", f"data.dataset={other}"]) == 0
    out = capsys.readouterr().out
    assert f"note: resuming with data.dataset = {other}" in out and "tokenizer: wrote" not in out
    assert (tmp_path / "out" / "last" / "tokenizer.json").read_text() == tokenizer
    assert saved_state(tmp_path, "last")["step"] == 6
    with pytest.raises(SystemExit) as e:
        train_main(["--config", config, "--resume", "--set", "model.n_layer=1", "--set", "train.max_steps=8"])
    message = str(e.value)
    assert "\n" not in message and "model.n_layer=2" in message and "model.n_layer=1" in message
    assert "local_heads" not in message  # keys derived from n_layer are not reported as changed by the user
    with pytest.raises(SystemExit, match="data.tokenizer=trimmed.*data.tokenizer=gpt-neo"):
        train_main(["--config", config, "--resume", "--set", "data.tokenizer=gpt-neo", "--set", "train.max_steps=8"])


def test_resume_after_a_limit_says_which_limit_to_raise(tmp_path, capsys):
    config = train_config(tmp_path, max_steps=1000, max_minutes=0.01, eval_interval=1000)
    assert train_main(["--config", config], clock=FakeClock()) == 0
    out = capsys.readouterr().out
    assert "max_minutes reached" in out and "--set train.max_minutes=0.02" in out and "--resume" in out
    assert "tokens/s" in out and f"sample: python inference.py --model {tmp_path / 'out' / 'best'}" in out
    with pytest.raises(SystemExit, match=r"already trained .* minutes, its train.max_minutes = 0.01; .*"
                                         r"--set train.max_minutes=0.02"):
        train_main(["--config", config, "--resume"])
    step = saved_state(tmp_path, "last")["step"]
    assert train_main(["--config", config, "--resume", "--set", "train.max_minutes=0.02"], clock=FakeClock()) == 0
    assert saved_state(tmp_path, "last")["step"] > step


def test_a_signal_stops_after_the_step_and_a_second_skips_the_final_evaluation(tmp_path, monkeypatch, capsys):
    import train
    evaluate, calls = train.evaluate_loss, {"eval": 0}

    def evaluate_and_interrupt(*args, **kwargs):
        calls["eval"] += 1
        if calls["eval"] == 2:  # the final evaluation, after the first signal
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate_loss", evaluate_and_interrupt)
    interrupt_at_train_step(monkeypatch, 7, signal.SIGTERM)
    handler = signal.getsignal(signal.SIGINT)
    assert train_main(["--config", train_config(tmp_path, max_steps=1000, eval_interval=1000)],
                      pass_on_signals=False) == 128 + 15
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    out = capsys.readouterr().out
    assert "SIGTERM: stopping after this step" in out and "saving without the evaluation" in out
    assert "continue: python train.py" in out and "--resume" in out
    last = saved_state(tmp_path, "last")
    assert last["step"] == 7 and last["evaluated_step"] == 0  # the steps are kept, the evaluation was skipped
    assert sorted(os.listdir(tmp_path / "out")) == ["best", "last", "loss.png", "metrics.jsonl"]


def test_in_process_the_signal_goes_on_to_the_callers_handler_once_the_run_is_saved(tmp_path, monkeypatch):
    # pytest run by `timeout`: its SIGTERM must still end pytest, after the run it stopped has saved
    seen = []

    def callers_handler(signum, frame):
        seen.append((signum, saved_state(tmp_path, "last")["step"]))
    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        interrupt_at_train_step(monkeypatch, 5, signal.SIGTERM)
        assert train_main(["--config", train_config(tmp_path, max_steps=1000, eval_interval=1000)]) == 128 + 15
        assert seen == [(signal.SIGTERM, 5)] and signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    # Ctrl-C on pytest or in a notebook: saved, then interrupted. Python's own SIGINT handler is the caller's,
    # installed here: a suite started in the background has SIGINT ignored, and then no KeyboardInterrupt comes
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupt_at_train_step(monkeypatch, 8, signal.SIGINT)
            train_main(["--config", train_config(tmp_path, max_steps=1000, eval_interval=1000), "--resume"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert saved_state(tmp_path, "last")["step"] == 5 + 8


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_an_evaluated_resumable_checkpoint(tmp_path, sig):
    config = train_config(tmp_path, max_steps=100000, eval_interval=100000)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", config], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    metrics_file = tmp_path / "out" / "metrics.jsonl"
    while time.time() < deadline and (not metrics_file.exists() or len(read_metrics(tmp_path)) < 5):
        time.sleep(0.2)
    with pytest.raises(SystemExit, match=f"in use by process {proc.pid} "):  # one writer per folder
        train_main(["--config", config, "--overwrite", "--set", "train.max_steps=1"])
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err
    assert "Traceback" not in err and f"stopped: interrupted by {sig.name}" in out
    assert "continue: python train.py --config" in out and out.rstrip().endswith("--resume")
    metrics = read_metrics(tmp_path)
    trained = max(m["step"] for m in metrics if "loss" in m)
    assert saved_state(tmp_path, "last")["step"] == trained == metrics[-1]["step"] > 0
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, trained]  # evaluated before it stopped
    assert not glob.glob(str(tmp_path / "out" / "*.tmp")) and not glob.glob(str(tmp_path / "out" / "*.old"))
    assert train_main(["--config", config, "--resume", "--set", f"train.max_steps={trained + 2}"]) == 0


def test_block_size_and_device_are_checked_before_any_work(tmp_path):
    config = train_config(tmp_path)
    with pytest.raises(SystemExit, match=r"data.block_size = 100 is longer than the model's context, "
                                         r"model.max_position_embeddings = 64"):
        train_main(["--config", config, "--set", "data.block_size=100"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^error: train.device cuda: this PyTorch is a CPU-only build|"
                                             r"^error: train.device cuda: no CUDA GPU"):
            train_main(["--config", config, "--set", "train.device=cuda"])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_the_default_folders_are_git_ignored():
    from tinylm.training.config import DataConfig, TrainConfig
    ignored = {line.strip().strip("/") for line in open(os.path.join(ROOT, ".gitignore"))}
    assert DataConfig().cache_dir.split("/")[0] in ignored and TrainConfig().out_dir.split("/")[0] in ignored


def test_offline_the_hub_dataset_fails_fast_and_leaves_nothing(tmp_path):
    # docs/training.md's first command (the hub dataset) with the hub unreachable (a closed port), and with HF_HUB_OFFLINE=1
    for env in ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}):
        t0 = time.time()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                               os.path.join(ROOT, "config", "tiny_lm_1M.config")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        assert done.returncode != 0 and time.time() - t0 < 20, done.stderr
        assert "Traceback" not in done.stderr and "Retrying" not in done.stderr + done.stdout
        assert "roneneldan/TinyStories" in done.stderr and "data.dataset" in done.stderr
        assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


# ---- the learning-rate schedule ends with the budget ----

@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_the_decay_completes_when_the_time_limit_stops_the_run(tmp_path, schedule):
    # warmup_steps and max_steps far beyond what 3 seconds allow: the schedule follows the clock instead (evaluated
    # at the ends only, so that the last step falls near the end of the budget)
    config = train_config(tmp_path, max_minutes=0.05, max_steps=10 ** 6, warmup_steps=10 ** 6, eval_interval=10 ** 6,
                          lr=3e-3, min_lr=1e-4, lr_schedule=schedule, eval_budget_fraction="none")
    assert train_main(["--config", config], clock=FakeClock()) == 0
    lrs = [m["lr"] for m in read_metrics(tmp_path) if "lr" in m]
    assert read_metrics(tmp_path)[-1]["stop"].startswith("max_minutes") and len(lrs) > 20
    assert max(lrs) > 0.9 * 3e-3  # the warmup ended within the budget
    assert lrs[-1] < 1e-4 + 0.05 * (3e-3 - 1e-4)  # and the decay with it


@pytest.mark.parametrize("fraction, evaluations", [(0.25, 5), ("none", 2)])
def test_a_time_limited_run_evaluates_along_its_budget_not_only_at_its_ends(tmp_path, fraction, evaluations):
    # a 3-second budget in which eval_interval (10 ** 6 steps) never comes: the budget says when to evaluate
    config = train_config(tmp_path, max_minutes=0.05, max_steps=10 ** 6, eval_interval=10 ** 6,
                          eval_budget_fraction=fraction)
    assert train_main(["--config", config], clock=FakeClock()) == 0
    metrics = read_metrics(tmp_path)
    evaluated = [m["step"] for m in metrics if "val_loss" in m]
    assert len(evaluated) == evaluations and evaluated[0] == 0 and evaluated[-1] == metrics[-1]["step"]
    if fraction != "none":  # evenly along the budget (the clock ticks evenly here), the last one at the stop
        gaps = [b - a for a, b in zip(evaluated, evaluated[1:])]
        assert max(gaps[:-1]) - min(gaps[:-1]) <= 1 and 0 < gaps[-1] <= gaps[0], evaluated


def test_a_step_limited_run_evaluates_every_eval_interval_exactly(tmp_path):
    # its steps are known in advance, so eval_budget_fraction adds no evaluation (at 0.1 it would evaluate each step)
    config = train_config(tmp_path, max_steps=8, eval_interval=4, eval_budget_fraction=0.1)
    assert train_main(["--config", config], clock=FakeClock()) == 0
    assert [m["step"] for m in read_metrics(tmp_path) if "val_loss" in m] == [0, 4, 8]


def test_the_progress_bar_follows_the_budget_that_stops_the_run(tmp_path, monkeypatch):
    # a terminal, and a run that max_minutes stops long before max_steps: the bar counts the time budget
    import io
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    config = train_config(tmp_path, max_minutes=0.04, max_steps=10 ** 6, eval_interval=10 ** 6)
    assert train_main(["--config", config], clock=FakeClock()) == 0
    frames = [f for f in terminal.getvalue().split("\r") if "of the budget" in f]
    assert frames and "1000000" not in terminal.getvalue()
    assert frames[-1].lstrip().startswith(("99%", "100%")) and "step=" in frames[-1]
    remaining = [f.split("<")[1][:5] for f in frames[len(frames) // 2:]]  # mm:ss left, half-way on
    assert all(r.startswith("00:0") for r in remaining), remaining  # seconds, not the hours max_steps would take


def test_a_resumed_run_continues_the_same_time_schedule(tmp_path, monkeypatch):
    config = train_config(tmp_path, max_minutes=0.05, max_steps=10 ** 6, warmup_steps=5, eval_interval=10 ** 6,
                          lr=3e-3, min_lr=1e-4)
    with monkeypatch.context() as patch:
        interrupt_at_train_step(patch, 30)
        assert train_main(["--config", config], clock=FakeClock(), pass_on_signals=False) == 130
    before = [m["lr"] for m in read_metrics(tmp_path) if "lr" in m]
    assert train_main(["--config", config, "--resume"], clock=FakeClock()) == 0
    after = [m["lr"] for m in read_metrics(tmp_path) if "lr" in m][len(before):]
    assert len(before) == 30 and len(after) > 10
    assert 0.8 * before[-1] < after[0] <= before[-1]  # picks up where it stopped, on the clock of the whole run
    assert after[-1] < 1e-4 + 0.05 * (3e-3 - 1e-4)


def test_muon_trains_and_resumes_exactly(tmp_path, monkeypatch):
    # Muon for the hidden matrices, AdamW for embeddings, biases and LayerNorms; both states survive a resume
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    settings = dict(optimizer="muon", muon_lr=0.02, max_steps=12, eval_interval=6)
    assert train_main(["--config", train_config(straight, **settings)]) == 0
    vals = [m["val_loss"] for m in read_metrics(straight) if "val_loss" in m]
    assert vals[-1] < vals[0] - 0.5
    with monkeypatch.context() as patch:
        interrupt_at_train_step(patch, 8)
        assert train_main(["--config", train_config(split, **settings)], pass_on_signals=False) == 130
    assert train_main(["--config", train_config(split, **settings), "--resume"]) == 0
    losses = lambda p: [m["loss"] for m in read_metrics(p) if "loss" in m]
    assert losses(straight) == losses(split) and len(losses(split)) == 12
    saved = torch.load(split / "out" / "last" / "train_state.pt", weights_only=True)["optimizer"]["optimizers"]
    assert len(saved) == 2 and saved[0]["param_groups"][0]["lr_scale"] == pytest.approx(0.02 / 3e-3)
