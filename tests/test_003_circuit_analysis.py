"""003: direct logit attribution adds up to the metric, ablations match hand-made ones, end to end runs.

The tiny models get random norm weights (and, in one Llama variant, o_proj and lm_head biases), so a
decomposition that forgot a norm weight, used the wrong Gemma convention or dropped a bias would not add up.
Each self-check of a run is shown to FAIL in its report when a fault is injected into what it checks.
"""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import common.attribution
from common.attribution import (Attribution, attribute, cache_hook_names, decompose_last_position,
                                decomposition_checks, direct_effects_by_the_model, direct_effects_of_ablation,
                                direct_logit_attribution, has_post_attention_norm, head_outputs, metric_direction,
                                metric_from_logits, norm_weight_convention, position0_share, ranks, spearman,
                                top_indices)
from common import interventions
from conftest import ARCHITECTURES, REPO, assert_fails_cleanly, run_folders, run_script

SCRIPT = "003_circuit_analysis/run.py"
PROMPT = "The capital of France is"
TARGET, COUNTER = "Paris", "London"


def _randomize(hf_model, with_bias: bool, seed: int = 0):
    """Random norm weights everywhere (and o_proj and lm_head biases when asked), so every term of the
    attribution matters. Call it before the bridge boots: it swaps in a new lm_head that has a bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in hf_model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3 + 0.5)
            if with_bias and name.endswith("o_proj") and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
        if with_bias:  # no Hugging Face Llama has an unembedding bias; the attribution must still count one
            old = hf_model.lm_head
            hf_model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            hf_model.lm_head.weight.copy_(old.weight)
            hf_model.lm_head.bias.copy_(torch.randn(old.out_features, generator=generator))


@pytest.fixture(scope="module")
def bias_folder(tmp_path_factory, embedded_folder):
    """A tiny Llama whose attention projections have biases (attention_bias=True); `_randomize` adds an lm_head
    bias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tiny_models import tiny_configs
    config = tiny_configs()["llama"]
    config.attention_bias = True
    folder = tmp_path_factory.mktemp("tiny_bias")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_folder).save_pretrained(folder)
    return folder


_models = {}


@pytest.fixture(params=ARCHITECTURES + ["llama_bias"])
def pair(request, tiny_folders, bias_folder):
    """(model, reference): the same randomized tiny model twice; the bridge boots on `model` only, so
    `reference` stays a plain Hugging Face model for computations by hand."""
    from common.models import load_model
    name = request.param
    if name not in _models:
        folder = bias_folder if name == "llama_bias" else tiny_folders[name]
        model, reference = load_model(str(folder), "cpu", "float32"), load_model(str(folder), "cpu", "float32")
        for loaded in (model, reference):
            _randomize(loaded.hf_model, with_bias=name == "llama_bias")
        _models[name] = (name, model, reference)
    return _models[name]


def _ids_and_tokens(model):
    """input_ids [1, seq], target id, counterfactual id."""
    from common.prompts import encode, target_token
    return (encode(model, PROMPT), target_token(model.tokenizer, PROMPT, TARGET).token_id,
            target_token(model.tokenizer, PROMPT, COUNTER).token_id)


@torch.no_grad()
def _hf_pre_softcap_logits(reference, ids, hooks=()) -> torch.Tensor:
    """The lm_head output at the last position from plain HF (forward hooks by hand), [vocab]."""
    captured = {}
    handles = [reference.unembedding.register_forward_hook(lambda m, i, out: captured.update(out=out))]
    handles += [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        reference.hf_model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured["out"][0, -1].float()


def _cached(model, ids):
    with torch.no_grad():
        return model.bridge.run_with_cache(ids, names_filter=cache_hook_names(model))


# ----------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("metric", ["logit", "logit_diff"])
def test_pieces_sum_to_the_metric(pair, metric):
    name, model, reference = pair
    ids, target, counter = _ids_and_tokens(model)
    counter_id = counter if metric == "logit_diff" else None
    logits, cache = _cached(model, ids)
    decomposition = decompose_last_position(model, cache)
    attribution = attribute(model, decomposition, target, counter_id)
    # The reference metric comes from plain HF, not from the bridge cache the pieces were read from.
    expected = float(metric_from_logits(_hf_pre_softcap_logits(reference, ids), target, counter_id))
    assert attribution.total() == pytest.approx(expected, abs=1e-4)
    assert abs(expected) > 1e-3  # the test would notice a decomposition that sums to zero
    pre = cache["unembed.hook_out"][0, -1]
    for check in decomposition_checks(model, decomposition, attribution, expected, pre, logits[0, -1]):
        assert check["passed"], check
    assert norm_weight_convention(model.final_norm) == ("1 + w" if name == "gemma2" else "w")
    if name == "llama_bias":  # both bias terms are there and counted
        assert attribution.attn_bias.abs().max() > 1e-4 and abs(attribution.unembed_bias) > 1e-2
        without_unembed_bias = attribution.total() - attribution.unembed_bias
        assert abs(without_unembed_bias - expected) > 1e-2  # so dropping it would break the sum
    # Dropping the final norm's weight (the unfolded-cache pitfall in DESIGN.md) breaks the sum.
    direction, _ = metric_direction(model, target, counter_id)
    weightless = direct_logit_attribution(decomposition.resid_final, decomposition.rms_final,
                                            torch.ones_like(direction), direction)
    assert abs(float(weightless) - expected) > 1e-3


def test_post_attention_norm_is_frozen_per_head(tiny_folders):
    """Gemma-2: the heads pass through the post-attention norm; with its scale frozen they add up exactly."""
    from common.models import load_model
    model = load_model(str(tiny_folders["gemma2"]), "cpu", "float32")
    _randomize(model.hf_model, with_bias=False)
    ids, _, _ = _ids_and_tokens(model)
    names = cache_hook_names(model) + [f"blocks.{layer}.attn.hook_out" for layer in range(model.n_layers)]
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids, names_filter=names)
    assert has_post_attention_norm(model)
    decomposition = decompose_last_position(model, cache)
    raw = torch.stack([cache[f"blocks.{layer}.attn.hook_out"][0, -1] for layer in range(model.n_layers)])
    assert not torch.allclose(raw, decomposition.attn_out, atol=1e-3)  # the norm changes the output...
    heads = decomposition.heads.sum(dim=1) + decomposition.attn_bias
    assert torch.allclose(heads, decomposition.attn_out, atol=1e-4)  # ...and the frozen heads still add up


def test_head_outputs_sum_to_o_proj():
    torch.manual_seed(0)
    z = torch.randn(5, 4, 8)  # [seq, n_heads, head_dim]
    o_proj = torch.nn.Linear(32, 16, bias=False)
    heads = head_outputs(z, o_proj.weight)
    assert heads.shape == (5, 4, 16)
    assert torch.allclose(heads.sum(dim=1), o_proj(z.reshape(5, 32)), atol=1e-5)
    assert torch.allclose(heads[:, 2], z[:, 2] @ o_proj.weight[:, 16:24].T, atol=1e-5)


def test_rank_helpers():
    import numpy as np

    torch.manual_seed(1)
    a, b = torch.randn(50), torch.randn(50)
    # Without ties, Spearman = 1 - 6 sum(d^2) / (n (n^2 - 1)), d = difference of ranks (numpy's, independently).
    d = np.argsort(np.argsort(a.numpy())) - np.argsort(np.argsort(b.numpy()))
    assert spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (50 * (50 ** 2 - 1)), abs=1e-6)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert ranks(torch.tensor([0.5, 3.0, -1.0])).tolist() == [1, 0, 2]
    assert top_indices(torch.tensor([0.5, -3.0, 1.0]), 2) == [1, 2]
    assert top_indices(torch.tensor([0.5, -3.0, 1.0]), 2, by="signed") == [2, 0]


def _circuit_report():
    spec = importlib.util.spec_from_file_location("circuit_report_under_test",
                                                  REPO / "003_circuit_analysis" / "circuit_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_attention_vs_mlps_over_prompts_and_per_relation():
    from types import SimpleNamespace

    report = _circuit_report()

    def prompt(heads, mlps, relation):
        attribution = Attribution(0.0, torch.tensor([[heads / 2, heads / 2]]), torch.zeros(1),
                                  torch.tensor([mlps]), 0.0)
        return SimpleNamespace(attribution=attribution, prompt=SimpleNamespace(extra={"relation": relation}))

    # Five "capital" prompts (enough for a row of their own), two "plural" (too few), one where nothing is written.
    prompts = ([prompt(3.0, 1.0, "capital")] * 3 + [prompt(1.0, 3.0, "capital")] * 2
               + [prompt(-1.0, 1.0, "plural"), prompt(0.0, 0.0, "plural")])
    split = report.attention_vs_mlps(prompts)
    assert split["attention"]["value"] == pytest.approx(10 / 7) and split["attention"]["n"] == 7
    assert split["mlps"]["value"] == pytest.approx(10 / 7)
    assert split["attention_minus_mlps"]["value"] == pytest.approx(0.0)
    shares = [0.75] * 3 + [0.25] * 2 + [-0.5]  # a / (|a| + |m|); the empty prompt has none
    assert split["attention_share"]["value"] == pytest.approx(sum(shares) / 6)
    assert split["attention_share"]["n"] == 6 and split["attention_share"]["n_none"] == 1
    lo, hi = split["attention_share"]["ci95"]
    assert -0.5 <= lo < split["attention_share"]["value"] < hi <= 0.75
    by_relation = report._split_by_relation(prompts, seed=0)
    assert list(by_relation) == ["capital"] and by_relation["capital"]["attention_share"]["value"] == pytest.approx(
        0.55)


def test_default_prompts_are_its_facts_plus_the_fact_set():
    from common.config import parse_toggles
    from common.errors import LabError
    spec = importlib.util.spec_from_file_location("run_003_prompts", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    own = json.loads((REPO / "003_circuit_analysis" / "prompts.json").read_text())
    prompts = module.read_prompts(parse_toggles(vars(module), ["--FACTS=12"]))
    ids = [p.fact_id for p in prompts]
    assert ids[: len(own)] == [f["id"] for f in own] and len(prompts) == len(own) + 12 and len(set(ids)) == len(ids)
    assert all(p.extra["subject"] in p.text and p.extra["counterfactual"] and p.extra["relation"] for p in prompts)
    assert len(module.read_prompts(parse_toggles(vars(module), ["--FACTS=0"]))) == len(own)
    with pytest.raises(LabError, match="FACTS must be"):
        module.read_prompts(parse_toggles(vars(module), ["--FACTS=-1"]))


def test_position0_share_finds_a_dominating_first_position():
    z = torch.ones(1, 4, 2, 3)  # [batch, seq, n_heads, head_dim]
    z[0, 0, 1] = 50.0  # head 1: position 0 is 50x the others
    mlp = torch.ones(1, 4, 6)
    cache = {"blocks.0.attn.hook_z": z, "blocks.0.hook_mlp_out": mlp}
    heads, mlps = position0_share(cache, 1)
    assert heads.tolist() == [[pytest.approx(1.0), pytest.approx(50.0)]] and mlps.tolist() == [pytest.approx(1.0)]


# ----------------------------------------------------------------------------- ablations


def test_ablating_nothing_changes_nothing(pair):
    _, model, _ = pair
    ids, target, counter = _ids_and_tokens(model)
    logits, cache = _cached(model, ids)
    clean = float(metric_from_logits(cache["unembed.hook_out"][0, -1], target, counter))
    # Clean rows alone, and a clean row batched with rows that do ablate something.
    sets = [([], []), ([(0, 0), (1, 2)], [1]), ([], [0]), ([], [])]
    head_mask, mlp_mask = interventions.ablation_masks(model.n_layers, model.n_heads, sets)
    z_values, mlp_values = interventions.ablation_values(cache, model.n_layers, "zero")
    metric, prob = interventions.run_ablations(model, ids, head_mask, mlp_mask, z_values, mlp_values, target, counter)
    clean_prob = float(torch.softmax(logits[0, -1], -1)[target])
    for row in (0, 3):
        assert float(metric[row]) == pytest.approx(clean, abs=1e-5)
        assert float(prob[row]) == pytest.approx(clean_prob, abs=1e-6)
    assert abs(float(metric[1]) - clean) > 1e-4  # the ablating rows really ablate


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablating_a_head_equals_doing_it_by_hand(pair, kind):
    """The bridge ablation of one head equals editing that head's slice of o_proj in plain HF."""
    _, model, reference = pair
    ids, target, counter = _ids_and_tokens(model)
    _, cache = _cached(model, ids)
    attribution = attribute(model, decompose_last_position(model, cache), target, counter)
    layer, head = divmod(top_indices(attribution.heads.flatten(), 1)[0], model.n_heads)
    head_mask, mlp_mask = interventions.ablation_masks(model.n_layers, model.n_heads, [([(layer, head)], [])])
    z_values, mlp_values = interventions.ablation_values(cache, model.n_layers, kind)
    metric, _ = interventions.run_ablations(model, ids, head_mask, mlp_mask, z_values, mlp_values, target, counter)

    o_proj = reference.hf_model.model.layers[layer].self_attn.o_proj
    head_dim = o_proj.in_features // model.n_heads
    part = slice(head * head_dim, (head + 1) * head_dim)

    def by_hand(module, inputs, output):  # inputs[0]: z of all heads, [1, seq, n_heads * head_dim]
        z = inputs[0][..., part]
        replacement = torch.zeros_like(z) if kind == "zero" else z.mean(dim=1, keepdim=True).expand_as(z)
        return output - (z - replacement) @ module.weight[:, part].T  # o_proj is linear in each head's z

    expected = metric_from_logits(_hf_pre_softcap_logits(reference, ids, [(o_proj, by_hand)]), target, counter)
    clean = metric_from_logits(_hf_pre_softcap_logits(reference, ids), target, counter)
    assert float(metric[0]) == pytest.approx(float(expected), abs=1e-4)
    assert abs(float(expected - clean)) > 1e-4  # the head matters, so a no-op ablation would fail


def test_zero_ablating_an_mlp_equals_doing_it_by_hand(pair):
    name, model, reference = pair
    ids, target, counter = _ids_and_tokens(model)
    _, cache = _cached(model, ids)
    layer = model.n_layers // 2
    head_mask, mlp_mask = interventions.ablation_masks(model.n_layers, model.n_heads, [([], [layer])])
    z_values, mlp_values = interventions.ablation_values(cache, model.n_layers, "zero")
    metric, _ = interventions.run_ablations(model, ids, head_mask, mlp_mask, z_values, mlp_values, target, counter)
    block = reference.hf_model.model.layers[layer]
    # What the block adds to the residual: Gemma-2 normalizes the MLP output first.
    module = block.post_feedforward_layernorm if name == "gemma2" else block.mlp
    expected = metric_from_logits(
        _hf_pre_softcap_logits(reference, ids, [(module, lambda m, i, out: torch.zeros_like(out))]), target, counter)
    assert float(metric[0]) == pytest.approx(float(expected), abs=1e-4)


def test_direct_effect_of_zero_ablation_is_the_attribution(pair):
    _, model, _ = pair
    ids, target, counter = _ids_and_tokens(model)
    _, cache = _cached(model, ids)
    decomposition = decompose_last_position(model, cache)
    attribution = attribute(model, decomposition, target, counter)
    z_values, mlp_values = interventions.ablation_values(cache, model.n_layers, "zero")
    heads, mlps = direct_effects_of_ablation(model, cache, decomposition, z_values, mlp_values, target, counter)
    assert torch.allclose(heads, attribution.heads, atol=1e-6) and torch.allclose(mlps, attribution.mlps, atol=1e-6)
    z_mean, mlp_mean = interventions.ablation_values(cache, model.n_layers, "mean")
    heads_mean, _ = direct_effects_of_ablation(model, cache, decomposition, z_mean, mlp_mean, target, counter)
    assert not torch.allclose(heads_mean, attribution.heads, atol=1e-4)


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_direct_effects_by_the_model_equal_the_attribution_of_what_is_removed(pair, kind):
    """The self-check's reference (the model's own o_proj, norms and lm_head) against the unfolded attribution,
    for single heads, single MLPs and a set of several heads in one layer with an MLP."""
    _, model, _ = pair
    ids, target, counter = _ids_and_tokens(model)
    _, cache = _cached(model, ids)
    decomposition = decompose_last_position(model, cache)
    z_values, mlp_values = interventions.ablation_values(cache, model.n_layers, kind)
    heads, mlps = direct_effects_of_ablation(model, cache, decomposition, z_values, mlp_values, target, counter)
    top_head = divmod(top_indices(heads.flatten(), 1)[0], model.n_heads)
    top_mlp = top_indices(mlps, 1)[0]
    sets = [([], []), ([top_head], []), ([], [top_mlp]), ([(3, 0), (3, 1), (0, 3)], [1]), ([top_head], [top_mlp])]
    head_mask, mlp_mask = interventions.ablation_masks(model.n_layers, model.n_heads, sets)
    reference = direct_effects_by_the_model(model, cache, z_values, mlp_values, head_mask, mlp_mask, target,
                                              counter)
    expected = torch.tensor([sum(float(heads[l, h]) for l, h in hs) + sum(float(mlps[l]) for l in ms)
                             for hs, ms in sets])
    assert torch.allclose(reference, expected, rtol=1e-4, atol=1e-6), (reference - expected)
    assert expected[1:].abs().max() > 1e-3  # the sets really remove something


# ----------------------------------------------------------------------------- end to end


def _check_contract(results: dict, n_layers: int, n_heads: int):
    assert results["experiment"] == "003_circuit_analysis"
    assert results["n_layers"] == n_layers and results["n_heads"] == n_heads
    for record in results["prompts"]:
        attribution = record["attribution"]
        assert len(attribution["heads"]) == n_layers and all(len(row) == n_heads for row in attribution["heads"])
        assert len(attribution["mlps"]) == n_layers
        total = attribution["embed"] + sum(map(sum, attribution["heads"])) + sum(attribution["mlps"]) + attribution[
            "bias"]
        assert total == pytest.approx(record["metric"], abs=1e-4)
        assert all(check["passed"] for check in record["self_checks"]), record["self_checks"]
        assert 0 <= record["target_prob"] <= 1
        kinds = [a["kind"] for a in record["ablations"]]
        assert kinds[:2] == ["top heads", "top MLPs"] and "head" in kinds and "mlp" in kinds


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs003")
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps([
        {"prompt": "The capital of France is", "target": "Paris", "counterfactual": "London", "subject": "France"},
        {"prompt": "The opposite of hot is", "target": "cold", "counterfactual": "warm"}]))
    result = run_script(SCRIPT, f"--OUT_DIR={out / 'out'}", f"--PROMPTS_FILE={prompts}", "--METRIC=logit_diff",
                        "--TOP_K=3", "--ABLATE_EVERY=False")
    return out / "out", result


def test_embedded_run_writes_the_contract_files(embedded_run):
    out, result = embedded_run
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(out)
    assert {"results.json", "config.json", "report.md", "dla_heads_mean.png", "attn_vs_mlp_per_layer.png",
            "direct_vs_total.png", "dla_heads_prompt0.png"} <= {p.name for p in folder.iterdir()}
    results = json.loads((folder / "results.json").read_text())
    _check_contract(results, 30, 9)
    assert results["metric"] == "logit_diff" and results["final_norm_weight"] == "w"
    # The split over prompts, recomputed from the per-prompt attributions.
    split = results["across_prompts"]["attention_vs_mlps"]
    attention = [sum(map(sum, p["attribution"]["heads"])) for p in results["prompts"]]
    assert split["attention"]["n"] == 2 and split["attention"]["value"] == pytest.approx(sum(attention) / 2, abs=1e-5)
    lo, hi = split["attention"]["ci95"]
    assert lo == pytest.approx(min(attention), abs=1e-5) and hi == pytest.approx(max(attention), abs=1e-5)
    frequent = results["across_prompts"]["frequent_heads"][0]
    assert frequent["in_top_k"]["value"] == frequent["n_prompts_in_top_k"] / 2 and frequent["dla"]["n"] == 2
    france, hot = results["prompts"]
    assert france["target_token"] == " Paris" and france["counter_token"] == " London"
    assert france["subject_positions"] == [3]  # "France"; "hot" is lower case, so the rule finds no subject
    assert hot["subject_positions"] == [] and hot["subject_attention"] is None
    singles = [a for a in france["ablations"] if a["kind"] == "head"]
    assert len(singles) == 3 and {a["components"][0] for a in singles} == {
        f"L{h['layer']}H{h['head']}" for h in france["top_heads"]}
    report = (folder / "report.md").read_text()
    assert "PASS: DLA pieces add up to the model's metric" in report and "FAIL" not in report
    assert "**frozen from the actual run**" in report and "![attention vs MLP per layer]" in report
    config = json.loads((folder / "config.json").read_text())
    assert config["toggles"]["METRIC"] == "logit_diff" and config["dtype"] == "float32"


def test_embedded_answer_is_written_late_and_its_writers_matter(embedded_run):
    """The science: the last third of SmolLM2's layers writes most of the answer's logit difference, and
    ablating the heads that write it positively lowers it."""
    out, _ = embedded_run
    [folder] = run_folders(out)
    for record in json.loads((folder / "results.json").read_text())["prompts"]:
        attribution = record["attribution"]
        late = sum(attribution["attn_per_layer"][20:]) + sum(attribution["mlps"][20:])
        assert record["metric"] > 0 and late > 0.5 * record["metric"], record["prompt"]
        [writers] = [a for a in record["ablations"] if a["kind"] == "top heads"]
        assert writers["components"] and writers["total_effect"] > 0


def test_tiny_gemma2_run_with_mean_ablation_of_every_component(tiny_folders, tmp_path):
    """Every head and MLP ablated alone, mean ablation, post-attention norms and soft-cap, end to end."""
    prompts = _write(tmp_path / "prompts.json", json.dumps([
        {"prompt": "The capital of France is", "target": "Paris"},
        {"prompt": "Romeo and Juliet was written by William", "target": "Shakespeare"}]))
    result = run_script(SCRIPT, f"--MODEL={tiny_folders['gemma2']}", f"--OUT_DIR={tmp_path / 'out'}",
                        f"--PROMPTS_FILE={prompts}", "--ABLATION=mean", "--TOP_K=2", "--ABLATE_EVERY_PROMPTS=1")
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(tmp_path / "out")
    results = json.loads((folder / "results.json").read_text())
    _check_contract(results, 4, 4)
    assert results["softcap"] == 30.0 and results["post_attention_norm"] and results["final_norm_weight"] == "1 + w"
    # Every head alone on the first prompt only (ABLATE_EVERY_PROMPTS=1); the top-k on the second.
    assert [p["ablated_every"] for p in results["prompts"]] == [True, False] and results["ablated_every"] == 1
    assert [len([a for a in p["ablations"] if a["kind"] == "head"]) for p in results["prompts"]] == [16, 2]
    # The direct-vs-total summary is over the prompt ablated in full only: its Spearman, recomputed with numpy.
    heads = [a for a in results["prompts"][0]["ablations"] if a["kind"] == "head"]
    direct_ranks, total_ranks = (np.argsort(np.argsort([-a[key] for a in heads], kind="stable"), kind="stable")
                                 for key in ("direct_effect", "total_effect"))
    summary = results["across_prompts"]["direct_vs_total"]
    assert summary["n_prompts"] == 1
    assert summary["heads"]["spearman_median"]["value"] == pytest.approx(np.corrcoef(direct_ranks, total_ranks)[0, 1])
    report = (folder / "report.md").read_text()
    assert "before** the soft-cap" in report and "PASS: soft-cap 30" in report
    assert "ean ablation" in report  # the measured note on position 0's share of the mean
    assert "on the 1 prompt where each was ablated alone" in report


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: ["--METRIC=prob"], "METRIC must be one of"),
    (lambda tmp: ["--ABLATION=resample"], "ABLATION must be one of"),
    (lambda tmp: ["--TOP_K=0"], "TOP_K must be at least 1"),
    (lambda tmp: ["--METRIC=logit_diff", f"--PROMPTS_FILE={_write(tmp / 'p.json', json.dumps([{'prompt': 'The capital of France is', 'target': 'Paris'}]))}"],  # noqa: E501
     "no \"counterfactual\""),
    (lambda tmp: [f"--PROMPTS_FILE={_write(tmp / 'p.json', json.dumps([{'prompt': 'The capital of France is', 'target': 'Paris', 'subject': 'Spain'}]))}"],  # noqa: E501
     "does not occur in the prompt"),
    (lambda tmp: ["--METRIC=logit_diff", f"--PROMPTS_FILE={_write(tmp / 'p.json', json.dumps([{'prompt': 'The capital of France is', 'target': 'Paris', 'counterfactual': 'Paris, France'}]))}"],  # noqa: E501
     "starts with the same token"),
])
def test_bad_input_fails_with_one_line_and_no_results(tmp_path, tiny_folders, make_args, fragment):
    out = tmp_path / "out"
    # A tiny model (same tokenizer as the embedded one) keeps the checks that need a model fast.
    result = run_script(SCRIPT, f"--OUT_DIR={out}", f"--MODEL={tiny_folders['llama']}", *make_args(tmp_path))
    assert_fails_cleanly(result, out, fragment)


# ----------------------------------------------------------------------------- self-checks that can fail


def _run_in_process(monkeypatch, tmp_path, model, *toggles: str, inject=None) -> tuple[dict, str]:
    """Run 003's main() here on an already loaded `model` (None: main loads --MODEL itself), after
    `inject(monkeypatch, run_module)` (a fault) when given; returns (results.json, report.md). Grad mode, which
    main() switches off, is restored afterwards."""
    from common.config import parse_toggles
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.spec_from_file_location("run_003_under_test", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if model is not None:
        monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: model)
    if inject is not None:
        inject(monkeypatch, module)
    prompts = _write(tmp_path / "prompts.json", json.dumps([{"prompt": PROMPT, "target": TARGET,
                                                             "counterfactual": COUNTER}]))
    toggles = [f"--OUT_DIR={tmp_path / 'out'}", f"--PROMPTS_FILE={prompts}", "--TOP_K=2", "--ABLATE_EVERY=False",
               *toggles]
    with torch.set_grad_enabled(True):
        folder = module.main(parse_toggles(vars(module), toggles))
    return json.loads((folder / "results.json").read_text()), (folder / "report.md").read_text()


def _scaled(function, factor: float, which: int | None = None):
    """`function` with its result (or its result's element `which`) multiplied by `factor`."""
    def faulty(*args, **kwargs):
        result = function(*args, **kwargs)
        if which is None:
            return result * factor
        return tuple(part * factor if i == which else part for i, part in enumerate(result))
    return faulty


def _leave_out_the_embeddings(monkeypatch, run):
    decompose = decompose_last_position

    def faulty(model, cache):
        decomposition = decompose(model, cache)
        decomposition.embed = torch.zeros_like(decomposition.embed)
        return decomposition
    monkeypatch.setattr(common.attribution, "decompose_last_position", faulty)


def _ablate_every_mlp_in_the_clean_row(monkeypatch, run):
    masks = run.ablation_masks

    def faulty(*args):
        head_mask, mlp_mask = masks(*args)
        mlp_mask[0] = True
        return head_mask, mlp_mask
    monkeypatch.setattr(run, "ablation_masks", faulty)


def _patch_attribution(name: str, make_fault):
    """An injector that replaces common.attribution's `name` by make_fault(the original)."""
    def inject(monkeypatch, run):
        monkeypatch.setattr(common.attribution, name, make_fault(getattr(common.attribution, name)))
    return inject


# fault -> (injector, a part of the name of the check that must FAIL)
FAULTS = {
    "embeddings left out of the pieces": (_leave_out_the_embeddings, "residual entering the final norm"),
    "each head's W_O slice misread": (_patch_attribution("head_outputs", lambda f: _scaled(f, 1.5)),
                                      "hook_attn_out"),
    "final norm weight dropped (the unfolded-cache pitfall)": (
        _patch_attribution("effective_norm_weight", lambda f: lambda norm: torch.ones_like(f(norm))),
        "DLA pieces add up to the model's metric"),
    "unembedding bias dropped": (_patch_attribution("metric_direction", lambda f: _scaled(f, 0.0, which=1)),
                                 "DLA pieces add up to the model's metric"),
    "clean row of the ablation batch ablates": (_ablate_every_mlp_in_the_clean_row, "ablating nothing"),
    "direct effects of ablation misweighted": (
        _patch_attribution("direct_effects_of_ablation", lambda f: _scaled(f, 1.5, which=0)),
        "direct effect of each ablation"),
}


@pytest.fixture(scope="module")
def biased(bias_folder):
    """The tiny Llama with o_proj and lm_head biases and random norm weights, loaded once."""
    from common.models import load_model
    model = load_model(str(bias_folder), "cpu", "float32")
    _randomize(model.hf_model, with_bias=True)
    return model


def test_every_self_check_passes_without_a_fault(monkeypatch, tmp_path, biased):
    results, report = _run_in_process(monkeypatch, tmp_path, biased, "--METRIC=logit_diff")
    [record] = results["prompts"]
    assert len(record["self_checks"]) == 5 and all(c["passed"] for c in record["self_checks"])
    assert "FAIL" not in report and record["attribution"]["unembed_bias"] != 0


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_self_check_fails_when_its_fault_is_injected(monkeypatch, tmp_path, biased, fault):
    """A check that compared a computation with itself (e.g. the metric replaced by the DLA total) would pass
    despite the fault, and this test would fail."""
    inject, check_name = FAULTS[fault]
    results, report = _run_in_process(monkeypatch, tmp_path, biased, "--METRIC=logit_diff", inject=inject)
    failed = [c["name"] for c in results["prompts"][0]["self_checks"] if not c["passed"]]
    assert any(check_name in name for name in failed), (fault, failed)
    assert any(line.startswith("- **FAIL**") and check_name in line for line in report.splitlines()), fault


def test_metric_is_read_from_the_model_not_from_the_attribution(monkeypatch, tmp_path, biased, bias_folder):
    """The run's metric equals plain Hugging Face's logits (an independent forward), and the pieces add up to it."""
    from common.models import load_model
    results, _ = _run_in_process(monkeypatch, tmp_path, biased, "--METRIC=logit_diff")
    reference = load_model(str(bias_folder), "cpu", "float32")
    _randomize(reference.hf_model, with_bias=True)
    ids, target, counter = _ids_and_tokens(reference)
    expected = float(metric_from_logits(_hf_pre_softcap_logits(reference, ids), target, counter))
    [record] = results["prompts"]
    assert record["metric"] == pytest.approx(expected, abs=1e-5)
    assert record["attribution"]["total"] == pytest.approx(expected, abs=1e-4)


def test_soft_cap_check_fails_when_the_lab_reads_the_wrong_cap(monkeypatch, tmp_path, tiny_folders):
    from common.models import LoadedModel, load_model
    gemma2 = load_model(str(tiny_folders["gemma2"]), "cpu", "float32")
    monkeypatch.setattr(LoadedModel, "softcap", property(lambda self: 20.0))  # the model caps at 30
    results, report = _run_in_process(monkeypatch, tmp_path, gemma2)
    [softcap] = [c for c in results["prompts"][0]["self_checks"] if c["name"].startswith("soft-cap")]
    assert not softcap["passed"] and "**FAIL**: soft-cap 20" in report


# ----------------------------------------------------------------------------- offloaded layers (issue 10)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_offloaded_layers_give_the_same_numbers(arch, tiny_folders, tmp_path, monkeypatch):
    """Half the layers on the disk (their o_proj and norm weights stay on "meta" between forwards): the same
    results.json as in memory, within 1e-5, every self-check passing."""
    from test_scale import _numbers
    from transformers import AutoConfig
    from common.models import module_sizes
    folder = str(tiny_folders[arch])
    sizes = module_sizes(AutoConfig.from_pretrained(folder), torch.float32)
    half_the_layers = sizes[""] - sizes["model.layers.2"] - sizes["model.layers.3"] + 1  # bytes: 2 of 4 stay
    runs = [_run_in_process(monkeypatch, tmp_path / str(len(extra)), None, f"--MODEL={folder}", "--DEVICE=cpu",
                            "--DTYPE=float32", "--ABLATION=mean", *extra)
            for extra in ([], [f"--MAX_MEMORY_GB={half_the_layers / 1e9}"])]
    (in_memory, _), (offloaded, report) = runs
    assert "Offloaded: 2 of 4 layers" in report and "disk" in report
    assert all(c["passed"] for c in offloaded["prompts"][0]["self_checks"])
    assert _numbers(in_memory) == pytest.approx(_numbers(offloaded), abs=1e-5)
