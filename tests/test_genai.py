"""onnxruntime-genai runs our causal-lm folders through the ``genai_config.json`` every export writes.

Real parts: PEFT-written adapters on the tiny GPT-2 and Llama of models/, our export with parity, genai's own
``Generator`` on the folder, our runtime on the same folder. Skipped where onnxruntime-genai is absent (the ``test``
extra brings it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MODELS, make_peft_adapter

og = pytest.importorskip("onnxruntime_genai")

NEW = 12


@pytest.fixture(scope="module", params=[("gpt2", "MLP"), ("llama", "LSTM")], ids=["gpt2", "llama"])
def folder(request, tmp_path_factory):
    from ptuning_onnx.export import export

    name, encoder = request.param
    root = tmp_path_factory.mktemp(f"genai-{name}")
    make_peft_adapter(root / "adapter", MODELS / name, "CAUSAL_LM", "AutoModelForCausalLM", encoder=encoder)
    return export(MODELS / name, root / "adapter", root / "onnx", progress=False).path


def _batch(rows=3, length=7, seed=3):
    """Unpadded rows of random ids, away from the special tokens."""
    return np.random.default_rng(seed).integers(5, 1000, (rows, length))


def _genai_greedy(folder, ids):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    # min_length = max_length: EOS cannot end a row early, as eos_token_id=[] in our runtime.
    params.set_search_options(max_length=ids.shape[1] + NEW, min_length=ids.shape[1] + NEW,
                              batch_size=ids.shape[0], do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))  # genai masks the pad id itself
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(np.array(generator.get_next_tokens(), np.int64))
    return np.stack(tokens, 1)


def test_genai_config_is_written_and_hashed(folder):
    from ptuning_onnx import manifest as mf

    manifest = mf.read_manifest(folder)  # re-hashes every listed file, genai_config.json included
    assert manifest["files"]["genai_config.json"] == mf.sha256_file(folder / "genai_config.json")
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["context_length"] == manifest["model"]["max_user_tokens"]
    past = next(i for i in manifest["graphs"]["model"]["inputs"] if i["name"] == "past_key_values.0.key")
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (past["shape"][1], past["shape"][3])


@pytest.mark.parametrize("rows,length", [(3, 7), (1, 1), (1, 33)])
def test_genai_greedy_tokens_equal_our_runtime(folder, rows, length):
    """Unpadded batches only: with onnxruntime-genai 0.13.2, padded rows (left or right, the pad id in the ids)
    did not give each row's tokens alone on these models, so a genai user sends rows of one length
    (docs/FORMAT.md)."""
    from ptuning_onnx import runtime

    ids = _batch(rows, length)
    genai = _genai_greedy(folder, ids)
    ours = runtime.load(folder).generate(input_ids=ids, max_new_tokens=NEW, eos_token_id=[])
    assert genai.shape == ours.shape == (rows, NEW)
    np.testing.assert_array_equal(genai, ours)


def _genai_first_logits(folder, ids):
    """genai's logits (B, V) for the token after ``ids``: the prefill's last position."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 1, batch_size=ids.shape[0], do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    return np.asarray(generator.get_logits(), np.float32).reshape(ids.shape[0], -1)


def test_genai_logits_match_and_see_the_prompt(folder):
    """genai's prefill logits equal our graph's within the fp32 gate (1e-4); the negative control: the base model
    WITHOUT the prompt (transformers) is far outside it, so genai really ran the prompt (greedy tokens alone are a
    weak control here: the random tiny GPT-2 repeats one token with or without the prompt)."""
    import torch
    import transformers

    from ptuning_onnx import runtime

    ids = _batch(3, 7)
    genai = _genai_first_logits(folder, ids)
    ours = runtime.load(folder).forward(input_ids=ids)["logits"][:, -1]
    assert np.abs(genai - ours).max() <= 1e-4
    name = json.loads((folder / "config.json").read_text())["model_type"]
    base = transformers.AutoModelForCausalLM.from_pretrained(MODELS / name).eval()
    with torch.no_grad():
        bare = base(torch.from_numpy(ids)).logits[:, -1].numpy()
    assert np.abs(genai - bare).max() > 100 * 1e-4


def test_genai_config_refuses_other_tasks():
    from ptuning_onnx.export.genai import genai_config

    with pytest.raises(ValueError, match="causal-lm"):
        genai_config({"task": "seq-cls", "graphs": {}, "model": {}}, {})


def test_genai_runs_a_multi_prompt_folder_with_prompt_ids(tmp_path):
    """A multi-prompt folder: genai feeds ``prompt_ids`` through ``set_model_input``; its tokens and prefill logits
    equal our runtime's per row, and the same rows with rotated ids give other logits (the negative control)."""
    from ptuning_onnx import runtime
    from ptuning_onnx.export.multi import export_multi

    adapters = {}
    for name, encoder, n, seed in (("a", "MLP", 5, 0), ("b", "LSTM", 3, 1)):
        make_peft_adapter(tmp_path / name, MODELS / "llama", "CAUSAL_LM", "AutoModelForCausalLM", encoder=encoder,
                          num_virtual_tokens=n, seed=seed)
        adapters[name] = tmp_path / name
    folder = export_multi(MODELS / "llama", adapters, tmp_path / "multi", progress=False).path
    assert (folder / "genai_config.json").is_file()
    ids, prompt_ids = _batch(4, 7), np.array([0, 1, 1, 0], np.int64)

    def genai(ids, prompt_ids, new):
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new,
                                  batch_size=ids.shape[0], do_sample=False)
        generator = og.Generator(model, params)
        generator.set_model_input("prompt_ids", prompt_ids)
        generator.append_tokens(ids.astype(np.int32))
        first = np.asarray(generator.get_logits(), np.float32).reshape(ids.shape[0], -1)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(np.array(generator.get_next_tokens(), np.int64))
        return first, np.stack(tokens, 1)

    ours = runtime.load(folder)
    names = [["a", "b"][p] for p in prompt_ids]
    first, tokens = genai(ids, prompt_ids, NEW)
    np.testing.assert_array_equal(tokens, ours.generate(input_ids=ids, adapters=names, max_new_tokens=NEW,
                                                        eos_token_id=[]))
    want = ours.forward(ids, adapters=names)["logits"][:, -1]
    assert np.abs(first - want).max() <= 1e-4
    rotated, _ = genai(ids, 1 - prompt_ids, 1)
    assert np.abs(rotated - want).max() > 100 * 1e-4
