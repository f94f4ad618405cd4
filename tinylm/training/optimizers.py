"""The optimizers and the learning-rate schedule of a training run: AdamW, or Muon for the hidden matrices with
AdamW for the rest, stepped as one; a warmup, then cosine, WSD or constant, over the run's budget (max_steps,
max_tokens or max_minutes, whichever ends it).

    opt = make_optimizer(model, config["train"], device)
    lr = get_lr(step, t, budget_progress(state, t, elapsed_seconds))
"""

import math

import torch

from model import GPTNeo
from tinylm.training.config import TrainConfig


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
    # one kernel over all parameters: on CPU 17 ms a step for TinyStories-8M's 20M parameters, against 85-95 ms for
    # the default (foreach) implementation
    fused = torch.device(device).type in ("cuda", "cpu")
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
