"""Train a TinyLM model from an INI config, with early stopping, checkpoints and exact resume.

    python train.py --config config/tiny_lm_1M.config [--set train.lr=3e-4 ...] [--resume]

Each run leaves out_dir/best and out_dir/last: Hugging Face GPT-Neo folders (config.json, model.safetensors,
tokenizer.json) that inference.py samples from, plus train_state.pt (optimizer, step, RNG) and metrics.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (StorageError, check_run_folder, clear_run, command, load_checkpoint, recover,
                        resumable_checkpoint, run_folder_lock, save_checkpoint)
from config import TrainConfig, load_config  # noqa: F401 (train.load_config is used by tests and benches)
from dataload import FULL_VOCAB, get_batch, load_tokenizer, prepare_data
from devices import pick_device, pick_dtype
from model import GPTNeo
from scoring import evaluate_loss
from storage import atomic_write, storage_failure

BUDGET_UNITS = 1000  # the progress bar counts thousandths of the budget


def budget_progress(state: dict, t: TrainConfig, elapsed: float) -> float:
    """How much of the run's budget is spent, from 0 to 1: the largest used fraction of max_steps, max_tokens and
    max_minutes (elapsed seconds, earlier invocations of a resumed run included), so the learning-rate schedule
    ends with whichever limit stops the run."""
    used = [state["step"] / t.max_steps]
    if t.max_tokens:
        used.append(state["tokens"] / t.max_tokens)
    if t.max_minutes:
        used.append(elapsed / (60 * t.max_minutes))
    return min(1.0, max(used))


def get_lr(step: int, t: TrainConfig, progress: float | None = None) -> float:
    """The learning rate of a step at `progress` through the budget (default: step / max_steps): a linear warmup
    over warmup_steps (done by warmup_fraction of the budget at the latest), times the schedule's shape from lr
    down to min_lr."""
    progress = step / t.max_steps if progress is None else progress
    warm = 1.0 if not t.warmup_steps else min(1.0, max((step + 1) / t.warmup_steps, progress / t.warmup_fraction))
    if t.lr_schedule == "constant":
        return t.lr * warm
    if t.lr_schedule == "wsd":
        shape = min(1.0, (1.0 - progress) / t.decay_fraction)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return warm * (t.min_lr + (t.lr - t.min_lr) * shape)


class Optimizers:
    """Several optimizers stepped as one, with what the loop and checkpoints use of an optimizer."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict):
        states = state["optimizers"] if "optimizers" in state else [state]  # checkpoints before Optimizers
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(states)} optimizer states and train.optimizer = "
                             f"{'muon' if len(self.optimizers) > 1 else 'adamw'} needs {len(self.optimizers)}")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def make_optimizer(model: GPTNeo, t: TrainConfig, device) -> Optimizers:
    """AdamW; or, with train.optimizer = muon, torch.optim.Muon for the hidden matrices (attention and MLP
    weights) and AdamW for the embeddings (wte is also the LM head), biases and LayerNorms, the split
    modded-nanogpt uses. Every param group carries lr_scale, its learning rate relative to train.lr, which the
    schedule multiplies."""
    matrices, rest = [], []
    for name, p in model.named_parameters():
        (matrices if p.dim() == 2 and not name.startswith(("wte", "wpe")) else rest).append(p)
    fused = torch.device(device).type == "cuda"
    if t.optimizer == "muon":
        muon = torch.optim.Muon(matrices, lr=t.muon_lr, weight_decay=t.weight_decay, momentum=t.muon_momentum)
        adamw = torch.optim.AdamW(rest, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=0.0, fused=fused)
        optimizers = Optimizers(muon, adamw)
        muon.param_groups[0]["lr_scale"] = t.muon_lr / t.lr if t.lr else 0.0
    else:
        # weight decay on the matrices of the linear layers only: not biases, LayerNorms or embeddings
        groups = [{"params": matrices, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        optimizers = Optimizers(torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused))
    for group in optimizers.param_groups:
        group.setdefault("lr_scale", 1.0)
    return optimizers


def init_distributed(t: TrainConfig):
    """(rank, world_size, device): one process per device under torchrun (it sets RANK), else (0, 1, device)."""
    device = pick_device(t.device, "train.device")
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


class SkipEvaluation(Exception):
    """A second interrupt during the final evaluation: save without it."""


def catch_stop_signals(stop: dict, log, can_skip_evaluation: bool) -> dict:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step; a second one during the final
    evaluation skips it. Saving is never interrupted. Returns the previous handlers, for restore_signals."""
    def handle(signum, frame):
        stop["signals"].append(signum)
        if len(stop["signals"]) == 1:
            log(f"\n{signal.Signals(signum).name}: stopping after this step; the model is evaluated and saved "
                "first (send it again to skip the evaluation)")
            sys.stdout.flush()
        elif stop["evaluating"] and can_skip_evaluation:
            raise SkipEvaluation

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}


def interrupted(stop: dict) -> tuple[str, int]:
    """(stop reason, exit status) of a signalled stop; a rank that got no signal itself names SIGTERM, which
    torchrun sends to all of them."""
    sig = signal.Signals(stop["signals"][0] if stop["signals"] else signal.SIGTERM)
    return f"interrupted by {sig.name}", 128 + sig.value


def restore_signals(previous: dict):
    for s, handler in previous.items():
        signal.signal(s, handler)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a TinyLM model from an INI config (torchrun for several GPUs).")
    p.add_argument("--config", required=True, help="INI file, e.g. config/tiny_lm_1M.config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last/ checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run train.out_dir holds and start a new one")
    p.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (honors WANDB_MODE)")
    p.add_argument("--wandb_project", default="tinylm")
    p.add_argument("--wandb_run_name", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Check the config and take train.out_dir for this process alone, before any work; then train."""
    args = parse_args(argv)
    with contextlib.ExitStack() as held:
        try:
            config = load_config(args.config, args.set)
            m, d, t = config["model"], config["data"], config["train"]
            if d.block_size > m.max_position_embeddings:
                raise ValueError(f"data.block_size = {d.block_size} is longer than the model's context, "
                                 f"model.max_position_embeddings = {m.max_position_embeddings}; lower one or raise "
                                 "the other")
            rank, world, device = init_distributed(t)
            if rank == 0:  # one writer per run folder: held until train() returns, dropped by the OS if killed
                held.enter_context(run_folder_lock(t.out_dir))
            notes = check_run_folder(args, config)
        except (ValueError, StorageError) as e:
            raise SystemExit(f"error: {e}") from None
        return train(args, config, notes, rank, world, device)


def train(args, config: dict, notes: list[str], rank: int, world: int, device) -> int:
    m, d, t = config["model"], config["data"], config["train"]
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    for section in ("data", "train"):  # [model] follows once the tokenizer has set its vocabulary and ids
        log(f"[{section}] " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config[section]).items()))
    for note in notes:
        log(f"note: {note}")
    torch.manual_seed(t.seed)
    vocab_size = FULL_VOCAB if d.tokenizer == "gpt-neo" else m.vocab_size
    last_dir, best_dir = os.path.join(t.out_dir, "last"), os.path.join(t.out_dir, "best")
    if master and args.resume:
        for folder in (best_dir, last_dir):
            recover(folder)  # put back what a crash inside save_checkpoint may have left half-swapped
    if not master:
        dist.barrier()  # rank 0 builds the tokenizer and caches; the others then reuse them
    try:
        # a resumed run keeps the tokenizer its weights were trained with, whatever the data now is
        tokenizer = load_tokenizer(last_dir) if args.resume else None
        tokenizer, splits, _ = prepare_data(d.dataset, vocab_size, d.cache_dir, d.val_dataset, d.val_fraction,
                                            tokenizer=tokenizer, log=log, hub_files=d.hub_files,
                                            streaming=d.streaming)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if master and world > 1:
        dist.barrier()
    for split in ("train", "val"):
        if len(splits[split]) < d.block_size + 1:
            raise SystemExit(f"error: the {split} split has {len(splits[split])} tokens, fewer than "
                             "data.block_size + 1; lower data.block_size or add data")
    eot = tokenizer.eos_token_id
    model_config = dataclasses.replace(m, vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot)
    log("[model] " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_config).items()))
    model = GPTNeo(model_config).to(device)
    opt = make_optimizer(model, t, device)
    precision, why = pick_dtype(t.dtype, device)
    log(f"# {model.num_params() / 1e6:.2f}M parameters, {len(splits['train']):,} train tokens, device {device}"
        + (f", {world} processes" if world > 1 else "")
        + (", bf16 mixed precision" if precision == "bfloat16" else ", float32")
        + (f" (train.dtype = auto: {why})" if t.dtype == "auto" else ""))

    state = {"step": 0, "tokens": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0}
    if args.resume:
        try:
            state = load_checkpoint(last_dir, model, opt)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        log(f"# resumed at step {state['step']} ({state['tokens']:,} tokens, {state['elapsed'] / 60:.1f} minutes)")
    train_model = torch.compile(model) if t.compile else model
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    if master and args.overwrite:
        clear_run(t.out_dir)
        log(f"# --overwrite: deleted the previous run in {t.out_dir}")
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

    def evaluate_and_save():
        """Score the validation split, keep best/ if it improved, and write last/ at this step."""
        stop["evaluating"] = True
        try:
            val, n = evaluate_loss(model, splits["val"], t.batch_size, d.block_size, t.eval_tokens, device,
                                   shard=(rank, world))
        finally:
            stop["evaluating"] = False
        if world > 1:  # each rank scored its share of the batches; all get the same total, and decision
            val_sum, n = sum_over_ranks(val * n, n, device=device)
            val = val_sum / n
        improved = val < state["best_val"] - t.min_delta
        state["evaluated_step"] = state["step"]  # a resumed run does not evaluate this step again
        state["best_val"], state["bad_evals"] = (val, 0) if improved else (state["best_val"], state["bad_evals"] + 1)
        record({"step": state["step"], "tokens": state["tokens"], "val_loss": val})
        say(f"step {state['step']:6d} | val {val:.4f} | best {state['best_val']:.4f}")
        state["elapsed"] = time.time() - start
        if master:
            if improved:
                save_checkpoint(best_dir, model, tokenizer, opt, state, config, resumable=False)
            save_checkpoint(last_dir, model, tokenizer, opt, state, config)

    tokens_per_step = t.batch_size * t.grad_accum * d.block_size * world
    bar = budget_bar(budget_progress(state, t, state["elapsed"]), enabled=master and sys.stderr.isatty())
    say = bar.write if not bar.disable else log  # lines between progress-bar updates
    stop = {"signals": [], "evaluating": False}
    previous_handlers = catch_stop_signals(stop, say, can_skip_evaluation=world == 1)
    start, t_last, reason, exit_code = time.time() - state["elapsed"], time.time(), None, 0
    first_step, first_tokens, t_first = state["step"], state["tokens"], time.time()
    model.train()
    try:
        while True:
            step = state["step"]
            # every rank takes the same branch: the time limit and signals are decided by all of them together
            elapsed, signalled = sum_over_ranks(time.time() - start, float(bool(stop["signals"])), device=device)
            elapsed /= world  # the ranks' mean: every rank takes the same learning rate and stop decision
            out_of_time = bool(t.max_minutes) and elapsed >= 60 * t.max_minutes
            if signalled:
                reason, exit_code = interrupted(stop)
            elif step >= t.max_steps:
                reason = "max_steps reached"
            elif t.max_tokens and state["tokens"] >= t.max_tokens:
                reason = "max_tokens reached"
            elif out_of_time:
                reason = f"max_minutes reached (train.max_minutes = {t.max_minutes:g} counts the whole run, earlier " \
                         "invocations of a resumed run included)"
            # every stop evaluates the model it ends with, so best/ is never older than the final weights
            if (reason or step % t.eval_interval == 0) and state.get("evaluated_step") != step:
                try:
                    evaluate_and_save()
                except SkipEvaluation:  # a second signal: stop now, saving last/ without the evaluation
                    log("second signal: saving without the evaluation")
                    signal_reason, exit_code = interrupted(stop)
                    reason = reason or signal_reason
            if reason is None and t.patience and state["bad_evals"] >= t.patience:
                reason = f"early stopping: no improvement of {t.min_delta} in {t.patience} evaluations"
            if reason:
                break
            lr = get_lr(step, t, budget_progress(state, t, elapsed))
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
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
                reason, exit_code = f"loss became {loss_sum} at step {step}; the last good checkpoint is {last_dir}", 1
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
            advance(bar, budget_progress(state, t, now - start))
            bar.set_postfix({"step": step + 1, "loss": f"{loss_sum:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tok_s:.0f}"},
                            refresh=False)
            if bar.disable and (step + 1) % t.log_interval == 0:
                log(f"step {step + 1:6d} | loss {loss_sum:.4f} | lr {lr:.2e} | {tok_s:.0f} tok/s")
        bar.close()
        if master and exit_code != 1 and state.get("evaluated_step") != state["step"]:
            state["elapsed"] = time.time() - start
            save_checkpoint(last_dir, model, tokenizer, opt, state, config)  # a skipped final evaluation
        record({"step": state["step"], "stop": reason})
        if master:
            metrics.close()
            plot_losses(metrics_path, os.path.join(t.out_dir, "loss.png"))
            if run is not None:
                run.summary.update({"best_val_loss": state["best_val"], "stop": reason})
                run.finish()
    except (StorageError, OSError) as e:
        bar.close()
        raise SystemExit(storage_stop(e, args, world, t.out_dir, last_dir)) from None
    finally:
        restore_signals(previous_handlers)
    seconds = time.time() - t_first
    trained = state["tokens"] - first_tokens
    log(f"stopped: {reason}\n"
        f"  {state['step'] - first_step} steps, {trained:,} tokens in {seconds / 60:.1f} minutes "
        f"({trained / max(seconds, 1e-9):,.0f} tokens/s); {state['tokens']:,} tokens in all\n"
        f"  best val loss {state['best_val']:.4f} in {best_dir}; loss curve in {os.path.join(t.out_dir, 'loss.png')}\n"
        f"  sample: python inference.py --model {shlex.quote(best_dir)}")
    more = {"max_minutes": {"train.max_minutes": f"{2 * (t.max_minutes or 0):g}"},
            "max_tokens": {"train.max_tokens": str(2 * (t.max_tokens or 0))},
            "max_steps": {"train.max_steps": str(2 * t.max_steps)}}
    if exit_code != 1 and not reason.startswith("early stopping"):
        log(f"  continue: {command(args, world, True, more.get(reason.split()[0]))}")
    if dist.is_initialized():
        # every rank waits for rank 0's saving and plotting: a rank that tore its process group down while the
        # other still used it died at exit in gloo ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return exit_code


def budget_bar(progress: float, enabled: bool) -> tqdm:
    """A progress bar over the run's budget, in thousandths: the fraction budget_progress gives (what the
    learning-rate schedule follows), so a run that max_minutes stops shows the time it has left, not how long
    max_steps would take."""
    return tqdm(total=BUDGET_UNITS, initial=round(BUDGET_UNITS * progress), dynamic_ncols=True, disable=not enabled,
                bar_format="{percentage:3.0f}% of the budget |{bar}| {elapsed}<{remaining}{postfix}")


def advance(bar: tqdm, progress: float):
    bar.update(round(BUDGET_UNITS * progress) - bar.n)


def storage_stop(error: OSError | StorageError, args, world: int, out_dir: str, last_dir: str) -> str:
    """The message a run ends with when out_dir cannot be written; an OSError that is not about the storage is
    raised again."""
    sentence = str(error) if isinstance(error, StorageError) else storage_failure(error, out_dir, "train.out_dir")
    if sentence is None:
        raise error
    if resumable_checkpoint(last_dir) is None:
        return f"error: {sentence}; nothing was saved, so start the run again once it is fixed"
    return (f"error: {sentence}; the checkpoints saved before are kept\n"
            f"  continue, once it is fixed: {command(args, world, True)}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before training started: nothing to save, and caches are written whole
        sys.exit("interrupted before training started; nothing was saved")
