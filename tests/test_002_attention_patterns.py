"""002: depth band, token labels, masses by type, patterns vs HF eager attention (GQA), batching with padding,
each self-check failing under an injected fault, end to end."""
import importlib
import importlib.util
import json
from fractions import Fraction
from functools import partial

import pytest
import torch

from common import attention as att
from common.errors import LabError
from conftest import ARCHITECTURES, REPO, assert_fails_cleanly, run_folders, run_script

SCRIPT = "002_attention_patterns/run.py"
N_FACTS = 3  # facts of 001's fact set added to the default prompts in the default run (60 in a real run)
LONG_PROMPT = ("The capital of France is Paris, and the capital of Germany is Berlin. " * 5).strip()  # > 64 tokens


# ----------------------------------------------------------------------------- depth band


@pytest.mark.parametrize("n_layers, expected", [
    (30, list(range(11, 25))),  # block depths 12/30 = 0.40 ... 25/30 = 0.833
    (32, list(range(12, 27))),  # 13/32 = 0.406 ... 27/32 = 0.844
    (36, list(range(14, 30))),  # 15/36 = 0.417 ... 30/36 = 0.833
    (42, list(range(16, 35))),  # 17/42 = 0.405 ... 35/42 = 0.833
])
def test_depth_band_selects_the_right_layers(n_layers, expected):
    assert att.band_layers(n_layers, (0.40, 0.85)) == expected
    # The same band in exact rational arithmetic: block i is in when 2/5 <= (i + 1) / n <= 17/20.
    exact = [i for i in range(n_layers) if Fraction(2, 5) <= Fraction(i + 1, n_layers) <= Fraction(17, 20)]
    assert att.band_layers(n_layers, [0.4, 0.85]) == exact


def test_depth_band_edges_and_bad_ranges():
    assert att.band_layers(20, (0.85, 0.85)) == [16]  # 17/20 exactly, despite 0.85 * 20 = 17.000000000000004
    assert att.band_layers(4, (0.0, 1.0)) == [0, 1, 2, 3]
    for bad in [(0.9, 0.1), (0.4,), (-0.1, 0.5), (0.2, 1.5), ("a", "b"), 0.5, (True, 1.0)]:
        with pytest.raises(LabError, match="DEPTH_RANGE must be"):
            att.band_layers(30, bad)
    with pytest.raises(LabError, match="holds no layer"):
        att.band_layers(4, (0.3, 0.45))


def test_sliding_window_layers_come_from_the_hf_config():
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config
    assert att.sliding_window_layers(LlamaConfig(num_hidden_layers=4)) == {}
    assert att.sliding_window_layers(MistralConfig(num_hidden_layers=3, sliding_window=4096)) == {
        0: 4096, 1: 4096, 2: 4096}
    assert att.sliding_window_layers(MistralConfig(num_hidden_layers=3, sliding_window=None)) == {}
    assert att.sliding_window_layers(Qwen3Config(num_hidden_layers=4)) == {}  # use_sliding_window False
    assert att.sliding_window_layers(Gemma2Config(num_hidden_layers=4, sliding_window=64)) == {0: 64, 2: 64}
    gemma3 = att.sliding_window_layers(Gemma3TextConfig(num_hidden_layers=12, sliding_window=512))
    assert sorted(set(range(12)) - set(gemma3)) == [5, 11]  # every 6th layer is global


# ----------------------------------------------------------------------------- grouped-query attention


def test_kv_head_mapping_matches_hf_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv
    assert [att.kv_head_of(h, 32, 8) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [att.kv_head_of(h, 9, 3) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [att.kv_head_of(h, 4, 4) for h in range(4)] == [0, 1, 2, 3]
    kv = torch.randn(2, 8, 5, 16)  # [batch, kv heads, seq, d]
    repeated = repeat_kv(kv, 4)  # [batch, 32 query heads, seq, d], as HF gives each query head its kv head
    assert all(torch.equal(repeated[:, h], kv[:, att.kv_head_of(h, 32, 8)]) for h in range(32))
    with pytest.raises(ValueError):
        att.kv_head_of(0, 9, 4)


# ----------------------------------------------------------------------------- token types


def _labels(tokenizer, text, hand=None):
    ids = tokenizer(text).input_ids
    _, offsets = att.token_offsets(tokenizer, text, ids)
    special = [i in set(tokenizer.all_special_ids) for i in ids]
    return [tokenizer.decode([i]) for i in ids], *att.label_prompt(text, offsets, special, hand)


def test_rule_labels_on_the_embedded_tokenizer(embedded):
    tok = embedded.tokenizer
    tokens, types, subject = _labels(tok, "The first president of the United States was George")
    assert types == ["function", "relation", "relation", "function", "function", "entity", "entity",
                     "function", "entity"]
    assert subject == [5, 6]  # the entity tokens, without the final position
    tokens, types, _ = _labels(tok, "Romeo and Juliet was written by William")
    assert tokens[:2] == ["Rome", "o"] and types[:2] == ["entity", "entity"]  # both pieces of the word
    tokens, types, _ = _labels(tok, "France's capital city is:\n")
    assert dict(zip(tokens, types))["'s"] == "function"
    assert types[-1] == "punctuation" and dict(zip(tokens, types)).get(":") in (None, "punctuation")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    tokens, types, _ = _labels(tok, chat)
    assert types[tokens.index("<|im_start|>")] == "special"


def test_hand_labels_override_the_rule(embedded):
    tok = embedded.tokenizer
    tokens, types, subject = _labels(tok, "The element gold has the chemical symbol",
                                     {"subject": "gold", "types": {"symbol": "function"}})
    assert tokens[subject[0]] == " gold" and len(subject) == 1 and types[subject[0]] == "entity"
    assert types[-1] == "function"
    _, types, subject = _labels(tok, "The play Romeo and Juliet is by William", {"subject": "Romeo and Juliet"})
    assert subject == [2, 3, 4] and all(types[i] == "entity" for i in subject)
    for hand, fragment in [({"subject": "Paris"}, "does not occur"), ({"types": {"gold": "noun"}}, "must map"),
                           ({"types": {"silver": "entity"}}, "not words of the prompt"), ({"subject": 3}, "subject")]:
        with pytest.raises(LabError, match=fragment):
            att.check_hand_labels(hand, "The element gold has the chemical symbol", "entry 0")


def test_offsets_from_decoding_agree_with_the_fast_tokenizer(embedded):
    tok = embedded.tokenizer
    text = "The capital of France, a country, is"
    ids = tok(text).input_ids
    decoded, offsets = att.offsets_from_decoding(tok, ids)
    assert decoded == text and offsets == att.token_offsets(tok, text, ids)[1]


# ----------------------------------------------------------------------------- masses and ranking


def test_masses_by_bucket_sum_to_one_and_match_a_loop():
    torch.manual_seed(0)
    rows = torch.randn(3, 4, 6).softmax(-1)  # [blocks, heads, seq]
    types = ["function", "relation", "entity", "punctuation", "special", "function"]
    for include_bos in (False, True):
        buckets = att.bucket_index(types, include_bos)
        mass = att.mass_by_bucket(rows, buckets)
        assert torch.allclose(mass.sum(-1), torch.ones(3, 4))
        for k, name in enumerate(att.BUCKETS):
            positions = [i for i, t in enumerate(types) if (t == name and (include_bos or i > 0))
                         or (name == att.SINK and i == 0 and not include_bos)]
            assert torch.allclose(mass[..., k], att.mass_on(rows, positions))
    assert att.counted_positions([0, 2], include_bos=False) == [2]
    assert att.counted_positions([0, 2], include_bos=True) == [0, 2]
    assert torch.equal(att.mass_on(rows, []), torch.zeros(3, 4))


def test_final_position_attention_reads_the_last_row():
    pattern = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]).expand(2, 4, 3, 3)  # [blocks, heads, 3, 3]
    seen = att.FinalPositionAttention.of(pattern, att.bucket_index(["entity", "relation", "function"], False), [1])
    assert seen.by_bucket[0, 0].tolist() == pytest.approx([0.2, 0, 0, 0.3, 0.5, 0])  # sink, special, entity, ...
    assert (seen.subject.unique().tolist(), seen.sink.unique().tolist()) == ([pytest.approx(0.3)], [pytest.approx(0.2)])
    assert seen.previous.unique().tolist() == [pytest.approx(0.3)] and seen.itself.unique().tolist() == [0.5]


def test_rank_heads_mean_and_consistency():
    mass = torch.tensor([[[0.9, 0.1], [0.5, 0.0]],  # prompt 0: [blocks=2, heads=2]
                         [[0.7, 0.3], [0.6, 0.0]],
                         [[0.0, 0.0], [0.0, 1.0]]])  # prompt 2 has no subject: left out
    band = att.Band(layers=[5, 6], n_layers=8, n_heads=2, n_kv_heads=1, local_windows={})
    ranking = att.rank_heads(mass, torch.tensor([True, True, False]), 1, band)
    assert [(r.layer, r.head, r.kv_head) for r in ranking] == [(5, 0, 0), (6, 0, 0), (5, 1, 0), (6, 1, 0)]
    assert ranking[0].mean == pytest.approx(0.8) and ranking[0].std == pytest.approx(0.1)
    assert ranking[0].min == pytest.approx(0.7) and ranking[0].top_rate == 1.0
    assert ranking[1].top_rate == 0.0
    assert set(ranking[0].as_record()) == {"layer", "head", "kv_head", "mean", "std", "min", "top_rate",
                                           "subject_mass", "in_top_k"}
    # The intervals are over the two prompts with a subject, and bracket the mean and the share.
    best = ranking[0]
    assert best.subject_mass["n"] == 2 and best.subject_mass["value"] == pytest.approx(0.8)
    assert best.subject_mass["ci95"][0] == pytest.approx(0.7) and best.subject_mass["ci95"][1] == pytest.approx(0.9)
    assert best.in_top_k == {"value": 1.0, "ci95": [1.0, 1.0], "n": 2, "n_none": 0}
    assert ranking[2].in_top_k["value"] == 0.0 and ranking[2].subject_mass["ci95"][1] == pytest.approx(0.3)
    assert att.rank_heads(mass, torch.tensor([False, False, False]), 1, band) == []


def test_fact_set_prompts_take_relations_in_turn():
    facts_file = REPO / "001_layers_and_logits" / "prompts.json"
    facts = json.loads(facts_file.read_text())
    relations = list(dict.fromkeys(f["relation"] for f in facts))
    prompts = att.fact_set_prompts(facts_file, len(relations) + 1)
    assert [p.extra["relation"] for p in prompts] == relations + [relations[0]]  # one each, then round two
    assert prompts[-1].fact_id == [f["id"] for f in facts if f["relation"] == relations[0]][1]
    for prompt in prompts:
        fact = next(f for f in facts if f["id"] == prompt.fact_id)
        assert prompt.text == fact["completions"][0] and prompt.target == fact["target"]
        assert prompt.extra["subject"].lower() == fact["subject"].lower() and prompt.extra["subject"] in prompt.text
    skipped = att.fact_set_prompts(facts_file, 2, skip_ids={prompts[0].fact_id})
    assert prompts[0].fact_id not in {p.fact_id for p in skipped} and len(skipped) == 2
    assert att.fact_set_prompts(facts_file, 0) == []
    for bad in (-1, 2.5, True):
        with pytest.raises(LabError, match="FACTS must be"):
            att.fact_set_prompts(facts_file, bad)


def test_batches_by_length_and_right_padding():
    assert att.batches_by_length([5, 9, 4, 5], 2) == [[2, 0], [3, 1]]
    assert att.batches_by_length([3, 3], 5) == [[0, 1]]
    ids, mask = att.pad_right([torch.tensor([7, 8, 9]), torch.tensor([4])])
    assert ids.tolist() == [[7, 8, 9], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------------- patterns on tiny models


def _capture_qk(arch):
    """Wrap the HF module's eager attention to record query, key, mask, scaling and softcap per call."""
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    original, calls = module.eager_attention_forward, []

    def recording(attn, query, key, value, attention_mask, **kwargs):
        calls.append({"query": query.detach(), "key": key.detach(), "mask": attention_mask,
                      "scaling": kwargs.get("scaling"), "softcap": kwargs.get("softcap")})
        return original(attn, query, key, value, attention_mask, **kwargs)
    return module, original, recording, calls


def _pattern_from_qk(call, kv_for_head):
    """softmax(q k^T * scaling (+ soft-cap) + mask), each query head reading key head kv_for_head(h)."""
    query, key = call["query"], call["key"]
    index = torch.tensor([kv_for_head(h) for h in range(query.shape[1])])
    scores = query @ key.index_select(1, index).transpose(-1, -2) * call["scaling"]
    if call["softcap"] is not None:
        scores = call["softcap"] * torch.tanh(scores / call["softcap"])
    if call["mask"] is not None:
        scores = scores + call["mask"][..., : key.shape[-2]]
    return scores.softmax(-1)[0]  # [heads, seq, seq]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bridge_patterns_equal_hf_eager_attention_with_gqa(arch, tiny_folders, monkeypatch):
    from common.models import load_model
    model = load_model(str(tiny_folders[arch]), "cpu", "float32")  # a fresh one: booted below
    assert model.n_kv_heads < model.n_heads  # the tiny models use grouped-query attention
    ids = model.tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    seq, blocks = ids.shape[1], list(range(model.n_layers))
    module, original, recording, calls = _capture_qk(arch)
    monkeypatch.setattr(module, "eager_attention_forward", recording)
    [reference] = att.hf_patterns(model.hf_model, ids, torch.ones_like(ids), blocks)  # before the bridge is booted
    monkeypatch.setattr(module, "eager_attention_forward", original)
    assert len(calls) == model.n_layers
    [(patterns, logits)] = att.bridge_patterns(model.bridge, ids, torch.ones_like(ids), blocks)
    assert patterns.shape == (model.n_layers, model.n_heads, seq, seq) and logits.shape[0] > 0

    assert (patterns - reference).abs().max() < 1e-5
    assert torch.allclose(patterns.sum(-1), torch.ones(model.n_layers, model.n_heads, seq), atol=1e-5)
    assert patterns.triu(diagonal=1).abs().max() == 0
    checks = att.pattern_checks([patterns], [reference], [att.mass_by_bucket(
        patterns[:, :, -1], att.bucket_index(["relation"] * seq, False))], torch.float32)
    assert all(check["passed"] for check in checks), checks

    # GQA: recomputed from the captured queries and keys, query head h reads key/value head
    # kv_head_of(h); the interleaved mapping h % n_kv_heads is measurably different.
    def kv_for(h):
        return att.kv_head_of(h, model.n_heads, model.n_kv_heads)
    for block, call in enumerate(calls):
        assert call["key"].shape[1] == model.n_kv_heads
        assert (_pattern_from_qk(call, kv_for) - patterns[block]).abs().max() < 1e-5
        wrong = _pattern_from_qk(call, lambda h: h % model.n_kv_heads)
        assert (wrong - patterns[block]).abs().max() > 1e-3

    # Sliding-window blocks (Gemma-2 here) see only the last `window` keys; global blocks see all.
    local = att.sliding_window_layers(model.text_config)
    assert bool(local) == (arch == "gemma2")
    if local:
        assert seq > 64
        for block in blocks:
            beyond = patterns[block, :, -1, : seq - local.get(block, seq)]
            if block in local:
                assert beyond.abs().max() == 0
            else:
                assert patterns[block, :, -1, : seq - 64].sum() > 1e-3


# ----------------------------------------------------------------------------- batching with padding

BATCH_PROMPTS = ["The capital of France is", "Romeo and Juliet was written by William Shakespeare, who",
                 "The capital of Spain is", "Hi", LONG_PROMPT, LONG_PROMPT[:-20]]
# One batch of all, padded to the longest (75 tokens): a 71-token prompt is padded past Gemma-2's 64-token
# sliding window. SmolLM2 (slower, no window) takes the first three.


@pytest.mark.parametrize("spec", ARCHITECTURES + ["smollm2-135m"])
def test_padded_batches_equal_one_prompt_at_a_time(spec, tiny_folders):
    """HF eager and the bridge, all prompts in one forward (right-padded) vs one each: each prompt's patterns and
    next-token probabilities agree up to float32 rounding, which other matrix shapes change (measured: below
    2e-7 on the tiny Llama, Qwen3 and Mistral, 5e-6 on the tiny Gemma-2 and SmolLM2). Left padding, or reading
    the wrong block, moves them by far more than the 1e-5 allowed here."""
    from common.models import load_model
    model = load_model(spec if spec == "smollm2-135m" else str(tiny_folders[spec]), "cpu", "float32")  # HF first
    texts = BATCH_PROMPTS[:3] if spec == "smollm2-135m" else BATCH_PROMPTS
    sequences = [model.tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
    assert len({len(ids) for ids in sequences}) == len(texts) - 1  # two of the same length, the others not
    assert spec == "smollm2-135m" or 64 < len(sequences[5]) < len(sequences[4])
    blocks, together = list(range(model.n_layers)), len(sequences)
    hf = [att.run_in_batches(partial(att.hf_patterns, model.hf_model, blocks=blocks), sequences, size, "cpu", "HF")
          for size in (together, 1)]
    bridge = [att.run_in_batches(partial(att.bridge_patterns, model.bridge, blocks=blocks), sequences, size, "cpu",
                                 "bridge") for size in (together, 1)]
    for i, ids in enumerate(sequences):
        assert hf[0][i].shape == hf[1][i].shape == (model.n_layers, model.n_heads, len(ids), len(ids))
        assert (hf[0][i] - hf[1][i]).abs().max() < 1e-5
        (batched, batched_logits), (alone, alone_logits) = bridge[0][i], bridge[1][i]
        assert (batched - alone).abs().max() < 1e-5 and (batched - hf[1][i]).abs().max() < 1e-5
        assert (batched_logits.softmax(-1) - alone_logits.softmax(-1)).abs().max() < 1e-5


# ----------------------------------------------------------------------------- each self-check can fail


def _run_in_process(*args: str) -> tuple[dict, str]:
    """002's main() in this process, so a test can inject a fault into common.attention: (results, report.md)."""
    from common.config import parse_toggles
    spec = importlib.util.spec_from_file_location("run_002_with_a_fault", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = module.main(parse_toggles(vars(module), list(args)))
    return json.loads((folder / "results.json").read_text()), (folder / "report.md").read_text()


def _edit_bridge_patterns(monkeypatch, edit):
    """Make the bridge's patterns [blocks, heads, seq, seq] pass through edit() before the analysis reads them."""
    original = att.bridge_patterns
    monkeypatch.setattr(att, "bridge_patterns", lambda *args, **kwargs: [
        (edit(pattern), logits) for pattern, logits in original(*args, **kwargs)])


def _swap_heads_0_and_1(monkeypatch):  # rows still sum to 1 and stay causal: only the HF reference can tell
    _edit_bridge_patterns(monkeypatch, lambda p: p[:, [1, 0, *range(2, p.shape[1])]])


def _scale_patterns(monkeypatch):
    _edit_bridge_patterns(monkeypatch, lambda p: p * 1.01)


def _attend_to_later_positions(monkeypatch):
    _edit_bridge_patterns(monkeypatch, lambda p: p + 0.01 * torch.ones_like(p).triu(diagonal=1))


def _count_the_sink_twice(monkeypatch):  # position 0 under the sink and again under the sink bucket
    original = att.mass_by_bucket

    def twice(final_rows, buckets):
        mass = original(final_rows, buckets)
        mass[..., att.BUCKETS.index(att.SINK)] += final_rows[..., 0]
        return mass
    monkeypatch.setattr(att, "mass_by_bucket", twice)


def _pad_on_the_left(monkeypatch):  # while the patterns are still read from the top-left block
    def pad_left(sequences):
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.zeros(len(sequences), longest, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, longest - len(ids):], mask[row, longest - len(ids):] = ids, 1
        return input_ids, mask
    monkeypatch.setattr(att, "pad_right", pad_left)


FAULTS = {"bridge hook_pattern == HF eager output_attentions": _swap_heads_0_and_1,
          "every attention row sums to 1": _scale_patterns,
          "no attention on later positions (causal)": _attend_to_later_positions,
          "masses by type sum to 1 per head": _count_the_sink_twice,
          "patterns of the most padded prompt in its batch == the prompt run alone": _pad_on_the_left}


@pytest.mark.parametrize("check_name", [None] + list(FAULTS))
def test_each_self_check_fails_under_its_fault(check_name, tiny_folders, tmp_path, monkeypatch):
    """None: the same run with no fault, where every check passes."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": text, "target": "Paris"} for text in BATCH_PROMPTS[:3]]))
    if check_name is not None:
        FAULTS[check_name](monkeypatch)
    results, report = _run_in_process(f"--MODEL={tiny_folders['llama']}", f"--OUT_DIR={tmp_path / 'out'}",
                                      f"--PROMPTS_FILE={prompts}", "--DEPTH_RANGE=[0.0,1.0]", "--BATCH_SIZE=3")
    assert {c["name"] for c in results["self_checks"]} == set(FAULTS)
    failed = {c["name"] for c in results["self_checks"] if not c["passed"]}
    if check_name is None:
        assert not failed and "FAIL" not in report
    else:
        assert check_name in failed and f"**FAIL**: {check_name} (" in report


# ----------------------------------------------------------------------------- end to end


def _check_results(results, n_layers=30, layers=tuple(range(11, 25))):
    assert results["experiment"] == "002_attention_patterns"
    assert results["n_layers"] == n_layers and results["layers"] == list(layers)
    n_heads, n_kv = results["n_heads"], results["n_kv_heads"]
    assert results["kv_head_of_head"] == [h // (n_heads // n_kv) for h in range(n_heads)]
    assert all(check["passed"] for check in results["self_checks"]), results["self_checks"]
    for prompt in results["prompts"]:
        assert len(prompt["tokens"]) == len(prompt["token_types"]) == len(prompt["buckets"])
        assert set(prompt["token_types"]) <= set(att.TOKEN_TYPES)
        assert [layer["layer"] for layer in prompt["layers"]] == list(layers)
        for layer in prompt["layers"]:
            assert layer["depth"] == pytest.approx((layer["layer"] + 1) / n_layers)
            assert [head["head"] for head in layer["heads"]] == list(range(n_heads))
            for head in layer["heads"]:
                assert set(head) == {"head", "kv_head", "subject", "final_row"}  # the rest follows from final_row
                assert len(head["final_row"]) == len(prompt["tokens"])
                assert sum(head["final_row"]) == pytest.approx(1, abs=1e-5)
                assert head["subject"] == pytest.approx(sum(head["final_row"][i] for i in prompt["subject_positions"]),
                                                        abs=1e-6)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs002")
    return out, run_script(SCRIPT, f"--OUT_DIR={out}", "--TOP_HEADS=3", f"--FACTS={N_FACTS}")


def test_default_run_writes_the_contract_files(default_run):
    out, result = default_run
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(out)
    names = {p.name for p in folder.iterdir()}
    assert {"results.json", "config.json", "report.md", "entity_mass_heatmap.png", "sink_mass_heatmap.png",
            "subject_mass_heatmap.png", "mass_by_type_per_layer.png", "top_heads_prompt0.png"} <= names
    results = json.loads((folder / "results.json").read_text())
    _check_results(results)
    assert results["n_heads"] == 9 and results["n_kv_heads"] == 3 and not results["include_bos"]
    own = json.loads((REPO / "002_attention_patterns" / "prompts.json").read_text())  # the default prompts
    assert [p["prompt"] for p in results["prompts"]][: len(own)] == [entry["prompt"] for entry in own]
    facts = results["prompts"][len(own):]  # then the first fact of N_FACTS relations, subject from the fact
    assert [(p["fact_id"], p["label_source"]) for p in facts] == [
        ("france_capital", "hand"), ("gold_symbol", "hand"), ("romeo_author", "hand")]
    assert facts[1]["tokens"][facts[1]["subject_positions"][0]] == " gold"
    france = results["prompts"][0]
    assert france["tokens"] == ["The", " capital", " city", " of", " France", " is", " called"]
    assert france["subject_positions"] == [4] and france["label_source"] == "hand"
    assert france["buckets"][0] == "sink" and france["top1_token"] == " Paris"
    # The ranking's best head, recomputed from the per-prompt subject masses (all prompts name a subject).
    subject = torch.tensor([[[head["subject"] for head in layer["heads"]] for layer in p["layers"]]
                            for p in results["prompts"]]).mean(0)  # [blocks, heads]
    best = divmod(int(subject.argmax()), results["n_heads"])
    ranking = results["head_ranking"]
    assert len(ranking) == 14 * 9 and (ranking[0]["layer"], ranking[0]["head"]) == (results["layers"][best[0]], best[1])
    assert ranking[0]["mean"] == pytest.approx(float(subject.max()), abs=1e-6)
    report = (folder / "report.md").read_text()
    assert "9 query heads and 3 key/value heads" in report and "blocks 11-24" in report
    assert "PASS: bridge hook_pattern == HF eager output_attentions" in report and "FAIL" not in report
    assert "PASS: patterns of the most padded prompt in its batch == the prompt run alone" in report
    assert "![entity mass per head](entity_mass_heatmap.png)" in report and "S function" in report


def test_hand_labelled_prompts_and_include_bos(tmp_path):
    prompts = tmp_path / "mine.json"
    prompts.write_text(json.dumps([
        {"prompt": "The element gold has the chemical symbol", "target": "Au", "subject": "gold"},
        {"prompt": "Romeo and Juliet was written by William", "target": "Shakespeare", "subject": "Romeo"}]))
    result = run_script(SCRIPT, f"--OUT_DIR={tmp_path / 'out'}", f"--PROMPTS_FILE={prompts}", "--INCLUDE_BOS=True",
                        "--DEPTH_RANGE=[0.7,0.8]", "--TOP_HEADS=2")
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(tmp_path / "out")
    results = json.loads((folder / "results.json").read_text())
    _check_results(results, layers=range(20, 24))
    gold, romeo = results["prompts"]
    assert gold["label_source"] == "hand" and gold["subject_positions"] == [2]
    assert gold["token_types"][2] == "entity" and "sink" not in gold["buckets"]
    assert romeo["subject_positions"] == [0, 1]  # "Rome" + "o": position 0 counts when INCLUDE_BOS is True
    assert "sink" not in romeo["buckets"]  # so no mass is counted as sink


def test_tiny_gemma2_end_to_end_reports_its_local_layers(tmp_path, tiny_folders):
    """Gemma-2 path of run.py (soft-capped attention, sliding windows) with a prompt longer than the window."""
    prompts = tmp_path / "long.json"
    prompts.write_text(json.dumps([{"prompt": LONG_PROMPT, "target": "Paris"}]))
    result = run_script(SCRIPT, f"--MODEL={tiny_folders['gemma2']}", f"--OUT_DIR={tmp_path / 'out'}",
                        f"--PROMPTS_FILE={prompts}", "--DEPTH_RANGE=[0.0,1.0]", "--TOP_HEADS=1")
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(tmp_path / "out")
    results = json.loads((folder / "results.json").read_text())
    _check_results(results, n_layers=4, layers=range(4))
    assert results["local_layers"] == {"0": 64, "2": 64}
    [prompt] = results["prompts"]
    seq = len(prompt["tokens"])
    for layer in prompt["layers"]:
        assert layer["local_window"] == (64 if layer["layer"] in (0, 2) else None)
        if layer["local_window"]:
            assert all(max(head["final_row"][: seq - 64]) == 0 for head in layer["heads"])
    report = (folder / "report.md").read_text()
    assert "blocks 0, 2 of the band attend only to the last 64 tokens" in report
    assert f"prompts up to {seq} tokens" in report


@pytest.mark.parametrize("args, fragment", [
    (["--DEPTH_RANGE=[0.9,0.1]"], "DEPTH_RANGE must be"),
    (["--TOP_HEADS=0"], "TOP_HEADS must be at least 1"),
    (["--BATCH_SIZE=0"], "BATCH_SIZE must be 'auto' or a whole number"),
    (["--PROMPTS_FILE=" + json.dumps([{"prompt": "The capital of France is", "target": "Paris",
                                       "subject": "Germany"}])], "does not occur"),
])
def test_bad_input_fails_with_one_line_and_no_results(tmp_path, args, fragment):
    if args[0].startswith("--PROMPTS_FILE="):  # write the JSON to a file and pass its path
        path = tmp_path / "p.json"
        path.write_text(args[0].split("=", 1)[1])
        args = [f"--PROMPTS_FILE={path}"]
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--OUT_DIR={out}", *args)
    assert_fails_cleanly(result, out, fragment)
    assert "Loading" not in result.stderr  # stopped before the model
