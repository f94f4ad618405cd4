"""Train a TinyLM model from an INI config.

    python train.py --config config/tiny_lm_1M.config [--set model.n_layer=4 ...]

This slice reads, type-checks and prints the config and builds the model; the training loop, data and
checkpointing land with issue 4 (data: issue 3).
"""

import argparse
import configparser
import dataclasses
import re
import sys
import types
import typing

from model import GPTNeo, GPTNeoConfig

# INI section -> the dataclass its keys fill. Issues 3 and 4 add [data] and [train].
SECTIONS = {"model": GPTNeoConfig}


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Train a TinyLM model from an INI config.")
    p.add_argument("--config", required=True, help="INI file, e.g. config/tiny_lm_1M.config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for section, values in config.items():
        print(f"[{section}]")
        for k, v in dataclasses.asdict(values).items():
            print(f"{k} = {v}")
    model = GPTNeo(config["model"])
    print(f"# {model.num_params() / 1e6:.2f}M parameters")
    print("the training loop is not implemented yet (issue 4); use inference.py to sample from released weights",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
