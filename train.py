"""Train a TinyLM model from an INI config, with early stopping, checkpoints and exact resume.

    python train.py --config config/tiny_lm_1M.config [--set train.lr=3e-4 ...] [--resume]

Each run leaves out_dir/best and out_dir/last: Hugging Face GPT-Neo folders (config.json, model.safetensors,
tokenizer.json) that inference.py samples from, plus train_state.pt (optimizer, step, RNG) and metrics.
"""

import argparse
import configparser
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dataload import FULL_VOCAB, HUB_DATASET, get_batch, prepare_data
from inference import evaluate_loss, pick_device
from model import GPTNeo, GPTNeoConfig, atomic_write


@dataclass
class DataConfig:
    dataset: str = HUB_DATASET  # hub dataset, or a .txt/.jsonl/.parquet file, folder or glob
    val_dataset: str | None = None  # None: hold out val_fraction of dataset (the hub's validation split for the hub)
    val_fraction: float = 0.01
    tokenizer: str = "trimmed"  # "trimmed": model.vocab_size most used GPT-Neo tokens; "gpt-neo": all 50257
    block_size: int = 512  # tokens per training sequence, as in the paper
    cache_dir: str = "data"  # tokenizer.json and token caches

    def __post_init__(self):
        if self.tokenizer not in ("trimmed", "gpt-neo"):
            raise ValueError(f"tokenizer must be 'trimmed' or 'gpt-neo', got {self.tokenizer!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine schedule floor
    lr_schedule: str = "cosine"  # "cosine" (after warmup) or "constant"
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # not applied to biases, LayerNorms or embeddings
    grad_clip: float = 1.0  # 0 disables
    max_steps: int = 10000
    max_tokens: int | None = None  # stop after this many training tokens
    max_minutes: float | None = None  # stop after this much wall time
    eval_interval: int = 200  # steps between validation evaluations
    eval_tokens: int = 100_000  # validation tokens scored per evaluation
    patience: int = 5  # evaluations without improvement before early stopping; 0 disables
    min_delta: float = 0.0  # improvement in validation loss that counts
    seed: int = 1337
    device: str = "auto"  # cpu, cuda, mps or auto; under torchrun each process takes cuda:LOCAL_RANK
    dtype: str = "float32"  # "bfloat16": autocast matmuls to bf16 (weights, optimizer and softmax stay fp32)
    compile: bool = False  # torch.compile the model for training
    log_interval: int = 10  # steps between progress lines when stderr is not a terminal (no progress bar)
    out_dir: str = "out/tiny_lm"

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_tokens", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "min_delta", "warmup_steps", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


SECTIONS = {"model": GPTNeoConfig, "data": DataConfig, "train": TrainConfig}


def parse_value(text: str, annotation, where: str):
    """Convert one INI string to the type a dataclass field declares; raise ValueError naming `where`."""
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    text = text.strip()
    if type(None) in kinds and text.lower() in ("none", "null", ""):
        return None
    if bool in kinds:
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
    if (list in kinds or tuple in kinds) and ("," in text or int not in kinds):
        return [int(v) if re.fullmatch(r"[+-]?\d+", v.strip()) else v.strip() for v in text.split(",")]
    if int in kinds and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if float in kinds:
        try:
            return float(text)
        except ValueError:
            pass
    if str in kinds:
        return text
    expected = " or ".join(k.__name__ for k in kinds if k is not type(None))
    raise ValueError(f"{where} = {text!r} is not a valid {expected}")


def build_dataclass(cls, values: dict[str, str], where: str):
    """Dataclass `cls` from INI strings; unknown keys and bad values are errors that name the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(names)}")
    kwargs = {k: parse_value(v, hints[k], f"{where} {k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(path: str | None, overrides: list[str] = ()) -> dict:
    """Read an INI file, apply `section.key=value` overrides, and build one dataclass per section."""
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
    parser.optionxform = str  # keys are case-sensitive field names
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist; see config/ for examples") from None
        except configparser.Error as e:
            raise ValueError(f"config file {path} is not a valid INI file: {e}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r} must look like section.key=value, e.g. model.n_layer=4")
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, name, value)
    unknown = sorted(set(parser.sections()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path or '--set'}: unknown section(s) [{'], ['.join(unknown)}]; valid sections are "
                         f"[{'], ['.join(SECTIONS)}]")
    return {name: build_dataclass(cls, dict(parser[name]) if parser.has_section(name) else {}, f"[{name}]")
            for name, cls in SECTIONS.items()}


def get_lr(step: int, t: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over max_steps (or constant lr)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: GPTNeo, t: TrainConfig, device) -> torch.optim.AdamW:
    # Weight decay on the matrices of the linear layers only: not biases, LayerNorms or embeddings.
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and not name.startswith(("wte", "wpe")) else rest).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=torch.device(device).type == "cuda")


def save_checkpoint(folder: str, model: GPTNeo, tokenizer, opt, state: dict, config: dict):
    """Write a complete checkpoint folder next to `folder`, then swap it in, so `folder` is always whole."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "training_config.json"), "w") as f:
        json.dump({k: dataclasses.asdict(v) for k, v in config.items()}, f, indent=2, default=list)
    torch.save({"optimizer": opt.state_dict(), "state": state, "torch_rng": torch.get_rng_state()},
               os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "metrics.json"), "w") as f:  # the same state, for people and scripts
        json.dump(state, f, indent=2)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def resumable_checkpoint(folder: str) -> str | None:
    """`folder`, or the copy a crash in the middle of save_checkpoint left, if it holds a training state."""
    for candidate in (folder, folder + ".old"):
        if os.path.isfile(os.path.join(candidate, "train_state.pt")):
            return candidate
    return None


def load_checkpoint(folder: str, model: GPTNeo, opt) -> dict:
    """Restore weights, optimizer and RNG from a checkpoint folder; return the training state."""
    model.load_state_dict(GPTNeo.from_pretrained(folder).state_dict(), strict=True)
    saved = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["state"]


def init_distributed(t: TrainConfig):
    """(rank, world_size, device): one process per device under torchrun (it sets RANK), else (0, 1, device)."""
    device = pick_device(t.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def sum_over_ranks(*values: float, device) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device) -> bool:
    """True on every process if `flag` is true on any, so all ranks take the same branch."""
    return sum_over_ranks(float(flag), device=device)[0] > 0


def start_wandb(args, config: dict, out_dir: str, run_id: str | None):
    """A wandb run, or None. WANDB_MODE=offline/disabled is honored; with no API key it logs offline; any other
    wandb failure is a warning, never the end of the training run."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --use_wandb needs the wandb package: pip install wandb") from None
    kwargs = dict(project=args.wandb_project, name=args.wandb_run_name, dir=out_dir, id=run_id, resume="allow",
                  config={k: dataclasses.asdict(v) for k, v in config.items()})
    try:
        try:  # WANDB_MODE is passed on explicitly: wandb reads the environment only once per process
            return wandb.init(mode=os.environ.get("WANDB_MODE") or None, **kwargs)
        except wandb.errors.UsageError as e:  # no API key and WANDB_MODE unset: nothing needs an account offline
            print(f"wandb: {e}; logging offline under {out_dir}/wandb (upload later with `wandb sync`)")
            return wandb.init(mode="offline", **kwargs)
    except Exception as e:
        print(f"warning: wandb could not start ({type(e).__name__}: {e}); training continues without it")
        return None


def plot_losses(metrics_path: str, png_path: str):
    """Training and validation loss against tokens seen, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train")
    if val:
        ax.plot(*zip(*val), marker="o", ms=3, label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda path: fig.savefig(path, format="png", dpi=120))
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train a TinyLM model from an INI config (torchrun for several GPUs).")
    p.add_argument("--config", required=True, help="INI file, e.g. config/tiny_lm_1M.config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/last")
    p.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (honors WANDB_MODE)")
    p.add_argument("--wandb_project", default="tinylm")
    p.add_argument("--wandb_run_name", default=None)
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    m, d, t = config["model"], config["data"], config["train"]

    last_dir, best_dir = os.path.join(t.out_dir, "last"), os.path.join(t.out_dir, "best")
    resume_from = resumable_checkpoint(last_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise SystemExit(f"error: cannot resume: {last_dir} holds no checkpoint; drop --resume to start a new run")
    rank, world, device = init_distributed(t)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    for section, values in config.items():
        log(f"[{section}] " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(values).items()))
    torch.manual_seed(t.seed)
    vocab_size = FULL_VOCAB if d.tokenizer == "gpt-neo" else m.vocab_size
    if not master:
        dist.barrier()  # rank 0 builds the tokenizer and caches; the others then reuse them
    try:
        tokenizer, splits, _ = prepare_data(d.dataset, vocab_size, d.cache_dir, d.val_dataset, d.val_fraction)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if master and world > 1:
        dist.barrier()
    for split in ("train", "val"):
        if len(splits[split]) < d.block_size + 1:
            raise SystemExit(f"error: the {split} split has {len(splits[split])} tokens, fewer than data.block_size + 1")
    eot = tokenizer.eos_token_id
    model_config = dataclasses.replace(m, vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot)
    if d.block_size > model_config.max_position_embeddings:
        raise SystemExit(f"error: data.block_size {d.block_size} exceeds model.max_position_embeddings")
    model = GPTNeo(model_config).to(device)
    opt = make_optimizer(model, t, device)
    log(f"# {model.num_params() / 1e6:.2f}M parameters, {len(splits['train']):,} train tokens, device {device}"
        + (f", {world} processes" if world > 1 else ""))

    state = {"step": 0, "tokens": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0}
    if args.resume:
        state = load_checkpoint(resume_from, model, opt)
        log(f"# resumed at step {state['step']}")
    train_model = torch.compile(model) if t.compile else model
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
    os.makedirs(t.out_dir, exist_ok=True)
    metrics_path = os.path.join(t.out_dir, "metrics.jsonl")
    metrics = open(metrics_path, "a") if master else None
    run = start_wandb(args, config, t.out_dir, state.get("wandb_id")) if args.use_wandb and master else None
    if run is not None:
        state["wandb_id"] = run.id

    def record(row: dict):
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if run is not None:
                run.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"])

    tokens_per_step = t.batch_size * t.grad_accum * d.block_size * world
    bar = tqdm(total=t.max_steps, initial=state["step"], unit="step", dynamic_ncols=True,
               disable=not (master and sys.stderr.isatty()))
    start, t_last, reason = time.time() - state["elapsed"], time.time(), None
    model.train()
    loss_sum = 0.0
    while reason is None:
        step = state["step"]
        if (step % t.eval_interval == 0 or step == t.max_steps) and state.get("evaluated_step") != step:
            val, n = evaluate_loss(model, splits["val"], t.batch_size, d.block_size, t.eval_tokens, device,
                                   shard=(rank, world))
            if world > 1:  # each rank scored its share of the batches; all get the same total, and decision
                val_sum, n = sum_over_ranks(val * n, n, device=device)
                val = val_sum / n
            improved = val < state["best_val"] - t.min_delta
            state["evaluated_step"] = step  # a resumed run does not evaluate this step again
            state["best_val"], state["bad_evals"] = (val, 0) if improved else (state["best_val"], state["bad_evals"] + 1)
            record({"step": step, "tokens": state["tokens"], "val_loss": val})
            (bar.write if not bar.disable else log)(f"step {step:6d} | val {val:.4f} | best {state['best_val']:.4f}")
            state["elapsed"] = time.time() - start
            if master:
                if improved:
                    save_checkpoint(best_dir, model, tokenizer, opt, state, config)
                save_checkpoint(last_dir, model, tokenizer, opt, state, config)
        if t.patience and state["bad_evals"] >= t.patience:
            reason = f"early stopping: no improvement of {t.min_delta} in {t.patience} evaluations"
        elif step >= t.max_steps:
            reason = "max_steps reached"
        elif t.max_tokens and state["tokens"] >= t.max_tokens:
            reason = "max_tokens reached"
        elif any_rank(bool(t.max_minutes) and time.time() - start >= 60 * t.max_minutes, device):
            reason = "max_minutes reached"
        if reason:
            break
        lr = get_lr(step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            # rank r of w takes batch (step * grad_accum + micro) * w + r: w processes see the batches that one
            # process with w times the grad_accum would see, and a resumed run sees the same ones again
            index = (step * t.grad_accum + micro) * world + rank
            x, y = get_batch(splits["train"], t.batch_size, d.block_size, index, t.seed, device)
            sync = contextlib.nullcontext() if world == 1 or micro == t.grad_accum - 1 else train_model.no_sync()
            with sync:
                with autocast:
                    loss = train_model(x, y)[1] / t.grad_accum
                loss.backward()
            loss_sum += loss.item()
        loss_sum = sum_over_ranks(loss_sum, device=device)[0] / world
        if not math.isfinite(loss_sum):
            reason = f"loss became {loss_sum} at step {step}; the last good checkpoint is {last_dir}"
            break
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"], state["tokens"] = step + 1, state["tokens"] + tokens_per_step
        now = time.time()
        tok_s = tokens_per_step / (now - t_last)
        t_last = now
        record({"step": step + 1, "tokens": state["tokens"], "loss": loss_sum, "lr": lr, "tok_s": round(tok_s)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
        if bar.disable and (step + 1) % t.log_interval == 0:
            log(f"step {step + 1:6d} | loss {loss_sum:.4f} | lr {lr:.2e} | {tok_s:.0f} tok/s")
    bar.close()
    if master and math.isfinite(loss_sum) and state.get("evaluated_step") != state["step"]:
        state["elapsed"] = time.time() - start
        save_checkpoint(last_dir, model, tokenizer, opt, state, config)  # keep the steps since the last evaluation
    record({"step": state["step"], "stop": reason})
    if master:
        metrics.close()
        plot_losses(metrics_path, os.path.join(t.out_dir, "loss.png"))
        if run is not None:
            run.summary.update({"best_val_loss": state["best_val"], "stop": reason})
            run.finish()
    log(f"stopped: {reason}; best val loss {state['best_val']:.4f} in {best_dir}; loss curve in "
        f"{os.path.join(t.out_dir, 'loss.png')}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
