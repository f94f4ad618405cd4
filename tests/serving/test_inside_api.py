"""inside_api.py: the playground's POST /api/inside and /api/neuron on a real server, against transformers'
output_attentions and the model's own MLP, and each mistake as one sentence."""

import time

import pytest
import torch

from helpers import make_stories, small_gpt_neo, write_txt
from tinylm.data.tokenizer import gpt_neo_tokenizer
from test_playground import request, serving


@pytest.fixture(scope="module")
def local_and_global(tmp_path_factory):
    """A saved GPT-Neo with a global and a local layer (window 6), and transformers' copy of it."""
    folder = tmp_path_factory.mktemp("inside_model")
    hf = small_gpt_neo(context=64, window=6)
    hf.save_pretrained(folder)
    stories = write_txt(folder / "held_out.txt", make_stories(30, 3))
    return str(folder), hf, stories


@pytest.fixture
def server(local_and_global):
    folder, _, stories = local_and_global
    with serving([folder], max_prompt_chars=400, neuron_stories=stories) as running:
        yield running


TEXT = "Once upon a time, Lily found a red ball in the park. She kicked it to Tom, and Tom laughed."


def test_the_weights_are_transformers_output_attentions(server, local_and_global):
    folder, hf, _ = local_and_global
    ids = gpt_neo_tokenizer().encode(TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True).attentions
    position = len(ids) - 3
    status, seen = request(server, "POST", "/api/inside", {"ids": ids, "position": position, "pattern": [1, 2]})
    assert status == 200 and seen["position"] == position and len(seen["tokens"]) == len(ids)
    for layer in seen["layers"]:
        for head in layer["heads"]:
            row = torch.tensor(head["weights"])
            torch.testing.assert_close(row, ref[layer["layer"]][0, head["head"], position, :position + 1], rtol=0,
                                       atol=1e-5)
            assert abs(row.sum().item() - 1) < 1e-5
            assert head["type"] == ("local" if layer["layer"] == 1 else "global")
            if head["type"] == "local":  # zero outside the window of 6, which the page draws
                assert head["window"] == 6 and (row[:position - 5] == 0).all() and (row[position - 5:] > 0).all()
    pattern = seen["pattern"]["weights"]  # layer 1, head 2: every row
    assert len(pattern) == len(ids) and all(len(r) == t + 1 for t, r in enumerate(pattern))
    torch.testing.assert_close(torch.tensor(pattern[-1]), ref[1][0, 2, -1], rtol=0, atol=1e-5)


def test_the_logit_lens_ends_with_the_real_output(server, local_and_global):
    _, hf, _ = local_and_global
    status, seen = request(server, "POST", "/api/inside", {"text": TEXT})
    ids = [t["id"] for t in seen["tokens"]]
    with torch.no_grad():
        best = hf(torch.tensor([ids])).logits[0, -1].softmax(-1).topk(5)
    lens = seen["lens"]
    assert status == 200 and [k["layer"] for k in lens] == ["embedding", 0, "output"]
    assert [i for _, _, i in lens[-1]["top"]] == best.indices.tolist()


def test_a_neurons_activations_and_its_top_contexts(server, local_and_global):
    _, hf, _ = local_and_global
    ids = gpt_neo_tokenizer().encode(TEXT)
    hooked = {}
    handle = hf.transformer.h[0].mlp.c_proj.register_forward_hook(lambda m, args, out: hooked.update(x=args[0]))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    handle.remove()
    status, seen = request(server, "POST", "/api/neuron", {"ids": ids, "layer": 0, "index": 17})
    assert status == 200
    torch.testing.assert_close(torch.tensor(seen["activations"]), hooked["x"][0, :, 17], rtol=0, atol=1e-5)
    deadline = time.monotonic() + 120  # the top contexts: computing, with progress, then kept
    while seen["top"]["state"] == "computing" and time.monotonic() < deadline:
        assert 0 <= seen["top"]["done"] <= seen["top"]["of"]
        time.sleep(0.1)
        seen = request(server, "POST", "/api/neuron", {"ids": ids, "layer": 0, "index": 17})[1]
    top = seen["top"]
    assert top["state"] == "ready" and top["stories"] == 30 and len(top["contexts"]) == 8
    values = [c["activation"] for c in top["contexts"]]
    assert values == sorted(values, reverse=True) and values[0] >= max(seen["activations"]) - 10


@pytest.mark.parametrize("body, sentence", [
    ({}, "give the text to look inside as text or as ids"),
    ({"text": "x" * 401}, "text is 401 characters; this server takes at most 400 (--max_prompt_chars)"),
    ({"ids": list(range(65))}, "the text is 65 tokens and the model's context is 64: shorten it to at most 64"),
    ({"ids": [1, 2], "position": 2}, "position must be a token's index, 0 to 1, got 2"),
    ({"ids": [1, 2], "pattern": [2, 0]}, "pattern must be [layer, head] with layer 0 to 1 and head 0 to 3"),
    ({"ids": [1, 2], "colour": "red"}, "unknown field 'colour'"),
])
def test_a_bad_inside_request_is_400_with_one_sentence(server, body, sentence):
    status, reply = request(server, "POST", "/api/inside", body)
    assert status == 400 and reply["error"].startswith(sentence), reply


def test_a_bad_neuron_request_is_400_with_one_sentence(server):
    status, reply = request(server, "POST", "/api/neuron", {"text": "Once", "layer": 2, "index": 0})
    assert status == 400 and reply["error"] == "the model has layers 0 to 1 and neurons 0 to 127 in each; got " \
                                              "layer 2, index 0"


def test_a_neuron_stories_file_without_stories_is_said_on_the_page(local_and_global, tmp_path):
    folder, _, _ = local_and_global
    (tmp_path / "empty.txt").write_text("<|endoftext|>\n")
    with serving([folder], neuron_stories=str(tmp_path / "empty.txt")) as running:
        deadline, top = time.monotonic() + 60, {"state": "computing"}
        while top["state"] == "computing" and time.monotonic() < deadline:
            status, seen = request(running, "POST", "/api/neuron", {"text": "Once upon a time", "layer": 0, "index": 1})
            assert status == 200
            top = seen["top"]
            time.sleep(0.05)
        assert top["state"] == "failed" and top["why"] == f"--neuron_stories {tmp_path / 'empty.txt'} holds no stories"
