"""Typed INI configs for train.py: one dataclass per section ([model] is model.GPTNeoConfig), every value converted
to its field's type, unknown keys and bad values refused with the file or `--set` item that set them.

    config = load_config("config/tiny_lm_1M.config", ["train.lr=3e-4"])   # {"model": ..., "data": ..., "train": ...}
"""

import configparser
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass

from model import GPTNeoConfig
from tinylm.data.corpus import HUB_DATASET


@dataclass
class DataConfig:
    dataset: str = HUB_DATASET  # hub dataset, or a .txt/.jsonl/.parquet file, folder or glob
    val_dataset: str | None = None  # None: hold out val_fraction of dataset (the hub's validation split for the hub)
    val_fraction: float = 0.01
    tokenizer: str = "trimmed"  # "trimmed": model.vocab_size most used GPT-Neo tokens; "gpt-neo": all 50257
    block_size: int = 512  # tokens per training sequence, as in the paper
    cache_dir: str = "data"  # tokenizer.json and token caches
    # Hub datasets only. hub_files: read the repository's PREFIX-train.txt and PREFIX-valid.txt instead of its
    # parquet splits; TinyStoriesV2-GPT4 is TinyStories V2 (GPT-4 stories only). streaming: tokenize stories as
    # they download, keeping no copy of the text on disk (a trimmed vocabulary reads the data twice).
    hub_files: str | None = None
    streaming: bool = False

    def __post_init__(self):
        if self.tokenizer not in ("trimmed", "gpt-neo"):
            raise ValueError(f"tokenizer must be 'trimmed' or 'gpt-neo', got {self.tokenizer!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not self.cache_dir.strip():
            raise ValueError("cache_dir must name a folder, got an empty value")


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4  # where the decay ends
    # The schedule runs over the run's budget: whichever of max_steps, max_tokens and max_minutes is closest to
    # stopping the run sets its progress, so the decay ends when the run does, on a fast or a busy machine.
    # "cosine": warmup, then cosine from lr to min_lr; "wsd": warmup, lr, then a linear decay to min_lr over
    # the last decay_fraction of the budget; "constant": warmup, then lr.
    lr_schedule: str = "cosine"
    decay_fraction: float = 0.2  # "wsd" only
    warmup_steps: int = 100  # linear warmup, ending early if it would take more than warmup_fraction of the budget
    warmup_fraction: float = 0.05
    optimizer: str = "adamw"  # "muon": torch.optim.Muon for the hidden matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as it scales lr)
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # not applied to biases, LayerNorms or embeddings
    grad_clip: float = 1.0  # 0 disables
    # The limits: a run stops at the first one it reaches. max_steps is always a limit (a positive number); the
    # others are a positive number, or none for no limit.
    max_steps: int = 10000
    max_tokens: int | None = None  # stop after this many training tokens
    max_minutes: float | None = None  # stop after this much wall time
    eval_interval: int = 200  # steps between validation evaluations
    # ...and, when max_minutes is set, at least this often as a fraction of the budget (the one closest to stopping
    # the run, as the schedule follows), so a time-limited run on a slow or busy machine still evaluates along the
    # way; none: eval_interval alone. Step and token limits keep eval_interval exactly: their steps are known.
    eval_budget_fraction: float | None = 0.1
    eval_tokens: int = 100_000  # validation tokens scored per evaluation
    patience: int = 5  # evaluations without improvement before early stopping; 0: no early stopping
    min_delta: float = 0.0  # improvement in validation loss that counts
    seed: int = 1337
    device: str = "auto"  # cpu, cuda, mps or auto; under torchrun each process takes cuda:LOCAL_RANK
    # "bfloat16": mixed precision, the matmuls in bf16 under autocast (weights, optimizer state, LayerNorm, softmax
    # and loss stay fp32); "auto": bfloat16 on a GPU; on a CPU the fastest of fp32 (with or without each C kernel)
    # and bf16, measured at the run's shapes once per machine (training/precision.py)
    dtype: str = "auto"
    compile: bool = False  # torch.compile the model for training
    log_interval: int = 10  # steps between progress lines when stderr is not a terminal (no progress bar)
    out_dir: str = "out/tiny_lm"

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "eval_interval", "eval_tokens", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.check_limits()
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "min_delta", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine', 'wsd' or 'constant', got {self.lr_schedule!r}")
        if self.eval_budget_fraction is not None and not 0 < self.eval_budget_fraction <= 1:
            raise ValueError(f"eval_budget_fraction must be in (0, 1], or none for eval_interval alone, got "
                             f"{self.eval_budget_fraction:g}")
        for name in ("decay_fraction", "warmup_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.out_dir.strip():
            raise ValueError("out_dir must name a folder, got an empty value")
        self.out_dir = os.path.normpath(self.out_dir)  # out/x/../y is out/y: making it must not leave an empty out/x
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")

    def check_limits(self):
        """One rule for every limit: a positive number, or the documented way to say "no limit" (none; for patience,
        0). Anything else, 0 minutes or -1 tokens, would silently mean no limit or a run of no steps."""
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive number of steps (it always limits a run; max_tokens and "
                             f"max_minutes can stop it sooner), got {self.max_steps}")
        for name, unit in (("max_tokens", "tokens"), ("max_minutes", "minutes")):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of {unit}, or none for no limit, got {value:g}")
        if self.patience < 0:
            raise ValueError(f"patience must be a positive number of evaluations, or 0 for no early stopping, got "
                             f"{self.patience}")


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


def build_dataclass(cls, values: dict[str, str], origins: dict[str, str], section: str):
    """Dataclass `cls` from INI strings; unknown keys and bad values are errors that name the key and where it was
    set (origins[key]: the config file, or the --set item)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ValueError(f"{origins[key]}: unknown key {key!r} in [{section}]; valid keys are {', '.join(names)}")
    kwargs = {k: parse_value(v, hints[k], f"{origins[k]}: [{section}] {k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        # blame a --set item when the message names the key it set, else the config file
        named = [k for k in values if re.search(rf"\b{k}\b", str(e))]
        blamed = next((origins[k] for k in named if origins[k].startswith("--set")), None)
        file = next((o for o in origins.values() if not o.startswith("--set")), "the defaults")
        raise ValueError(f"{blamed or file}: [{section}] {e}") from None


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
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ValueError(f"config file {path} is not a valid INI file: {e}") from None
    unknown = sorted(set(parser.sections()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) [{'], ['.join(unknown)}]; valid sections are "
                         f"[{'], ['.join(SECTIONS)}]")
    origins = {(s, k): path for s in parser.sections() for k in parser[s]}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r} must look like section.key=value, e.g. model.n_layer=4")
        if section not in SECTIONS:
            raise ValueError(f"--set {item}: unknown section [{section}]; valid sections are "
                             f"[{'], ['.join(SECTIONS)}]")
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, name.strip(), value)
        origins[section, name.strip()] = f"--set {item}"
    return {name: build_dataclass(cls, dict(parser[name]) if parser.has_section(name) else {},
                                  {k: origins[name, k] for k in (parser[name] if parser.has_section(name) else ())},
                                  name)
            for name, cls in SECTIONS.items()}
