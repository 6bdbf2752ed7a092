"""Multi-prompt seq2seq-lm (tiny T5): two PEFT-written adapters of different encoders and lengths in ONE pair of
encoder/decoder graphs, picked per row by ``prompt_ids``.

Each row of a mixed, right-padded batch must generate what PEFT's own ``generate`` gives for that row and adapter,
and what that adapter's single export gives; rows given the other adapter's id must not.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MODELS, make_peft_adapter

# name -> (encoder, num_virtual_tokens, seed): the 3-token prompt sits in the last 3 of 5 padded slots
ADAPTERS = {"summ": ("MLP", 5, 0), "qa": ("LSTM", 3, 1)}
NEW = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The PEFT models, their multi-prompt export (parity verified) and each adapter's single export."""
    from ptuning_onnx.export import export
    from ptuning_onnx.export.multi import export_multi

    root = tmp_path_factory.mktemp("multi-t5")
    peft, adapters = {}, {}
    for name, (encoder, n, seed) in ADAPTERS.items():
        peft[name], adapters[name] = make_peft_adapter(root / name, MODELS / "t5", "SEQ_2_SEQ_LM",
                                                       "AutoModelForSeq2SeqLM", encoder=encoder,
                                                       num_virtual_tokens=n, seed=seed)
    multi = export_multi(MODELS / "t5", adapters, root / "multi", progress=False)
    singles = {name: export(MODELS / "t5", path, root / f"single-{name}", progress=False, skip_verify=True).path
               for name, path in adapters.items()}
    return {"peft": peft, "adapters": adapters, "multi": multi, "singles": singles}


def _mixed(rows=4, length=7, seed=0):
    """Right-padded ids/mask: rows 2.. keep 4 and 2 real tokens; adapter names in turn."""
    ids = np.random.default_rng(seed).integers(5, 1000, (rows, length))
    mask = np.ones_like(ids)
    for row, real in zip(range(2, rows), (4, 2), strict=False):
        ids[row, real:], mask[row, real:] = 0, 0
    return ids, mask, [list(ADAPTERS)[r % 2] for r in range(rows)]


def test_manifest_graphs_and_parity(built):
    from ptuning_onnx import manifest as mf

    manifest = mf.read_manifest(built["multi"].path)
    assert {k: (v["id"], v["num_virtual_tokens"]) for k, v in manifest["adapters"].items()} == {"summ": (0, 5),
                                                                                                "qa": (1, 3)}
    assert manifest["num_virtual_tokens"] == 5 and manifest["prompt_input"] == "prompt_ids"
    for graph in ("encoder_model", "decoder_model"):
        assert "prompt_ids" in [i["name"] for i in manifest["graphs"][graph]["inputs"]]
    report = manifest["parity"]
    assert report["passed"] and report["greedy_tokens_equal"] and set(report["adapters"]) == set(ADAPTERS)
    assert set(report["max_abs_diff"]) == {"last_hidden_state", "logits", "greedy_logits"}
    assert max(report["max_abs_diff"].values()) <= 1e-4
    assert report["negative_control"]["min_row_max_abs_diff"] > 100 * 1e-4
    assert manifest["golden"]["greedy_steps"] == 8


def test_golden_checks_the_folder_without_torch(built):
    from ptuning_onnx.runtime.golden import verify_golden

    report = verify_golden(built["multi"].path)
    assert report["passed"] and report["token_agreement"] == 1.0
    assert report["negative_control"]["failed_as_expected"]


def test_rows_equal_peft_generate_and_their_single_exports(built):
    """A mixed, right-padded batch: each row's greedy tokens equal PEFT's ``generate`` on that row with its adapter
    (the start token dropped, pad after EOS) and that adapter's single export; the wrong ids give other logits."""
    import torch

    from ptuning_onnx import runtime

    multi = runtime.load(built["multi"].path)
    singles = {name: runtime.load(path) for name, path in built["singles"].items()}
    ids, mask, names = _mixed()
    tokens = multi.generate(input_ids=ids, attention_mask=mask, adapters=names, max_new_tokens=NEW)
    swapped = [{"summ": "qa", "qa": "summ"}[n] for n in names]
    assert not np.array_equal(tokens, multi.generate(input_ids=ids, attention_mask=mask, adapters=swapped,
                                                     max_new_tokens=NEW))
    for row, name in enumerate(names):
        alone = ids[row:row + 1, mask[row] == 1]
        np.testing.assert_array_equal(tokens[row], singles[name].generate(input_ids=alone, max_new_tokens=NEW)[0])
        with torch.no_grad():
            want = built["peft"][name].generate(input_ids=torch.from_numpy(alone),
                                                attention_mask=torch.ones(alone.shape, dtype=torch.long),
                                                max_new_tokens=NEW, do_sample=False)[0, 1:].numpy()
        want = np.pad(want, (0, NEW - len(want)), constant_values=multi.pad_token_id)
        np.testing.assert_array_equal(tokens[row], want)
    with pytest.raises(Exception, match=r"unknown adapter\(s\) 'nope'.*holds: summ, qa"):
        multi.generate(input_ids=ids, adapter="nope", max_new_tokens=2)


def test_parity_gate_fails_when_adapters_are_swapped(built):
    from ptuning_onnx import manifest as mf
    from ptuning_onnx.errors import ParityError
    from ptuning_onnx.export.multi import load_references
    from ptuning_onnx.parity_multi import check_multi

    refs, _ = load_references(MODELS / "t5", built["adapters"])
    swapped = {"summ": refs["qa"], "qa": refs["summ"]}
    with pytest.raises(ParityError, match="differs from its adapter alone") as info:
        check_multi(built["multi"].path, swapped, mf.read_manifest(built["multi"].path))
    assert info.value.report["max_abs_diff"]["logits"] > 1e-2


def test_real_slots_last_is_what_keeps_t5_exact(built):
    """Why a shorter prompt fills the END of the padded slots: T5's attention sees relative positions, so the
    3-token prompt at slots 2..4 is as far from the user's tokens as in its single export; at slots 0..2 it is not."""
    import torch

    from ptuning_onnx.export.multi import load_references
    from ptuning_onnx.export.multi_seq2seq import MultiSeq2SeqEncoderGraph
    from ptuning_onnx.export.prompt_tables import register_prompts

    refs, _ = load_references(MODELS / "t5", built["adapters"])
    graph = MultiSeq2SeqEncoderGraph(list(refs.values())).eval()
    ids = torch.randint(5, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    ones, qa = torch.ones_like(ids), torch.tensor([1])
    with torch.no_grad():
        want = refs["qa"](ids, ones, decoder_input_ids=ids[:, :1]).encoder_last_hidden_state
        assert (graph(ids, ones, qa)[:, graph.n:] - want).abs().max() <= 1e-5
        register_prompts(graph, list(refs.values()), real_last=False)
        assert (graph(ids, ones, qa)[:, graph.n:] - want).abs().max() > 1e-3


def test_service_batches_seq2seq_rows_of_both_adapters(built):
    """The service's seq2seq path (in process): concurrent requests of both adapters, batched together, each
    answer equal to the runtime's for that adapter; the other adapter's answer differs somewhere."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from ptuning_onnx import runtime
    from ptuning_onnx.serve import ServeConfig, create_app

    oracle = runtime.load(built["multi"].path)
    ids, mask, names = _mixed()
    rows = [ids[r, mask[r] == 1].tolist() for r in range(len(ids))]
    app, _ = create_app(ServeConfig(built["multi"].path, threads=1, max_batch_size=8, max_wait_ms=300))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        with ThreadPoolExecutor(len(rows)) as pool:
            answers = list(pool.map(lambda job: client.post("/v1/generate", json={
                "input_ids": [job[0]], "adapter": job[1], "max_new_tokens": NEW}), zip(rows, names, strict=True)))
        unknown = client.post("/v1/generate", json={"input_ids": [rows[0]], "adapter": "nope", "max_new_tokens": 2})
    assert unknown.status_code == 400 and "summ, qa" in unknown.text
    got = [a.json()["outputs"][0]["token_ids"] for a in answers]
    for row, (ids_row, name) in enumerate(zip(rows, names, strict=True)):
        want = oracle.generate(input_ids=np.array([ids_row]), adapter=name, max_new_tokens=NEW)[0]
        assert got[row] == want.tolist()  # no EOS within NEW steps on these rows
    other = [oracle.generate(input_ids=np.array([r]), adapter={"summ": "qa", "qa": "summ"}[n], max_new_tokens=NEW)[0]
             for r, n in zip(rows, names, strict=True)]
    # greedy tokens of the random tiny T5 repeat one id, which two prompts can share on a row: some row differs
    assert any(g != o.tolist() for g, o in zip(got, other, strict=True))


def test_int8_folder_passes_the_quantized_gate_per_adapter(built, tmp_path):
    """--quantize int8: the quantized gate per adapter (the graphs seen as each adapter's single export: the encoder
    states cut to its real slots), and golden.npz checks it without torch."""
    from ptuning_onnx.export.multi import export_multi
    from ptuning_onnx.runtime.golden import verify_golden

    result = export_multi(MODELS / "t5", built["adapters"], tmp_path / "int8", quantize="int8", progress=False)
    assert result.report["gate"] == "quantized" and set(result.report["adapters"]) == set(ADAPTERS)
    assert result.report["negative_control"]["failed_as_expected"]
    assert verify_golden(result.path)["passed"]
