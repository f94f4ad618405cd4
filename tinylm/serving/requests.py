"""What every playground request shares: its fields checked against their kinds and rules, and a mistake as
one sentence that names the field (HTTP 400, or the status it carries)."""

import json


class RequestError(ValueError):
    """A mistake in a request: HTTP `status` with one sentence that names the field."""

    def __init__(self, sentence: str, status: int = 400):
        super().__init__(sentence)
        self.status = status


def checked(body: dict, fields: dict) -> dict:
    """The request's values with the defaults for the ones left out; an unknown field, or a value of the wrong
    kind, is a RequestError naming it. fields: name -> (default, kind, rule, what the rule says)."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; the fields are {', '.join(fields)}")
    values = {}
    for name, (default, kind, rule, says) in fields.items():
        value = body.get(name, default)
        if value is None and default is None:  # left out, or null, where null means "no limit" / "random"
            values[name] = None
            continue
        of_kind = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not of_kind or rule is not None and not rule(value):
            raise RequestError(f"{name} must be {says}, got {json.dumps(value)}")
        values[name] = value
    return values


# A request's token ids: the story so far (a branch in /api/generate, the text on screen in the Inside view)
IDS_FIELD = (None, list, lambda v: all(isinstance(i, int) and not isinstance(i, bool) for i in v),
             "a list of token ids")


def checked_ids(ids: list[int], vocab: int) -> list[int]:
    """ids, when it holds 1 or more ids of this vocabulary; else a RequestError naming the field."""
    if not ids or not all(0 <= i < vocab for i in ids):
        raise RequestError(f"ids must hold 1 or more token ids from 0 to {vocab - 1}")
    return ids
