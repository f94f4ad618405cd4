"""The playground's Inside view: POST /api/inside and POST /api/neuron (see playground.py's docstring for the API).
Each request runs tinylm/modeling/inside.py's forward pass of its own over the text on screen, so the story stream
and generate() are as fast as before. The contexts that excite a neuron most come from the stories file named at
--serve time (--neuron_stories): computed once per model in a thread of their own, with progress, and kept.
"""

import threading

import torch

from tinylm.data.corpus import non_empty, read_stories
from tinylm.modeling.inside import head_stats, inside, logit_lens
from tinylm.serving.requests import IDS_FIELD, RequestError, checked, checked_ids

TOP = 5  # next tokens per layer in the logit lens
TOP_CONTEXTS = 8  # contexts kept per neuron
MAX_NEURON_TOKENS = 200_000  # of --neuron_stories, read in order: a few seconds for a TinyStories model on a CPU
AROUND = 12  # tokens shown before a neuron's top context token (and 3 after)


def text_ids(playground, body: dict, fields: dict) -> tuple[dict, object, object, list[int]]:
    """(values, model, tokenizer, ids) of a request that names a model and the text on screen, as `text` or as
    `ids` (the story's tokens): bounded by the model's context and --max_prompt_chars."""
    values = checked(body, {
        "model": (playground.models[0], str, None, "the name of a model on offer"),
        "text": (None, str, lambda v: v.strip() != "", "some text"),
        "ids": IDS_FIELD,
        **fields})
    if (values["text"] is None) == (values["ids"] is None):
        raise RequestError("give the text to look inside as text or as ids (the story's tokens), one of them")
    model, tokenizer = playground.model(values["model"])
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if values["text"] is not None:
        if len(values["text"]) > playground.max_prompt_chars:
            raise RequestError(f"text is {len(values['text']):,} characters; this server takes at most "
                                f"{playground.max_prompt_chars:,} (--max_prompt_chars)")
        ids = tokenizer.encode(values["text"])
    else:
        ids = checked_ids(values["ids"], vocab)
    if len(ids) > context:
        raise RequestError(f"the text is {len(ids)} tokens and the model's context is {context}: shorten it to at "
                            f"most {context} tokens")
    return values, model, tokenizer, ids


def token_list(tokenizer, ids: list[int]) -> list[dict]:
    """The text's tokens as the page shows them: [{"id", "text"}]."""
    return [{"id": i, "text": tokenizer.decode([i])} for i in ids]


def inside_request(playground, body: dict) -> dict:
    """Every head's attention from the picked token (and one head's whole pattern when asked), each head's
    statistics over the text, and the logit lens at the picked token."""
    values, model, tokenizer, ids = text_ids(playground, body, {
        "position": (None, int, lambda v: v >= 0, "a token's index, or null for the last"),
        "pattern": (None, list, lambda v: len(v) == 2 and all(isinstance(i, int) for i in v),
                    "[layer, head], or null"),
    })
    config = model.config
    position = len(ids) - 1 if values["position"] is None else values["position"]
    if position >= len(ids):
        raise RequestError(f"position must be a token's index, 0 to {len(ids) - 1}, got {position}")
    with torch.inference_mode():
        seen = inside(model, torch.tensor([ids], device=playground.device))
        lens = logit_lens(model, seen["residual"], position, TOP)
    layers = []
    for layer, probs in enumerate(seen["attention"]):
        heads = []
        for head, stats in enumerate(head_stats(probs)):
            local = head < seen["local"][layer]
            heads.append({"head": head, "type": "local" if local else "global",
                          "window": config.window_size if local else None,
                          "weights": probs[head, position, :position + 1].tolist(), **stats})
        layers.append({"layer": layer, "heads": heads})
    reply = {"model": values["model"], "position": position,
             "tokens": token_list(tokenizer, ids), "layers": layers,
             "lens": [{"layer": "embedding" if k == 0 else "output" if k == config.n_layer else k - 1,
                       "top": [[tokenizer.decode([i]), p, i] for i, p in top]} for k, top in enumerate(lens)],
             "neurons": {"layers": config.n_layer, "per_layer": seen["neurons"][0].size(1)}}
    if values["pattern"] is not None:
        layer, head = values["pattern"]
        if not (0 <= layer < config.n_layer and 0 <= head < config.n_head):
            raise RequestError(f"pattern must be [layer, head] with layer 0 to {config.n_layer - 1} and head 0 to "
                                f"{config.n_head - 1}, got {values['pattern']}")
        probs = seen["attention"][layer][head]
        reply["pattern"] = {"layer": layer, "head": head,
                            "weights": [probs[t, :t + 1].tolist() for t in range(len(ids))]}
    return reply


def neuron_request(playground, body: dict) -> dict:
    """One MLP neuron's activation on every token of the text, and the held-out contexts that excite it most
    (their state while they are computed)."""
    values, model, tokenizer, ids = text_ids(playground, body, {
        "layer": (0, int, lambda v: v >= 0, "a layer's index"),
        "index": (0, int, lambda v: v >= 0, "a neuron's index in the layer's MLP"),
    })
    layer, index = values["layer"], values["index"]
    with torch.inference_mode():
        seen = inside(model, torch.tensor([ids], device=playground.device))
    if layer >= model.config.n_layer or index >= seen["neurons"][0].size(1):
        raise RequestError(f"the model has layers 0 to {model.config.n_layer - 1} and neurons 0 to "
                            f"{seen['neurons'][0].size(1) - 1} in each; got layer {layer}, index {index}")
    return {"model": values["model"], "layer": layer, "index": index,
            "tokens": token_list(tokenizer, ids),
            "activations": seen["neurons"][layer][:, index].tolist(),
            "top": top_contexts(playground, values["model"], layer, index)}


def top_contexts(playground, name: str, layer: int, index: int) -> dict:
    """The --neuron_stories contexts where the neuron fires most: {"state": "none"} without that file,
    "computing" with progress (the first request starts it), then "ready" with the contexts."""
    if playground.neuron_stories is None:
        return {"state": "none", "why": "start the server with --neuron_stories FILE to find the held-out contexts "
                                        "that excite each neuron most"}
    with playground.lock:
        index_of = playground.neuron_index.get(name)
        if index_of is None:
            index_of = playground.neuron_index[name] = {"state": "computing", "done": 0, "of": 0}
            thread = threading.Thread(target=build_neuron_index, args=(playground, name, index_of), daemon=True)
            playground.workers.add(thread)  # stop() waits for it: a thread killed inside PyTorch aborts the process
            thread.start()
    if index_of["state"] != "ready":
        return {k: v for k, v in index_of.items() if k in ("state", "done", "of", "why")}
    model, tokenizer = playground.model(name)
    contexts = []
    for value, (story, position) in zip(index_of["values"][layer][index].tolist(),
                                        index_of["where"][layer][index].tolist()):
        if value == float("-inf"):
            break
        tokens = index_of["stories"][story]
        contexts.append({"before": tokenizer.decode(tokens[max(0, position - AROUND):position]),
                         "token": tokenizer.decode([tokens[position]]),
                         "after": tokenizer.decode(tokens[position + 1:position + 4]), "activation": value})
    return {"state": "ready", "stories": len(index_of["stories"]), "contexts": contexts}


def build_neuron_index(playground, name: str, index_of: dict):
    """Every neuron's top activations over --neuron_stories (up to MAX_NEURON_TOKENS tokens, each story cut to
    the model's context), kept in index_of; progress in index_of["done"] of index_of["of"] stories."""
    try:
        model, tokenizer = playground.model(name)
        context, stories, total = model.config.max_position_embeddings, [], 0
        for story in non_empty(read_stories([playground.neuron_stories]), {}):
            stories.append(tokenizer.encode(story)[:context])
            total += len(stories[-1])
            if total >= MAX_NEURON_TOKENS:
                break
        if not stories:
            index_of.update(state="failed", why=f"--neuron_stories {playground.neuron_stories} holds no stories")
            return
        index_of["of"] = len(stories)
        values = where = None
        for s, tokens in enumerate(stories):
            if playground.stopping.is_set():
                return
            with torch.inference_mode():
                neurons = torch.stack(inside(model, torch.tensor([tokens], device=playground.device))["neurons"])
            acts = neurons.float().transpose(1, 2).cpu()  # (layers, T, inner) -> (layers, inner, T)
            spots = torch.stack([torch.full_like(acts, s), torch.arange(len(tokens)).expand_as(acts)], -1)
            if values is not None:
                acts, spots = torch.cat([values, acts], -1), torch.cat([where, spots], -2)
            best = acts.topk(min(TOP_CONTEXTS, acts.size(-1)), dim=-1)
            values, where = best.values, spots.gather(-2, best.indices[..., None].expand(*best.indices.shape, 2))
            index_of["done"] = s + 1
        index_of.update(state="ready", values=values, where=where.long(), stories=stories)
    except Exception as e:  # the page shows it; the server goes on
        index_of.update(state="failed", why=f"{type(e).__name__}: {e}")
