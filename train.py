"""Train a TinyLM model from an INI config, with early stopping, checkpoints and exact resume.

    python train.py --config config/tiny_lm_1M.config [--set train.lr=3e-4 ...] [--resume]

Each run leaves out_dir/best and out_dir/last: Hugging Face GPT-Neo folders (config.json, model.safetensors,
tokenizer.json) that inference.py samples from, plus train_state.pt (optimizer, step, RNG) and metrics.

Read top to bottom: main (parse, check the config, lock out_dir) -> train: set_up (data, model, optimizer,
precision, resume) -> training_loop (limit_reached, evaluate_and_save, train_step) -> finish -> summarize. A Run
holds what the steps share. The optimizers and schedule are optimizers.py; wandb and the loss curve runlog.py.
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

from model import GPTNeo
from tinylm.checkpoint import (StorageError, check_run_folder, clear_run, command, load_checkpoint, recover,
                        resumable_checkpoint, run_folder_lock, save_checkpoint)
from tinylm.data.cache import get_batch, prepare_data
from tinylm.data.tokenizer import FULL_VOCAB, load_tokenizer
from tinylm.devices import pick_device
from tinylm.evaluation.scoring import evaluate_loss
from tinylm.storage import storage_failure
from tinylm.training.config import TrainConfig, load_config
from tinylm.training.optimizers import Optimizers, budget_progress, get_lr, make_optimizer
from tinylm.training.precision import pick_precision
from tinylm.training.runlog import plot_losses, start_wandb

BUDGET_UNITS = 1000  # the progress bar counts thousandths of the budget


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


def main(argv=None, clock=time.time, pass_on_signals=True) -> int:
    """Check the config and take train.out_dir for this process alone, before any work; then train. `clock`
    (seconds) times the run and its max_minutes: tests pass one that advances per call, never racing the machine.

    Ctrl-C or SIGTERM stops the run after its step, evaluated and saved. Then, with pass_on_signals, the signal goes
    on to the handler the caller had (a program that runs training in-process, as pytest or a notebook does, stops
    as it would have without us: SIGTERM ends it, Ctrl-C raises KeyboardInterrupt); the command itself exits with
    128 + the signal's number instead."""
    exit_code = run_command(parse_args(argv), clock)
    if pass_on_signals and exit_code in SIGNAL_EXITS and threading.current_thread() is threading.main_thread():
        signal.raise_signal(SIGNAL_EXITS[exit_code])
    return exit_code


SIGNAL_EXITS = {128 + s.value: s for s in (signal.SIGINT, signal.SIGTERM)}  # the exit status of a signalled stop


def run_command(args, clock) -> int:
    """main() without the signal's passing on: the config checked, the run folder held, the run trained."""
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
        return train(args, config, notes, rank, world, device, clock)


@dataclasses.dataclass
class Run:
    """What the steps of one training run share. set_up builds it; train_step, evaluate_and_save and finish
    advance it; `state` is what each checkpoint saves of the run (step, tokens, best_val, bad_evals, elapsed)."""
    args: argparse.Namespace
    config: dict
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    splits: dict  # "train" and "val" token arrays
    model: GPTNeo  # the weights (fp32) that are evaluated and saved
    train_model: torch.nn.Module  # the same model as the loop runs it: compiled and/or wrapped in DDP
    opt: Optimizers
    autocast: torch.autocast
    state: dict
    metrics: object = None  # metrics.jsonl, open for appending (rank 0)
    wandb_run: object = None
    stop: dict = dataclasses.field(default_factory=lambda: {"signals": [], "evaluating": False})
    bar: tqdm | None = None
    clock: object = time.time  # seconds; what max_minutes, the schedule and tokens/s measure
    start: float = 0.0  # clock() when the run would have started had it never been interrupted
    evaluated_progress: float = 0.0  # the budget spent at the latest evaluation (eval_budget_fraction)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def t(self) -> TrainConfig:
        return self.config["train"]

    @property
    def last_dir(self) -> str:
        return os.path.join(self.t.out_dir, "last")

    @property
    def best_dir(self) -> str:
        return os.path.join(self.t.out_dir, "best")

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def say(self, line: str):
        """A line between progress-bar updates (rank 0)."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            self.log(line)


def train(args, config: dict, notes: list[str], rank: int, world: int, device, clock=time.time) -> int:
    """Set up, run the loop until a limit, a signal or early stopping ends it, save, and say how it went."""
    run = set_up(args, config, notes, rank, world, device)
    run.clock = clock
    first_step, first_tokens, t_first = run.state["step"], run.state["tokens"], clock()
    run.bar = budget_bar(budget_progress(run.state, run.t, run.state["elapsed"]),
                         enabled=run.master and sys.stderr.isatty())
    previous_handlers = catch_stop_signals(run.stop, run.say, can_skip_evaluation=world == 1)
    run.start = clock() - run.state["elapsed"]
    run.evaluated_progress = budget_progress(run.state, run.t, run.state["elapsed"])
    try:
        reason, exit_code = training_loop(run)
        run.bar.close()
        finish(run, reason, exit_code)
    except (StorageError, OSError) as e:
        run.bar.close()
        raise SystemExit(storage_stop(e, args, world, run.t.out_dir, run.last_dir)) from None
    finally:
        restore_signals(previous_handlers)
    summarize(run, reason, exit_code, run.state["step"] - first_step, run.state["tokens"] - first_tokens,
              clock() - t_first)
    if dist.is_initialized():
        # every rank waits for rank 0's saving and plotting: a rank that tore its process group down while the
        # other still used it died at exit in gloo ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return exit_code


def set_up(args, config: dict, notes: list[str], rank: int, world: int, device) -> Run:
    """Data, model, optimizer and precision; the checkpoint of a resumed run; the metrics file and wandb."""
    m, t = config["model"], config["train"]
    log = print if rank == 0 else (lambda *a, **k: None)
    for section in ("data", "train"):  # [model] follows once the tokenizer has set its vocabulary and ids
        log(f"[{section}] " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config[section]).items()))
    for note in notes:
        log(f"note: {note}")
    torch.manual_seed(t.seed)
    tokenizer, splits = load_data(args, config, rank, world, log)
    eot = tokenizer.eos_token_id
    model_config = dataclasses.replace(m, vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot)
    log("[model] " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_config).items()))
    model = GPTNeo(model_config).to(device)
    opt = make_optimizer(model, t, device)
    precision, kernels_off, why = run_precision(t, device, model, config["data"].block_size, rank, world, log)
    model.allow_c_kernels([k for k in model.allowed_c_kernels if k not in kernels_off])
    log(f"# {model.num_params() / 1e6:.2f}M parameters, {len(splits['train']):,} train tokens, device {device}"
        + (f", {world} processes" if world > 1 else "")
        + (", bf16 mixed precision" if precision == "bfloat16" else ", float32")
        + (f" (train.dtype = auto: {why})" if t.dtype == "auto" else ""))
    state = {"step": 0, "tokens": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0}
    if args.resume:
        try:
            state = load_checkpoint(os.path.join(t.out_dir, "last"), model, opt)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        log(f"# resumed at step {state['step']} ({state['tokens']:,} tokens, {state['elapsed'] / 60:.1f} minutes)")
    train_model = torch.compile(model) if t.compile else model
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    run = Run(args, config, rank, world, device, tokenizer, splits, model, train_model, opt, autocast, state)
    if run.master:
        if args.overwrite:
            clear_run(t.out_dir)
            log(f"# --overwrite: deleted the previous run in {t.out_dir}")
        run.metrics = open(os.path.join(t.out_dir, "metrics.jsonl"), "a")
        run.wandb_run = start_wandb(args, config, t.out_dir, state.get("wandb_id")) if args.use_wandb else None
        if run.wandb_run is not None:
            state["wandb_id"] = run.wandb_run.id
    return run


def run_precision(t, device, model, block_size: int, rank: int, world: int, log):
    """pick_precision's (precision, C kernels to leave out, why) for [train] t; with several processes on CPUs rank 0
    measures and every rank takes its answer (ranks that measured apart could train in different precisions)."""
    def pick():
        return pick_precision(t.dtype, device, model, t.batch_size, block_size, say=log, compiled=t.compile)
    if world == 1 or device.type != "cpu":  # elsewhere nothing is measured: every rank comes to the same answer
        return pick()
    answer = [pick() if rank == 0 else None]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def load_data(args, config: dict, rank: int, world: int, log) -> tuple:
    """(tokenizer, splits): rank 0 builds the tokenizer and token caches, the other ranks then read them. A
    resumed run keeps the tokenizer its weights were trained with, whatever the data now is."""
    m, d, t = config["model"], config["data"], config["train"]
    last_dir = os.path.join(t.out_dir, "last")
    if rank == 0 and args.resume:
        for folder in (os.path.join(t.out_dir, "best"), last_dir):
            recover(folder)  # put back what a crash inside save_checkpoint may have left half-swapped
    if rank != 0:
        dist.barrier()
    try:
        tokenizer = load_tokenizer(last_dir) if args.resume else None
        tokenizer, splits, _ = prepare_data(d.dataset, FULL_VOCAB if d.tokenizer == "gpt-neo" else m.vocab_size,
                                            d.cache_dir, d.val_dataset, d.val_fraction, tokenizer=tokenizer,
                                            log=log, hub_files=d.hub_files, streaming=d.streaming)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if rank == 0 and world > 1:
        dist.barrier()
    for split in ("train", "val"):
        if len(splits[split]) < d.block_size + 1:
            raise SystemExit(f"error: the {split} split has {len(splits[split])} tokens, fewer than "
                             "data.block_size + 1; lower data.block_size or add data")
    return tokenizer, splits


def training_loop(run: Run) -> tuple[str, int]:
    """Steps until a stop rule fires; every stop evaluates and saves the model it ends with first. Returns
    (why it stopped, exit status)."""
    t, state = run.t, run.state
    run.model.train()
    t_last = run.clock()
    while True:
        # every rank takes the same branch: the time limit and signals are decided by all of them together
        elapsed, signalled = sum_over_ranks(run.clock() - run.start, float(bool(run.stop["signals"])),
                                            device=run.device)
        elapsed /= run.world  # the ranks' mean: every rank takes the same learning rate and stop decision
        reason, exit_code = limit_reached(run, elapsed, signalled)
        progress = budget_progress(state, t, elapsed)
        # every stop evaluates the model it ends with, so best/ is never older than the final weights
        if (reason or evaluation_due(run, progress)) and state.get("evaluated_step") != state["step"]:
            run.evaluated_progress = progress
            try:
                evaluate_and_save(run)
            except SkipEvaluation:  # a second signal: stop now, saving last/ without the evaluation
                run.log("second signal: saving without the evaluation")
                signal_reason, exit_code = interrupted(run.stop)
                reason = reason or signal_reason
        if reason is None and t.patience and state["bad_evals"] >= t.patience:
            reason = f"early stopping: no improvement of {t.min_delta} in {t.patience} evaluations"
        if reason:
            return reason, exit_code
        step = state["step"]
        loss, lr = train_step(run, elapsed)
        if not math.isfinite(loss):
            return f"loss became {loss} at step {step}; the last good checkpoint is {run.last_dir}", 1
        now = run.clock()
        tok_s = tokens_per_step(run) / (now - t_last)
        t_last = now
        record(run, {"step": step + 1, "tokens": state["tokens"], "loss": loss, "lr": lr, "tok_s": round(tok_s)})
        advance(run.bar, budget_progress(state, t, now - run.start))
        run.bar.set_postfix({"step": step + 1, "loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tok_s:.0f}"},
                            refresh=False)
        if run.bar.disable and (step + 1) % t.log_interval == 0:
            run.log(f"step {step + 1:6d} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:.0f} tok/s")


def evaluation_due(run: Run, progress: float) -> bool:
    """Every eval_interval steps, and in a time-limited run whenever eval_budget_fraction of the budget has passed
    since the latest evaluation: a 5-minute run that manages 70 steps still evaluates along the way, not at step 0
    and the end. Step and token limits say in advance how many steps come, so eval_interval alone serves them."""
    t = run.t
    if run.state["step"] % t.eval_interval == 0:
        return True
    if t.eval_budget_fraction is None or not t.max_minutes:
        return False
    return progress - run.evaluated_progress >= t.eval_budget_fraction


def limit_reached(run: Run, elapsed: float, signalled: bool) -> tuple[str | None, int]:
    """(why the run stops now, exit status), or (None, 0) to go on."""
    t, state = run.t, run.state
    if signalled:
        return interrupted(run.stop)
    if state["step"] >= t.max_steps:
        return "max_steps reached", 0
    if t.max_tokens and state["tokens"] >= t.max_tokens:
        return "max_tokens reached", 0
    if t.max_minutes and elapsed >= 60 * t.max_minutes:
        return (f"max_minutes reached (train.max_minutes = {t.max_minutes:g} counts the whole run, earlier "
                "invocations of a resumed run included)"), 0
    return None, 0


def tokens_per_step(run: Run) -> int:
    return run.t.batch_size * run.t.grad_accum * run.config["data"].block_size * run.world


def train_step(run: Run, elapsed: float) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches on every rank: (the mean loss, the learning rate)."""
    t, d, state = run.t, run.config["data"], run.state
    step = state["step"]
    lr = get_lr(step, t, budget_progress(state, t, elapsed))
    for group in run.opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    loss_sum = 0.0
    for micro in range(t.grad_accum):
        # rank r of w takes batch (step * grad_accum + micro) * w + r: w processes see the batches that one
        # process with w times the grad_accum would see, and a resumed run sees the same ones again
        index = (step * t.grad_accum + micro) * run.world + run.rank
        x, y = get_batch(run.splits["train"], t.batch_size, d.block_size, index, t.seed, run.device)
        last_micro = run.world == 1 or micro == t.grad_accum - 1
        with contextlib.nullcontext() if last_micro else run.train_model.no_sync():
            with run.autocast:
                loss = run.train_model(x, y)[1] / t.grad_accum
            loss.backward()
        loss_sum += loss.item()
    loss_sum = sum_over_ranks(loss_sum, device=run.device)[0] / run.world
    if not math.isfinite(loss_sum):
        return loss_sum, lr  # the weights are left as they were
    if t.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    state["step"], state["tokens"] = step + 1, state["tokens"] + tokens_per_step(run)
    return loss_sum, lr


def evaluate_and_save(run: Run):
    """Score the validation split, keep best/ if it improved, and write last/ at this step."""
    t, state = run.t, run.state
    run.stop["evaluating"] = True
    try:
        val, n = evaluate_loss(run.model, run.splits["val"], t.batch_size, run.config["data"].block_size,
                               t.eval_tokens, run.device, shard=(run.rank, run.world))
    finally:
        run.stop["evaluating"] = False
    if run.world > 1:  # each rank scored its share of the batches; all get the same total, and decision
        val_sum, n = sum_over_ranks(val * n, n, device=run.device)
        val = val_sum / n
    improved = val < state["best_val"] - t.min_delta
    state["evaluated_step"] = state["step"]  # a resumed run does not evaluate this step again
    state["best_val"], state["bad_evals"] = (val, 0) if improved else (state["best_val"], state["bad_evals"] + 1)
    record(run, {"step": state["step"], "tokens": state["tokens"], "val_loss": val})
    run.say(f"step {state['step']:6d} | val {val:.4f} | best {state['best_val']:.4f}")
    state["elapsed"] = run.clock() - run.start
    if run.master:
        if improved:
            save_checkpoint(run.best_dir, run.model, run.tokenizer, run.opt, state, run.config, resumable=False)
        save_checkpoint(run.last_dir, run.model, run.tokenizer, run.opt, state, run.config)


def record(run: Run, row: dict):
    """One line of metrics.jsonl, and of wandb's log."""
    if run.master:
        run.metrics.write(json.dumps(row) + "\n")
        run.metrics.flush()
        if run.wandb_run is not None:
            run.wandb_run.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                              step=row["step"])


def finish(run: Run, reason: str, exit_code: int):
    """After the loop: last/ where the final evaluation was skipped, the stop in metrics, the loss curve."""
    state = run.state
    if run.master and exit_code != 1 and state.get("evaluated_step") != state["step"]:
        state["elapsed"] = run.clock() - run.start
        save_checkpoint(run.last_dir, run.model, run.tokenizer, run.opt, state, run.config)
    record(run, {"step": state["step"], "stop": reason})
    if run.master:
        run.metrics.close()
        plot_losses(run.metrics.name, os.path.join(run.t.out_dir, "loss.png"))
        if run.wandb_run is not None:
            run.wandb_run.summary.update({"best_val_loss": state["best_val"], "stop": reason})
            run.wandb_run.finish()


def summarize(run: Run, reason: str, exit_code: int, steps: int, trained: int, seconds: float):
    """What this invocation did, where the model is, and the command that continues the run."""
    t, state = run.t, run.state
    run.log(f"stopped: {reason}\n"
            f"  {steps} steps, {trained:,} tokens in {seconds / 60:.1f} minutes "
            f"({trained / max(seconds, 1e-9):,.0f} tokens/s); {state['tokens']:,} tokens in all\n"
            f"  best val loss {state['best_val']:.4f} in {run.best_dir}; loss curve in "
            f"{os.path.join(t.out_dir, 'loss.png')}\n"
            f"  sample: python inference.py --model {shlex.quote(run.best_dir)}")
    more = {"max_minutes": {"train.max_minutes": f"{2 * (t.max_minutes or 0):g}"},
            "max_tokens": {"train.max_tokens": str(2 * (t.max_tokens or 0))},
            "max_steps": {"train.max_steps": str(2 * t.max_steps)}}
    if exit_code != 1 and not reason.startswith("early stopping"):
        run.log(f"  continue: {command(run.args, run.world, True, more.get(reason.split()[0]))}")


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
        sys.exit(main(pass_on_signals=False))
    except KeyboardInterrupt:  # before training started: nothing to save, and caches are written whole
        sys.exit("interrupted before training started; nothing was saved")
