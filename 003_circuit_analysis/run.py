"""003 - Circuit analysis: which heads and MLPs write the answer?

001 showed at which depth the answer appears; 002 which heads look at the subject. Here the answer's logit
at the last position is split exactly into what each part of the model writes into the residual stream:
the embeddings, every attention head of every layer, every MLP, and the biases (direct logit attribution,
DLA). The final norm is handled the standard way: its scale is frozen from the actual run, which makes it
linear, so the parts add up to the logit the model computes; every run checks that sum. For Gemma-2 the
attributed metric is the logit before the final soft-cap (the cap is not linear).

DLA measures only the direct path (what a component writes that the unembedding reads). Ablation measures
the total effect: replace a head's output (or an MLP's) by zero or by its mean and run the model again.
Where the two rankings disagree, a component acts through later layers rather than (or as well as) writing
the answer itself.

Over a set: by default this folder's eight facts plus 60 of 001's fact set (six per relation), so the heads
that recur in the top-k and the split between attention and MLPs come with bootstrap 95% intervals over the
prompts (common/stats.py), per relation too. Ablating every head alone costs ~300 forward passes a prompt,
so it runs on the first ABLATE_EVERY_PROMPTS prompts; the top-k are ablated on all. The results are typed objects (circuit_report.py, beside this file, also writes the report).

Run:   python 003_circuit_analysis/run.py
Help:  python 003_circuit_analysis/run.py --help
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # common/ and this folder's report module

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
PROMPTS_FILE = None  # None = this folder's prompts.json plus FACTS facts; else a JSON list of {"prompt", "target"}, optional "counterfactual", "subject", used alone
FACTS = 60  # with the default prompts: also analyse this many facts of 001's fact set, relations taking turns (0 = only prompts.json)
METRIC = "logit"  # one of "logit" or "logit_diff": the target's logit, or logit(target) - logit(counterfactual answer)
TOP_K = 10  # how many heads and MLPs to list and ablate (top by |attribution|)
ABLATION = "zero"  # one of "zero" or "mean": what an ablated head or MLP outputs ("mean" = its mean over the prompt's positions)
ABLATE_EVERY = True  # also ablate every head and every MLP alone on the first ABLATE_EVERY_PROMPTS prompts: the full ranking by total effect (slower)
ABLATE_EVERY_PROMPTS = 18  # with ABLATE_EVERY: on how many prompts, the first ones (prompts.json's 8, then one fact per relation; ~300 forward passes each); the others get the top-k only
BATCH_SIZE = "auto"  # ablated copies of a prompt per forward pass: "auto" = from free memory and the model's shapes, or a number
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed: torch and the bootstrap intervals over prompts (same seed, same intervals)
# ----------------------------------------------------------------------------- end of toggles

import common  # noqa: E402,F401 - first: it sets PYTORCH_ENABLE_MPS_FALLBACK before torch loads

from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from common import attribution, hooks, html_report, report  # noqa: E402
from common.attention import counted_positions, fact_set_prompts, label_prompt, mass_on, token_offsets  # noqa: E402
from common.attention_results import read_head_ranking  # noqa: E402
from common.attribution import top_indices  # noqa: E402
from common.interventions import ablation_masks, ablation_values, run_ablations  # noqa: E402
from common.batching import batch_size  # noqa: E402
from common.checks import check, tolerance  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.errors import LabError  # noqa: E402
from common.models import load_model  # noqa: E402
from common.progress import progress  # noqa: E402
from common.prompts import Prompt, Target, encode, load_prompt_list, target_token, token_strings  # noqa: E402
from circuit_report import (Ablation, AcrossPrompts, CircuitResults, PromptResult, draw_figures,  # noqa: E402
                            findings, rank_single_ablations, write_report)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXPERIMENT = "003_circuit_analysis"
RESULTS_002 = REPO / "002_attention_patterns" / "results"  # 002's default OUT_DIR: its ranking of heads is shown
FACT_SET = REPO / "001_layers_and_logits" / "prompts.json"  # the lab's fact set (common/facts.py), read, not copied


def main(cfg):
    # 1. Check every input that can be checked without the model.
    if cfg.TOP_K < 1 or cfg.ABLATE_EVERY_PROMPTS < 0:
        raise LabError(f"TOP_K must be at least 1 and ABLATE_EVERY_PROMPTS at least 0, not {cfg.TOP_K} and "
                       f"{cfg.ABLATE_EVERY_PROMPTS}.")
    prompts = read_prompts(cfg)
    torch.manual_seed(cfg.SEED)
    torch.set_grad_enabled(False)

    # 2. Load the model; resolve every prompt's target (and counterfactual) before any heavy work.
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    if not all(hasattr(layer.self_attn, "o_proj") for layer in model.hf_model.model.layers):
        raise LabError(f"{model.name}'s attention has no o_proj to split into heads: 003 supports Llama, Qwen3, "
                       "Mistral and Gemma style models.")
    prompts = [resolve(model, cfg, prompt) for prompt in prompts]

    # 3. Per prompt: the model's metric, its attribution, the ablations, each with its self-checks.
    per_prompt = [analyse_prompt(model, cfg, *prompt, every=cfg.ABLATE_EVERY and i < cfg.ABLATE_EVERY_PROMPTS)
                  for i, prompt in enumerate(progress(prompts, f"attributing {cfg.METRIC}, {cfg.ABLATION} ablation",
                                                      unit="prompt"))]

    # 4. Across prompts, beside 002's heads ranked by attention on the subject (its newest run of this model).
    ranking_002, notes_002 = read_head_ranking(RESULTS_002, model.slug)
    across = AcrossPrompts.of(per_prompt, cfg.TOP_K, ranking_002, notes_002, seed=cfg.SEED)
    results = CircuitResults(model.name, model.n_layers, model.n_heads, model.n_kv_heads, cfg.METRIC, cfg.ABLATION,
                             sum(r.ablated_every for r in per_prompt), cfg.TOP_K, model.softcap,
                             attribution.norm_weight_convention(model.final_norm),
                             attribution.has_post_attention_norm(model), per_prompt, across)

    # 5. Write the run folder: numbers, settings, figures, the report a person reads; then say what to open.
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        record = results.as_record(REPO)
        run.write_json("results.json", record)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        run.write_text("report.md", write_report(results, draw_figures(run, results), model))
        html_report.write_page(run, record)
    report.finish_run(run.final_path, findings(results), results.failed_checks())
    return run.final_path


# ----------------------------------------------------------------------------- the prompts


def read_prompts(cfg) -> list[Prompt]:
    """The prompts: PROMPTS_FILE verbatim, or this folder's facts and cfg.FACTS more of the fact set (those not
    already here); METRIC='logit_diff' needs counterfactuals."""
    prompts = load_prompt_list(cfg.PROMPTS_FILE, HERE / "prompts.json")  # completion format: no tokenizer needed
    if not cfg.PROMPTS_FILE:
        prompts += fact_set_prompts(FACT_SET, cfg.FACTS, skip_ids={p.fact_id for p in prompts})
    for i, prompt in enumerate(prompts):
        counterfactual = prompt.extra.get("counterfactual")
        if cfg.METRIC == "logit_diff" and (not isinstance(counterfactual, str) or not counterfactual.strip()):
            raise LabError(f"PROMPTS_FILE entry {i} has no \"counterfactual\" answer, which METRIC='logit_diff' needs: "
                           "add one (e.g. \"London\" for a prompt whose target is \"Paris\") or use METRIC='logit'.")
    return prompts


def resolve(model, cfg, prompt: Prompt) -> tuple[Prompt, torch.Tensor, Target, Target | None]:
    """(prompt, input_ids [1, seq], target token, counterfactual token or None), checked for METRIC."""
    ids = encode(model, prompt.text)
    target = target_token(model.tokenizer, prompt.text, prompt.target)
    counterfactual = prompt.extra.get("counterfactual")
    counter = target_token(model.tokenizer, prompt.text, counterfactual) if counterfactual else None
    if cfg.METRIC == "logit_diff" and counter is None:
        raise LabError(f"The prompt {prompt.text!r} has no \"counterfactual\" answer, which METRIC='logit_diff' "
                       "needs: add one to its entry or use METRIC='logit'.")
    if cfg.METRIC == "logit_diff" and counter.token_id == target.token_id:
        raise LabError(f"The counterfactual {counterfactual!r} of prompt {prompt.text!r} starts with the same "
                       f"token as the target ({target.token!r}): pick an answer that differs in its first token.")
    return prompt, ids, target, counter


# ----------------------------------------------------------------------------- one prompt


@dataclass
class CleanRun:
    """One prompt's clean forward pass, which the attribution splits and the ablations start from."""
    ids: torch.Tensor  # [1, seq]
    cache: object  # the bridge's activations, attribution.cache_hook_names(model)
    target_id: int
    counter_id: int | None  # METRIC="logit_diff": the counterfactual's token; None for METRIC="logit"
    pre_softcap: torch.Tensor  # [vocab] float32: the lm_head output at the last position (before any soft-cap)
    probs: torch.Tensor  # [vocab] float32: the model's output probabilities (after it)

    @property
    def metric(self) -> float:
        """The metric as the model computes it, read from its own output (not from the attribution's pieces)."""
        return float(attribution.metric_from_logits(self.pre_softcap, self.target_id, self.counter_id))


def analyse_prompt(model, cfg, prompt: Prompt, ids: torch.Tensor, target: Target, counter: Target | None,
                   every: bool) -> PromptResult:
    """The metric of one prompt, split by direct logit attribution, confirmed by ablations (every head and MLP
    alone when `every`, else the top-k); each self-checked."""
    logits, cache = model.bridge.run_with_cache(ids.to(model.device), names_filter=attribution.cache_hook_names(model))
    clean = CleanRun(ids, cache, target.token_id, counter.token_id if cfg.METRIC == "logit_diff" else None,
                     cache[hooks.LOGITS][0, -1].float(), torch.softmax(logits[0, -1].float(), dim=-1))
    decomposition = attribution.decompose_last_position(model, cache)
    dla = attribution.attribute(model, decomposition, clean.target_id, clean.counter_id)
    checks = attribution.decomposition_checks(model, decomposition, dla, clean.metric, clean.pre_softcap,
                                              logits[0, -1].float())
    ablations, ablation_checks = ablate(model, cfg, clean, decomposition, dla, every)
    # Where position 0 (the attention sink) dwarfs the other positions, a "mean" is mostly its value.
    position0_heads, position0_mlps = attribution.position0_share(cache, model.n_layers)
    subject_positions, subject_attention = subject_attention_of(model, prompt, ids, cache)
    return PromptResult(
        prompt=prompt, target=target, counter=counter, tokens=token_strings(model.tokenizer, ids[0]),
        metric=clean.metric, target_prob=float(clean.probs[target.token_id]),
        top1_token=model.tokenizer.decode([int(clean.probs.argmax())]), attribution=dla,
        checks=checks + ablation_checks,
        top_heads=[divmod(i, model.n_heads) for i in top_indices(dla.heads.flatten(), cfg.TOP_K)],
        top_mlps=top_indices(dla.mlps, cfg.TOP_K), ablations=ablations, position0_heads=position0_heads,
        position0_mlps=position0_mlps, subject_positions=subject_positions, subject_attention=subject_attention,
        ablated_every=every)


def ablation_sets(dla: attribution.Attribution, top_k: int, ablate_every: bool) -> list[tuple[str, list, list]]:
    """(kind, heads [(layer, head)], MLP layers) per ablated set: nothing (the clean run, a self-check), the
    top-k writers with positive attribution together, then heads and MLPs alone (every one, or the top-k)."""
    n_layers, n_heads = dla.heads.shape
    heads = dla.heads.flatten()
    writer_heads = [divmod(i, n_heads) for i in top_indices(heads, top_k, by="signed") if heads[i] > 0]
    writer_mlps = [i for i in top_indices(dla.mlps, top_k, by="signed") if dla.mlps[i] > 0]
    single_heads = range(n_layers * n_heads) if ablate_every else top_indices(heads, top_k)
    single_mlps = range(n_layers) if ablate_every else top_indices(dla.mlps, top_k)
    return ([("clean", [], []), ("top heads", writer_heads, []), ("top MLPs", [], writer_mlps)]
            + [("head", [divmod(i, n_heads)], []) for i in single_heads]
            + [("mlp", [], [layer]) for layer in single_mlps])


def ablate(model, cfg, clean: CleanRun, decomposition, dla, every: bool) -> tuple[list[Ablation], list[dict]]:
    """Every ablated set of `ablation_sets` (the clean row left out), and the two self-checks of the ablations."""
    sets = ablation_sets(dla, cfg.TOP_K, every)
    head_mask, mlp_mask = ablation_masks(model.n_layers, model.n_heads, [(heads, mlps) for _, heads, mlps in sets])
    z_values, mlp_values = ablation_values(clean.cache, model.n_layers, cfg.ABLATION)
    metrics, probs = run_ablations(model, clean.ids, head_mask, mlp_mask, z_values, mlp_values, clean.target_id,
                                   clean.counter_id, batch_size=batch_size(cfg.BATCH_SIZE, model, clean.ids.shape[1]))
    direct_heads, direct_mlps = attribution.direct_effects_of_ablation(
        model, clean.cache, decomposition, z_values, mlp_values, clean.target_id, clean.counter_id)
    direct = [sum(float(direct_heads[l, h]) for l, h in heads) + sum(float(direct_mlps[l]) for l in mlps)
              for _, heads, mlps in sets]
    # The same direct effects through the model's own modules, and the clean row against the clean run.
    reference = attribution.direct_effects_by_the_model(model, clean.cache, z_values, mlp_values, head_mask,
                                                        mlp_mask, clean.target_id, clean.counter_id)
    # Batched and single forward passes may differ in the last float32 bits: tolerance relative to the logits.
    allowed = tolerance(model.dtype, clean.pre_softcap, 1e-5 * max(1.0, clean.pre_softcap.abs().max().item()))
    checks = [check("ablating nothing leaves the metric as it was", abs(float(metrics[0]) - clean.metric), allowed),
              attribution.direct_effect_check(model, reference, torch.tensor(direct), clean.pre_softcap)]
    clean_prob = float(clean.probs[clean.target_id])
    ablations = [Ablation(kind, heads, mlps, direct_effect=effect, total_effect=clean.metric - value, metric=value,
                          target_prob=prob, prob_change=prob - clean_prob,
                          dla=float(dla.heads[heads[0]]) if kind == "head" else
                          float(dla.mlps[mlps[0]]) if kind == "mlp" else None)
                 for (kind, heads, mlps), effect, value, prob in zip(sets[1:], direct[1:], metrics[1:].tolist(),
                                                                    probs[1:].tolist())]
    rank_single_ablations(ablations)
    return ablations, checks


def subject_attention_of(model, prompt: Prompt, ids: torch.Tensor, cache) -> tuple[list[int], torch.Tensor | None]:
    """(subject positions, attention mass [n_layers, n_heads] from the last position on them) or ([], None).

    The subject is the prompt's hand-given "subject" text, else 002's rule (capitalized words before the last
    token); position 0, the attention sink, is never counted (as 002 does by default).
    """
    text, offsets = token_offsets(model.tokenizer, prompt.text, ids[0].tolist())
    special_ids = set(model.tokenizer.all_special_ids)
    hand = {k: prompt.extra[k] for k in ("types", "subject") if k in prompt.extra}
    _, subject = label_prompt(text, offsets, [int(i) in special_ids for i in ids[0]], hand)
    positions = counted_positions(subject, include_bos=False)
    if not positions:
        return [], None
    final_rows = torch.stack([cache[hooks.block_site("pattern", layer)][0, :, -1].float().cpu()
                              for layer in range(model.n_layers)])  # [n_layers, n_heads, seq]
    return positions, mass_on(final_rows, positions)


if __name__ == "__main__":
    main(parse_toggles(globals()))
