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

Run:   python 003_circuit_analysis/run.py
Help:  python 003_circuit_analysis/run.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `common` imports from any folder

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
PROMPTS_FILE = None  # None = this folder's prompts.json; else a JSON list of {"prompt", "target"}, optional "counterfactual", "subject"
METRIC = "logit"  # one of "logit" or "logit_diff": the target's logit, or logit(target) - logit(counterfactual answer)
TOP_K = 10  # how many heads and MLPs to list and ablate (top by |attribution|)
ABLATION = "zero"  # one of "zero" or "mean": what an ablated head or MLP outputs ("mean" = its mean over the prompt's positions)
ABLATE_EVERY = True  # also ablate every head and every MLP alone: the full ranking by total effect (slower)
BATCH_SIZE = "auto"  # ablated copies of a prompt per forward pass: "auto" = from free memory and the model's shapes, or a number
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed (the analysis itself is deterministic)
# ----------------------------------------------------------------------------- end of toggles

from common.checks import check, tolerance  # noqa: E402
from common import hooks  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.prompts import load_prompt_list  # noqa: E402
from common.progress import progress  # noqa: E402
from common.errors import LabError  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERIMENT = "003_circuit_analysis"


def load_prompt_list_for(cfg, tokenizer=None):
    """The prompts: PROMPTS_FILE verbatim, or this folder's facts; METRIC='logit_diff' needs counterfactuals."""
    prompts = load_prompt_list(cfg.PROMPTS_FILE, HERE / "prompts.json", tokenizer)
    for i, prompt in enumerate(prompts):
        counterfactual = prompt.extra.get("counterfactual")
        if cfg.METRIC == "logit_diff" and (not isinstance(counterfactual, str) or not counterfactual.strip()):
            raise LabError(f"PROMPTS_FILE entry {i} has no \"counterfactual\" answer, which METRIC='logit_diff' needs: "
                           "add one (e.g. \"London\" for a prompt whose target is \"Paris\") or use METRIC='logit'.")
    return prompts


def main(cfg):
    import torch

    from common import attribution, html_report, report
    from common.models import load_model
    from common.prompts import encode, target_token

    # 1. Check every input that can be checked without the model.
    if cfg.TOP_K < 1:
        raise LabError(f"TOP_K must be at least 1, not {cfg.TOP_K}.")
    if cfg.PROMPTS_FILE:
        load_prompt_list_for(cfg)
    torch.manual_seed(cfg.SEED)
    torch.set_grad_enabled(False)

    # 2. Load the model; resolve every prompt's target (and counterfactual) before any heavy work.
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    if model.offloaded:  # the attribution reads each layer's o_proj weight, which offloading leaves on "meta"
        raise LabError("003 cannot yet attribute through offloaded layers: run it without MAX_MEMORY_GB (or with "
                       "a value large enough that the run's note says nothing is offloaded).")
    if not all(hasattr(layer.self_attn, "o_proj") for layer in model.hf_model.model.layers):
        raise LabError(f"{model.name}'s attention has no o_proj to split into heads: 003 supports Llama, Qwen3, "
                       "Mistral and Gemma style models.")
    items = []
    for prompt in load_prompt_list_for(cfg, model.tokenizer):
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
        items.append((prompt, ids, target, counter))

    # 3. Per prompt: attribution, ablations, attention on the subject.
    records = [analyse_prompt(model, cfg, prompt, ids, target, counter) for prompt, ids, target, counter in
               progress(items, f"attributing {cfg.METRIC}, {cfg.ABLATION} ablation", unit="prompt")]
    results = {"experiment": EXPERIMENT, "model": model.name, "n_layers": model.n_layers,
               "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "metric": cfg.METRIC,
               "ablation": cfg.ABLATION, "ablate_every": cfg.ABLATE_EVERY, "top_k": cfg.TOP_K,
               "softcap": model.softcap,
               "final_norm_weight": attribution.norm_weight_convention(model.final_norm),
               "post_attention_norm": attribution.has_post_attention_norm(model), "prompts": records}
    results["across_prompts"] = across_prompts(records, model, cfg.TOP_K)

    # 4. Write the run folder: numbers, settings, figures, and the report a person reads.
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        figures = draw_figures(run, results)
        run.write_text("report.md", write_report(results, figures, model, cfg))
        html_report.write_page(run, results)
    failed = [c["name"] for record in records for c in record["self_checks"] if not c["passed"]]
    report.finish_run(run.final_path, findings(results), failed)
    return run.final_path


def findings(results) -> list[str]:
    """The headlines in plain words: the strongest direct writer, and attention vs MLPs."""
    across, n = results["across_prompts"], results["across_prompts"]["n_prompts"]
    lines = []
    if across["frequent_heads"]:
        top = across["frequent_heads"][0]
        lines.append(f"Head {head_name(top['layer'], top['head'])} writes the {results['metric']} most often: in the "
                     f"top {results['top_k']} for {top['n_prompts_in_top_k']} of {n} prompts, mean direct "
                     f"attribution {top['mean_dla']:+.2f}.")
    attn, mlps = sum(across["mean_attn_per_layer"]), sum(across["mean_mlps"])
    lines.append(f"Summed over layers, attention heads write {attn:+.2f} and MLPs {mlps:+.2f} of the "
                 f"{results['metric']} directly (mean over {n} prompts).")
    return lines


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# ----------------------------------------------------------------------------- one prompt


def analyse_prompt(model, cfg, prompt, ids, target, counter) -> dict:
    """Attribution, ablations and subject attention of one prompt, as its results.json record."""
    import torch

    from common import attribution as A
    from common.batching import batch_size
    from common.prompts import token_strings
    counter_id = counter.token_id if cfg.METRIC == "logit_diff" else None
    n_layers, n_heads = model.n_layers, model.n_heads

    # Direct logit attribution from one cached run.
    logits, cache = model.bridge.run_with_cache(ids.to(model.device), names_filter=A.cache_hook_names(model))
    logits = logits[0, -1].float()
    pre_softcap = cache[hooks.LOGITS][0, -1].float()
    decomposition = A.decompose_last_position(model, cache)
    attribution = A.attribute(model, decomposition, target.token_id, counter_id)
    metric = float(A.metric_from_logits(pre_softcap, target.token_id, counter_id))
    probs = torch.softmax(logits, dim=-1)
    checks = A.decomposition_checks(model, decomposition, attribution, metric, pre_softcap, logits)

    # Ablations: the clean run (a check), the top writers together, then single components.
    heads_flat = attribution.heads.flatten()
    top_heads = A.top_indices(heads_flat, cfg.TOP_K)
    top_mlps = A.top_indices(attribution.mlps, cfg.TOP_K)
    writer_heads = [i for i in A.top_indices(heads_flat, cfg.TOP_K, by="signed") if heads_flat[i] > 0]
    writer_mlps = [i for i in A.top_indices(attribution.mlps, cfg.TOP_K, by="signed") if attribution.mlps[i] > 0]
    single_heads = range(n_layers * n_heads) if cfg.ABLATE_EVERY else top_heads
    single_mlps = range(n_layers) if cfg.ABLATE_EVERY else top_mlps
    sets = ([("clean", [], [])]
            + [("top heads", [divmod(i, n_heads) for i in writer_heads], [])]
            + [("top MLPs", [], writer_mlps)]
            + [("head", [divmod(i, n_heads)], []) for i in single_heads]
            + [("mlp", [], [layer]) for layer in single_mlps])
    head_mask, mlp_mask = A.ablation_masks(n_layers, n_heads, [(h, m) for _, h, m in sets])
    z_values, mlp_values = A.ablation_values(cache, n_layers, cfg.ABLATION)
    ablated_metric, ablated_prob = A.run_ablations(
        model, ids, head_mask, mlp_mask, z_values, mlp_values, target.token_id, counter_id,
        batch_size=batch_size(cfg.BATCH_SIZE, model, ids.shape[1]))
    direct_heads, direct_mlps = A.direct_effects_of_ablation(model, cache, decomposition, z_values, mlp_values,
                                                             target.token_id, counter_id)
    # Batched and single forward passes may differ in the last float32 bits: tolerance relative to the logits.
    allowed = tolerance(model.dtype, pre_softcap, 1e-5 * max(1.0, pre_softcap.abs().max().item()))
    checks.append(check("ablating nothing leaves the metric as it was", abs(float(ablated_metric[0]) - metric),
                        allowed))

    ablations = []
    for (kind, heads, mlps), value, prob in zip(sets[1:], ablated_metric[1:].tolist(), ablated_prob[1:].tolist()):
        direct = sum(float(direct_heads[l, h]) for l, h in heads) + sum(float(direct_mlps[l]) for l in mlps)
        entry = {"kind": kind, "components": [head_name(l, h) for l, h in heads] + [f"MLP{l}" for l in mlps],
                 "direct_effect": direct, "total_effect": metric - value, "metric": value, "target_prob": prob,
                 "prob_change": prob - float(probs[target.token_id])}
        if kind == "head":
            entry.update(layer=heads[0][0], head=heads[0][1], dla=float(attribution.heads[heads[0]]))
        elif kind == "mlp":
            entry.update(layer=mlps[0], dla=float(attribution.mlps[mlps[0]]))
        ablations.append(entry)
    mark_ranks(ablations)

    # Where position 0 (the attention sink) dwarfs the other positions, a "mean" is mostly its value.
    sink_heads, sink_mlps = A.position0_share(cache, n_layers)

    # Attention from the last position on the subject entity (002's labelling rule, common/attention.py).
    subject_positions, subject_attention = subject_attention_of(model, prompt, ids, cache)

    return {"prompt": prompt.text, "target": prompt.target, "target_token_id": target.token_id,
            "target_token": target.token, "target_n_tokens": target.n_tokens,
            "counterfactual": prompt.extra.get("counterfactual"),
            "counter_token_id": counter.token_id if counter else None, "counter_token": counter.token if counter else None,
            "fact_id": prompt.fact_id, "tokens": token_strings(model.tokenizer, ids[0]),
            "metric": metric, "target_prob": float(probs[target.token_id]),
            "top1_token": model.tokenizer.decode([int(probs.argmax())]),
            "attribution": {"embed": attribution.embed, "heads": attribution.heads.tolist(),
                            "mlps": attribution.mlps.tolist(), "attn_per_layer": attribution.attn_per_layer.tolist(),
                            "attn_bias": attribution.attn_bias.tolist(), "unembed_bias": attribution.unembed_bias,
                            "bias": attribution.bias, "total": attribution.total()},
            "self_checks": checks,
            "top_heads": [{"layer": i // n_heads, "head": i % n_heads, "dla": float(heads_flat[i])} for i in top_heads],
            "top_mlps": [{"layer": i, "dla": float(attribution.mlps[i])} for i in top_mlps],
            "ablations": ablations, "agreement": agreement(ablations, cfg.TOP_K),
            "position0_share": {"heads": sink_heads.tolist(), "mlps": sink_mlps.tolist()},
            "subject": prompt.extra.get("subject"), "subject_positions": subject_positions,
            "subject_attention": subject_attention.tolist() if subject_attention is not None else None}


def mark_ranks(ablations: list[dict]):
    """Add to each single ablation its rank (0 = largest) by |direct effect| and by |total effect| in its kind."""
    import torch

    from common.attribution import ranks
    for kind in ("head", "mlp"):
        entries = [a for a in ablations if a["kind"] == kind]
        if not entries:
            continue
        direct = ranks(torch.tensor([abs(a["direct_effect"]) for a in entries])).tolist()
        total = ranks(torch.tensor([abs(a["total_effect"]) for a in entries])).tolist()
        for entry, d, t in zip(entries, direct, total):
            entry.update(direct_rank=d, total_rank=t)


def agreement(ablations: list[dict], top_k: int) -> dict:
    """Per kind: Spearman correlation of direct and total effects, and how many of the top-k by |direct|
    are also in the top-k by |total| (among the components ablated alone)."""
    import torch

    from common.attribution import spearman
    out = {}
    for kind, name in (("head", "heads"), ("mlp", "mlps")):
        entries = [a for a in ablations if a["kind"] == kind]
        k = min(top_k, len(entries))
        direct = torch.tensor([a["direct_effect"] for a in entries])
        total = torch.tensor([a["total_effect"] for a in entries])
        overlap = sum(1 for a in entries if a["direct_rank"] < k and a["total_rank"] < k)
        sign = sum(1 for a in entries if a["direct_rank"] < k and opposite_signs(a))
        out[name] = {"n_ablated": len(entries), "spearman": spearman(direct, total), "k": k,
                     "top_k_overlap": overlap, "sign_flips_in_top_k": sign}
    return out


def subject_attention_of(model, prompt, ids, cache):
    """(subject positions, attention mass [n_layers, n_heads] from the last position on them) or ([], None).

    The subject is the prompt's hand-given "subject" text, else 002's rule (capitalized words before the last
    token); position 0, the attention sink, is never counted (as 002 does by default).
    """
    import torch

    from common import attention as att
    text, offsets = att.token_offsets(model.tokenizer, prompt.text, ids[0].tolist())
    special_ids = set(model.tokenizer.all_special_ids)
    hand = {k: prompt.extra[k] for k in ("types", "subject") if k in prompt.extra}
    _, subject = att.label_prompt(text, offsets, [int(i) in special_ids for i in ids[0]], hand)
    positions = att.counted_positions(subject, include_bos=False)
    if not positions:
        return [], None
    final_rows = torch.stack([cache[hooks.block_site("pattern", layer)][0, :, -1].float().cpu()
                              for layer in range(model.n_layers)])  # [n_layers, n_heads, seq]
    return positions, att.mass_on(final_rows, positions)


# ----------------------------------------------------------------------------- across prompts


def across_prompts(records: list[dict], model, top_k: int) -> dict:
    """Means over prompts, how often each head is in a prompt's top-k, and subject attention beside it."""
    import torch
    n_heads = model.n_heads
    heads = torch.tensor([r["attribution"]["heads"] for r in records])  # [prompts, L, H]
    counts = torch.zeros(model.n_layers, n_heads, dtype=torch.long)
    for r in records:
        for h in r["top_heads"]:
            counts[h["layer"], h["head"]] += 1
    total = torch.full_like(heads, float("nan"))
    for p, r in enumerate(records):
        for a in r["ablations"]:
            if a["kind"] == "head":
                total[p, a["layer"], a["head"]] = a["total_effect"]
    with_subject = [r["subject_attention"] for r in records if r["subject_attention"] is not None]
    subject = torch.tensor(with_subject).mean(0) if with_subject else None  # [L, H]
    subject_rank = None
    if subject is not None:
        from common.attribution import ranks
        subject_rank = ranks(subject.flatten()).view(model.n_layers, n_heads)
    frequent = sorted(((int(counts[l, h]), float(heads[:, l, h].mean().abs()), l, h)
                       for l in range(model.n_layers) for h in range(n_heads) if counts[l, h] > 0), reverse=True)
    rows = []
    for count, _, l, h in frequent:
        seen = ~torch.isnan(total[:, l, h])
        rows.append({"layer": l, "head": h, "n_prompts_in_top_k": count, "mean_dla": float(heads[:, l, h].mean()),
                     "mean_total_effect": float(total[seen, l, h].mean()) if seen.any() else None,
                     "n_ablated": int(seen.sum()),
                     "mean_subject_attention": float(subject[l, h]) if subject is not None else None,
                     "subject_attention_rank": int(subject_rank[l, h]) if subject_rank is not None else None})
    top_subject = []
    if subject is not None:
        from common.attribution import top_indices
        for i in top_indices(subject.flatten(), top_k, by="signed"):
            l, h = divmod(i, n_heads)
            top_subject.append({"layer": l, "head": h, "mean_subject_attention": float(subject[l, h]),
                                "n_prompts_in_top_k": int(counts[l, h]), "mean_dla": float(heads[:, l, h].mean())})
    return {"n_prompts": len(records), "n_prompts_with_subject": len(with_subject),
            "mean_heads": heads.mean(0).tolist(),
            "mean_attn_per_layer": torch.tensor([r["attribution"]["attn_per_layer"] for r in records]).mean(0).tolist(),
            "mean_mlps": torch.tensor([r["attribution"]["mlps"] for r in records]).mean(0).tolist(),
            "mean_subject_attention": subject.tolist() if subject is not None else None,
            "frequent_heads": rows, "subject_heads": top_subject,
            "run_002": read_002_ranking(model.slug)}


def read_002_ranking(model_slug: str) -> dict | None:
    """The newest 002 run folder of this model, if there is one: its heads ranked by attention on the subject.

    002 covers only its band of depth (DEPTH_RANGE) and its own prompts. Returns None when there is no run
    or its results.json does not have the fields read here.
    """
    import json
    folders = sorted((HERE.parent / "002_attention_patterns" / "results" / model_slug).glob("*/results.json"))
    for path in reversed(folders):
        try:
            data = json.loads(path.read_text())
            ranking = [{"rank": rank, "layer": int(h["layer"]), "head": int(h["head"]), "mean": float(h["mean"]),
                        "top_rate": float(h["top_rate"])} for rank, h in enumerate(data["head_ranking"])]
            return {"folder": str(path.parent.relative_to(HERE.parent)), "layers": list(data["layers"]),
                    "depth_range": data.get("depth_range"), "n_prompts": len(data.get("prompts", [])),
                    "ranking": ranking}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ----------------------------------------------------------------------------- figures


def draw_figures(run, results) -> dict:
    """Heatmaps layer x head of the attribution, bars per layer (attention vs MLP), direct vs total effects."""
    import numpy as np

    from common.report import heatmap, plt
    name, metric = results["model"], results["metric"]
    across = results["across_prompts"]
    layers = list(range(results["n_layers"]))
    heads = [f"H{h}" for h in range(results["n_heads"])]

    def head_map(matrix, title):
        limit = float(np.abs(np.asarray(matrix)).max()) or 1.0
        return heatmap(matrix, layers, heads, title, f"{metric} attribution", cmap="RdBu_r", vmin=-limit,
                       vmax=limit, xlabel="head", ylabel="layer")

    figures = {"heads": run.save_figure("dla_heads_mean.png", head_map(
        across["mean_heads"], f"{name}: direct attribution of the {metric} per head, mean over "
                              f"{across['n_prompts']} prompts"))}
    figures["heads_per_prompt"] = [
        run.save_figure(f"dla_heads_prompt{p}.png", head_map(r["attribution"]["heads"],
                                                             f"{name}: {r['prompt']!r} -> {r['target_token']!r}"))
        for p, r in enumerate(results["prompts"])]

    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 2), 4))
    x = np.arange(len(layers))
    ax.bar(x - 0.2, across["mean_attn_per_layer"], width=0.4, label="attention (sum of heads)")
    ax.bar(x + 0.2, across["mean_mlps"], width=0.4, label="MLP")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(x, layers, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{metric} attribution, mean over prompts")
    ax.set_title(f"{name}: what each layer writes to the {metric}")
    ax.legend()
    figures["layers"] = run.save_figure("attn_vs_mlp_per_layer.png", fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for kind, label in (("head", "heads"), ("mlp", "MLPs")):
        points = [(a["direct_effect"], a["total_effect"]) for r in results["prompts"] for a in r["ablations"]
                  if a["kind"] == kind]
        if points:
            ax.scatter(*zip(*points), s=10, alpha=0.6, label=label)
    limits = ax.get_xlim() + ax.get_ylim()
    low, high = min(limits), max(limits)
    ax.plot([low, high], [low, high], color="gray", linewidth=0.8, label="total = direct")
    ax.set_xlabel(f"direct effect (DLA of what the {results['ablation']} ablation removes)")
    ax.set_ylabel(f"total effect (clean - ablated {metric})")
    ax.set_title(f"{name}: direct vs total effect, single ablations")
    ax.legend(fontsize=8)
    figures["direct_vs_total"] = run.save_figure("direct_vs_total.png", fig)
    return figures


# ----------------------------------------------------------------------------- report


def worst_checks(records: list[dict]) -> list[dict]:
    """Each self-check once, with its worst value over the prompts."""
    worst = {}
    for record in records:
        for check in record["self_checks"]:
            seen = worst.get(check["name"])
            if seen is None or check["max_abs_diff"] - check["tolerance"] > seen["max_abs_diff"] - seen["tolerance"]:
                worst[check["name"]] = dict(check, passed=check["passed"] and (seen is None or seen["passed"]))
            elif not check["passed"]:
                seen["passed"] = False
    return list(worst.values())


def opposite_signs(a: dict) -> bool:
    """Direct and total effect point opposite ways (and the total is not negligible: over 10% of the direct)."""
    return a["direct_effect"] * a["total_effect"] < 0 and abs(a["total_effect"]) > 0.1 * abs(a["direct_effect"])


def disagreements(record: dict, top_k: int, ablate_every: bool) -> list[str]:
    """Sentences naming where direct effect (DLA) and total effect (ablation) disagree, for one prompt.

    For the top-k by |direct effect|: opposite signs, or a total effect under half or over twice the direct
    one. With every component ablated, also the top-k by |total effect| that are not in the top-k by direct.
    """
    lines = []
    for kind, label in (("head", "head"), ("mlp", "MLP")):
        entries = [a for a in record["ablations"] if a["kind"] == kind]
        k = min(top_k, len(entries))
        for a in sorted(entries, key=lambda a: a["direct_rank"])[:k]:
            name, direct, total = a["components"][0], a["direct_effect"], a["total_effect"]
            numbers = f"direct {direct:+.4f}, total {total:+.4f}"
            if opposite_signs(a):
                lines.append(f"{label} {name}: opposite signs ({numbers}): the rest of the model more than undoes "
                             "what it writes directly.")
            elif abs(total) < 0.5 * abs(direct):
                lines.append(f"{label} {name}: ablation confirms less than half of its direct effect ({numbers}): "
                             "the rest of the model compensates (later layers, or the final norm's new scale).")
            elif abs(total) > 2 * abs(direct):
                lines.append(f"{label} {name}: total effect over twice its direct effect ({numbers}): it also "
                             "acts through later layers.")
        if ablate_every:
            for a in sorted(entries, key=lambda a: a["total_rank"])[:k]:
                if a["direct_rank"] >= k:
                    lines.append(f"{label} {a['components'][0]}: #{a['total_rank'] + 1} by |total effect| "
                                 f"({a['total_effect']:+.4f}) but only #{a['direct_rank'] + 1} by |direct effect| "
                                 f"({a['direct_effect']:+.4f}): it acts mostly through later layers.")
    return lines


def position0_warning(records: list[dict]) -> str:
    """A measured caveat of mean ablation: components whose mean over positions is mostly position 0's value."""
    import torch
    heads = torch.tensor([r["position0_share"]["heads"] for r in records])  # [prompts, L, H]
    mlps = torch.tensor([r["position0_share"]["mlps"] for r in records])  # [prompts, L]
    big_heads, big_mlps = (heads > 10).any(0), (mlps > 10).any(0)
    if not (big_heads.any() or big_mlps.any()):
        return "Mean ablation: on every prompt, position 0 is within 10x of the other positions' output norms."
    names = [f"MLP{l}" for l in big_mlps.nonzero().flatten().tolist()]
    return (f"**Caveat of mean ablation**: the mean includes position 0 (the attention sink). For {int(big_heads.sum())} "
            f"heads and {int(big_mlps.sum())} MLPs ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}) "
            f"position 0's output is over 10x the median of the other positions on some prompt (largest ratio: "
            f"heads {float(heads.max()):.0f}x, MLPs {float(mlps.max()):.0f}x), so their mean is mostly position 0's "
            "massive activation, and mean ablation writes it into every position: their total effects measure "
            "that damage more than the component's role.")


def write_report(results, figures, model, cfg) -> str:
    from common.report import check_lines, fmt, markdown_table, md_escape
    metric, records, across = results["metric"], results["prompts"], results["across_prompts"]
    metric_text = ("the logit of the target" if metric == "logit"
                   else "logit(target) - logit(counterfactual answer)")
    cap = (f" {model.name} soft-caps its final logits ({model.softcap:g} * tanh(x / {model.softcap:g})); the "
           "attribution is of the logits **before** the soft-cap, the probabilities are after it."
           if model.softcap else "")
    post = (" The attention output passes through a post-attention norm before it joins the residual stream; "
            "its scale is frozen from the run too (then it is linear), so the heads still add up exactly to "
            "hook_attn_out." if results["post_attention_norm"] else "")
    ablation_text = ("zero" if cfg.ABLATION == "zero" else
                     "its mean over this prompt's positions (each prompt's own mean)")
    out = [f"# 003 circuit analysis: {results['model']}", "",
           f"{results['n_layers']} layers x {results['n_heads']} heads ({results['n_kv_heads']} key/value heads), "
           f"device {model.device}, dtype {str(model.dtype).replace('torch.', '')}, {len(records)} prompts.", "",
           f"**Metric**: {metric_text}, at the last prompt position.{cap}", "",
           "**Direct logit attribution**: the residual stream entering the final norm is split into the "
           "embeddings, every head (its hook_z times its slice of W_O), every MLP (hook_mlp_out) and the biases. "
           "The final norm is handled the standard way: its scale rms(x_final) is **frozen from the actual run**, "
           f"so each piece p contributes (p / rms) * w @ W_U[answer]; the norm multiplies by "
           f"`{results['final_norm_weight']}` (read by running the module, not assumed).{post} The pieces add "
           "up to the model's own metric; the self-checks below show the residual.", "",
           f"**Ablation**: a head's hook_z (or an MLP's output) is replaced at every position by {ablation_text}. "
           "Total effect = clean metric - ablated metric (positive: the component helps the answer). Direct "
           "effect = the attribution of what the ablation removes at the last position (for zero ablation, the "
           "DLA itself); the difference flows through later layers. "
           + ("Every head and every MLP is ablated alone." if cfg.ABLATE_EVERY else
              f"The top {cfg.TOP_K} heads and MLPs by |attribution| are ablated alone."), "",
           *[f"Note: {note}" for note in model.notes], "",  # device check, offloaded layers
           "## Self-checks (worst over the prompts)", "", check_lines(worst_checks(records)), ""]
    if cfg.ABLATION == "mean":
        out += [position0_warning(records), ""]

    rows = []
    for r in records:
        a = r["attribution"]
        best_head = r["top_heads"][0]
        rows.append([md_escape(r["prompt"]), md_escape(r["target_token"]) + (
            f" vs {md_escape(r['counter_token'])}" if metric == "logit_diff" else ""), r["target_prob"],
            md_escape(r["top1_token"]), r["metric"], a["embed"], sum(a["attn_per_layer"]), sum(a["mlps"]), a["bias"],
            a["total"], f"{head_name(best_head['layer'], best_head['head'])} {best_head['dla']:+.4f}",
            f"MLP{r['top_mlps'][0]['layer']} {r['top_mlps'][0]['dla']:+.4f}"])
    out += ["## The metric, split", "",
            "Attention = the sum of all heads; biases = o_proj and unembedding biases (none in most models); "
            "sum = embed + attention + MLPs + biases, which equals the model's metric.", "",
            markdown_table(["prompt", "answer", "p(target)", "top-1", metric, "embed", "attention", "MLPs", "biases",
                            "sum", "top head", "top MLP"], rows), ""]

    out += ["## Figures", "", f"![mean attribution per head]({figures['heads']})", "",
            f"![attention vs MLP per layer]({figures['layers']})", "",
            f"![direct vs total effect]({figures['direct_vs_total']})", ""]

    out += ["## Attention vs MLP per layer (mean over prompts)", ""]
    rows = [[layer, f"{100 * (layer + 1) / results['n_layers']:.0f}%", attn, mlp, attn + mlp]
            for layer, (attn, mlp) in enumerate(zip(across["mean_attn_per_layer"], across["mean_mlps"]))]
    out += [markdown_table(["layer", "depth", "attention", "MLP", "both"], rows), ""]

    out += [f"## Per prompt: top {cfg.TOP_K} heads and MLPs, confirmed by ablation", "",
            "Sorted by |attribution| (DLA), with its sign. Ranks (1 = largest) by |direct effect| and by "
            "|total effect| are among the components ablated alone. Δp = change of the target's probability when "
            "the component is ablated.", ""]
    for p, r in enumerate(records):
        single = {(a["kind"], a["components"][0]): a for a in r["ablations"] if a["kind"] in ("head", "mlp")}
        note = f" (the answer spans {r['target_n_tokens']} tokens; the first is attributed)" \
            if r["target_n_tokens"] > 1 else ""
        out += [f"### {md_escape(r['prompt'])} -> {md_escape(r['target_token'])}{note}", "",
                f"{metric} {r['metric']:.6f}, p(target) {r['target_prob']:.6f}. "
                f"[attribution per head]({figures['heads_per_prompt'][p]})", ""]
        for kind, label, top in (("head", "head", r["top_heads"]), ("mlp", "MLP", r["top_mlps"])):
            rows = []
            for entry in top:
                name = head_name(entry["layer"], entry["head"]) if kind == "head" else f"MLP{entry['layer']}"
                a = single[(kind, name)]
                rows.append([name, entry["dla"], a["direct_effect"], a["total_effect"], a["prob_change"],
                             a["direct_rank"] + 1, a["total_rank"] + 1])
            out += [markdown_table([label, "DLA", "direct effect", "total effect", "Δp", "rank direct",
                                    "rank total"], rows), ""]
        for a in r["ablations"]:
            if a["kind"] in ("top heads", "top MLPs") and not a["components"]:
                out.append(f"- No {a['kind'][4:-1]} of the top {cfg.TOP_K} has a positive attribution: nothing to "
                           "ablate together.")
            elif a["kind"] in ("top heads", "top MLPs"):
                which = ", ".join(a["components"])
                out.append(f"- Ablating the {a['kind']} with positive attribution together ({which}): {metric} "
                           f"changes by {-a['total_effect']:+.6f} (direct part {-a['direct_effect']:+.6f}), "
                           f"p(target) {r['target_prob']:.6f} -> {a['target_prob']:.6f}.")
        for kind in ("heads", "mlps"):
            g = r["agreement"][kind]
            out.append(f"- {kind}: Spearman(direct, total) over {g['n_ablated']} ablated = {fmt(g['spearman'])}; "
                       f"{g['top_k_overlap']} of the top {g['k']} by |direct| are in the top {g['k']} by |total|; "
                       f"{g['sign_flips_in_top_k']} sign flip(s).")
        lines = disagreements(r, cfg.TOP_K, cfg.ABLATE_EVERY)
        if lines:
            out += ["", f"<details><summary>Where direct and total effect disagree ({len(lines)} components)"
                        "</summary>", ""] + [f"- {line}" for line in lines] + ["", "</details>", ""]
        else:
            out += ["", "Direct and total effects agree on the top components.", ""]

    out += ["## Across prompts: direct vs total effect", "",
            f"Per prompt: rank agreement of direct and total effects (Spearman, over the components ablated alone), "
            f"how many of the top {cfg.TOP_K} by |direct| are also top {cfg.TOP_K} by |total|, sign flips among "
            "them, and what ablating the positive top writers together does to the metric and p(target).", ""]
    rows = []
    for r in records:
        joint = {a["kind"]: a for a in r["ablations"] if a["kind"] in ("top heads", "top MLPs")}
        g = r["agreement"]
        rows.append([md_escape(r["prompt"]), g["heads"]["spearman"], g["heads"]["top_k_overlap"],
                     g["heads"]["sign_flips_in_top_k"], g["mlps"]["spearman"], g["mlps"]["top_k_overlap"],
                     g["mlps"]["sign_flips_in_top_k"], -joint["top heads"]["total_effect"],
                     joint["top heads"]["target_prob"], -joint["top MLPs"]["total_effect"],
                     joint["top MLPs"]["target_prob"]])
    out += [markdown_table(["prompt", "heads Spearman", "heads overlap", "heads flips", "MLPs Spearman",
                            "MLPs overlap", "MLPs flips", f"Δ{metric}, top heads off", "p, top heads off",
                            f"Δ{metric}, top MLPs off", "p, top MLPs off"], rows), ""]

    out += ["## Across prompts: recurring heads beside attention on the subject", ""]
    subject_note = (f"Subject attention = mass from the last position on the subject's tokens (position 0, the "
                    f"sink, excluded), mean over the {across['n_prompts_with_subject']} prompts that name a subject; "
                    "rank 1 = the head that looks at the subject most." if across["mean_subject_attention"]
                    else "No prompt names a subject, so there is no subject attention to compare.")
    run_002 = across["run_002"]
    by_002 = {(h["layer"], h["head"]): h for h in run_002["ranking"]} if run_002 else {}
    if run_002:
        subject_note += (f" 002 column: the head's rank by subject attention in the 002 run "
                         f"`{run_002['folder']}` ({run_002['n_prompts']} prompts of its own, only layers "
                         f"{run_002['layers'][0]}-{run_002['layers'][-1]}; '-' = outside that band).")
    else:
        subject_note += " No 002 run folder of this model was found, so subject attention is computed here only."
    out += [f"Heads in the top {cfg.TOP_K} by |DLA| of at least one prompt, most frequent first. " + subject_note, ""]

    def rank_002(layer, head):
        entry = by_002.get((layer, head))
        return f"#{entry['rank'] + 1} ({entry['mean']:.3f})" if entry else "-"

    rows = [[head_name(h["layer"], h["head"]), h["n_prompts_in_top_k"], h["mean_dla"],
             h["mean_total_effect"] if h["mean_total_effect"] is not None else "-",
             h["mean_subject_attention"] if h["mean_subject_attention"] is not None else "-",
             h["subject_attention_rank"] + 1 if h["subject_attention_rank"] is not None else "-"]
            + ([rank_002(h["layer"], h["head"])] if run_002 else []) for h in across["frequent_heads"][:25]]
    out += [markdown_table(["head", f"prompts in top {cfg.TOP_K}", "mean DLA", "mean total effect",
                            "subject attention", "subject rank"] + (["002 rank"] if run_002 else []), rows), ""]
    if across["subject_heads"]:
        rows = [[head_name(h["layer"], h["head"]), h["mean_subject_attention"], h["n_prompts_in_top_k"],
                 h["mean_dla"]] + ([rank_002(h["layer"], h["head"])] if run_002 else [])
                for h in across["subject_heads"]]
        out += [f"The {len(rows)} heads that attend most to the subject, and what they write:", "",
                markdown_table(["head", "subject attention", f"prompts in top {cfg.TOP_K}", "mean DLA"]
                               + (["002 rank"] if run_002 else []), rows), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main(parse_toggles(globals()))
