"""003's results as typed objects, and how a run shows them: results.json records, report.md, figures, findings.

run.py computes one `PromptResult` per prompt (the metric read from the model, its direct logit attribution,
the self-checks, the ablations) and an `AcrossPrompts` summary; `CircuitResults` holds the run. Everything
here reads those objects by their fields; results.json is written from them (`as_record`) at the very end.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import stats
from common.attention_results import HeadRanking, interval_text
from common.attribution import Attribution, ranks, spearman, top_indices
from common.checks import worst_over_prompts
from common.prompts import Prompt, Target
from common.report import check_lines, display_path, fmt, heatmap, markdown_table, md_escape, plt

PROMPT_FIGURES = 8  # a per-prompt heatmap of the attribution for the first this many prompts (prompts.json's own)
MIN_PER_RELATION = 5  # the attention-vs-MLP split is broken down by relation for relations with this many prompts
KINDS = (("head", "heads"), ("mlp", "mlps"))  # single-ablation kinds and their plural in results.json


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# ----------------------------------------------------------------------------- one prompt


@dataclass
class Ablation:
    """One ablated set of components, and what ablating it did to the metric."""
    kind: str  # "top heads" / "top MLPs" (the positive top writers together), "head" / "mlp" (one alone)
    heads: list[tuple[int, int]]  # (layer, head) pairs ablated
    mlps: list[int]  # layers whose MLP is ablated
    direct_effect: float  # the metric lost through the direct path alone (the DLA of what the ablation removes)
    total_effect: float  # clean metric - ablated metric, measured by running the model
    metric: float  # the ablated metric
    target_prob: float  # the target's probability with the ablation
    prob_change: float  # that probability minus the clean one
    dla: float | None = None  # a single component's own attribution
    direct_rank: int | None = None  # single ablations: rank by |direct effect| among their kind (0 = largest)
    total_rank: int | None = None  # ... and by |total effect|

    @property
    def components(self) -> list[str]:
        return [head_name(layer, head) for layer, head in self.heads] + [f"MLP{layer}" for layer in self.mlps]

    def opposite_signs(self) -> bool:
        """Direct and total effect point opposite ways (and the total is not negligible: over 10% of the direct)."""
        return self.direct_effect * self.total_effect < 0 and abs(self.total_effect) > 0.1 * abs(self.direct_effect)

    def as_record(self) -> dict:
        record = {"kind": self.kind, "components": self.components, "direct_effect": self.direct_effect,
                  "total_effect": self.total_effect, "metric": self.metric, "target_prob": self.target_prob,
                  "prob_change": self.prob_change}
        if self.kind == "head":
            record.update(layer=self.heads[0][0], head=self.heads[0][1], dla=self.dla)
        elif self.kind == "mlp":
            record.update(layer=self.mlps[0], dla=self.dla)
        if self.direct_rank is not None:
            record.update(direct_rank=self.direct_rank, total_rank=self.total_rank)
        return record


def rank_single_ablations(ablations: list[Ablation]):
    """Give each single ablation its rank (0 = largest) by |direct effect| and by |total effect| in its kind."""
    for kind, _ in KINDS:
        singles = [a for a in ablations if a.kind == kind]
        if not singles:
            continue
        direct = ranks(torch.tensor([abs(a.direct_effect) for a in singles])).tolist()
        total = ranks(torch.tensor([abs(a.total_effect) for a in singles])).tolist()
        for ablation, d, t in zip(singles, direct, total):
            ablation.direct_rank, ablation.total_rank = d, t


@dataclass
class PromptResult:
    """One prompt: its metric as the model computes it, the attribution that splits it, checks and ablations."""
    prompt: Prompt
    target: Target
    counter: Target | None  # the counterfactual answer's first token (METRIC="logit_diff"; None when not given)
    tokens: list[str]
    metric: float  # read from the model's own output (its lm_head, before any soft-cap), not from the attribution
    target_prob: float
    top1_token: str
    attribution: Attribution
    checks: list[dict]
    top_heads: list[tuple[int, int]]  # the top-k heads by |DLA|, largest first
    top_mlps: list[int]  # the top-k MLP layers by |DLA|
    ablations: list[Ablation]  # "top heads", "top MLPs", then the single ones
    position0_heads: torch.Tensor  # [n_layers, n_heads]: position 0's output norm / median of the others (hook_z)
    position0_mlps: torch.Tensor  # [n_layers]: the same for hook_mlp_out
    subject_positions: list[int]
    subject_attention: torch.Tensor | None  # [n_layers, n_heads]: mass from the last position on the subject
    ablated_every: bool = False  # every head and MLP was ablated alone (else only the top-k)

    def singles(self, kind: str) -> list[Ablation]:
        return [a for a in self.ablations if a.kind == kind]

    def joint(self, kind: str) -> Ablation:
        """The "top heads" or "top MLPs" ablation."""
        return next(a for a in self.ablations if a.kind == kind)

    def agreement(self, top_k: int) -> dict:
        """Per kind: Spearman correlation of direct and total effects, and how many of the top-k by |direct| are
        also in the top-k by |total| (among the components ablated alone), with the sign flips among them."""
        out = {}
        for kind, plural in KINDS:
            singles = self.singles(kind)
            k = min(top_k, len(singles))
            top = [a for a in singles if a.direct_rank < k]
            out[plural] = {"n_ablated": len(singles),
                           "spearman": spearman(torch.tensor([a.direct_effect for a in singles]),
                                                torch.tensor([a.total_effect for a in singles])),
                           "k": k, "top_k_overlap": sum(1 for a in top if a.total_rank < k),
                           "sign_flips_in_top_k": sum(1 for a in top if a.opposite_signs())}
        return out

    def as_record(self, top_k: int) -> dict:
        counter, heads = self.counter, self.attribution.heads
        return {"prompt": self.prompt.text, "target": self.prompt.target, "target_token_id": self.target.token_id,
                "target_token": self.target.token, "target_n_tokens": self.target.n_tokens,
                "counterfactual": self.prompt.extra.get("counterfactual"),
                "counter_token_id": counter.token_id if counter else None,
                "counter_token": counter.token if counter else None, "fact_id": self.prompt.fact_id,
                "relation": self.prompt.extra.get("relation"), "tokens": self.tokens, "metric": self.metric,
                "target_prob": self.target_prob, "ablated_every": self.ablated_every,
                "top1_token": self.top1_token, "attribution": self.attribution.as_record(),
                "self_checks": self.checks,
                "top_heads": [{"layer": l, "head": h, "dla": float(heads[l, h])} for l, h in self.top_heads],
                "top_mlps": [{"layer": l, "dla": float(self.attribution.mlps[l])} for l in self.top_mlps],
                "ablations": [a.as_record() for a in self.ablations], "agreement": self.agreement(top_k),
                "position0_share": {"heads": self.position0_heads.tolist(), "mlps": self.position0_mlps.tolist()},
                "subject": self.prompt.extra.get("subject"), "subject_positions": self.subject_positions,
                "subject_attention": None if self.subject_attention is None else self.subject_attention.tolist()}


# ----------------------------------------------------------------------------- across prompts


@dataclass
class FrequentHead:
    """A head in the top-k by |DLA| of at least one prompt."""
    layer: int
    head: int
    n_prompts_in_top_k: int
    in_top_k: dict  # common.stats.proportion over all prompts: the share where it is in the top-k, with interval
    mean_dla: float
    dla: dict  # common.stats.interval: its DLA, mean over all prompts with interval
    mean_total_effect: float | None  # over the prompts where it was ablated alone (None: never)
    n_ablated: int
    mean_subject_attention: float | None
    subject_attention_rank: int | None  # 0 = the head that looks at the subject most


@dataclass
class SubjectHead:
    """One of the heads that attend most to the subject, and what it writes."""
    layer: int
    head: int
    mean_subject_attention: float
    n_prompts_in_top_k: int
    mean_dla: float


@dataclass
class AcrossPrompts:
    """Means over the prompts, the heads that recur in the top-k, and subject attention beside them."""
    n_prompts: int
    n_prompts_with_subject: int
    mean_heads: torch.Tensor  # [n_layers, n_heads]: DLA per head
    mean_attn_per_layer: torch.Tensor  # [n_layers]
    mean_mlps: torch.Tensor  # [n_layers]
    mean_subject_attention: torch.Tensor | None  # [n_layers, n_heads]
    frequent_heads: list[FrequentHead]  # most frequent first
    subject_heads: list[SubjectHead]  # most attention on the subject first
    run_002: HeadRanking | None  # 002's ranking of the heads by attention on the subject, when a run was found
    notes_002: list[str] = field(default_factory=list)  # 002 runs passed over, and why
    split: dict = field(default_factory=dict)  # attention vs MLPs over the prompts (`attention_vs_mlps`)
    split_by_relation: dict = field(default_factory=dict)  # {relation: the same} where n >= MIN_PER_RELATION
    direct_vs_total: dict = field(default_factory=dict)  # _agreement_over_every_component

    @classmethod
    def of(cls, results: list[PromptResult], top_k: int, run_002: HeadRanking | None,
           notes_002: list[str], seed: int = 0) -> AcrossPrompts:
        heads = torch.stack([r.attribution.heads for r in results])  # [prompts, L, H]
        counts = torch.zeros(heads.shape[1:], dtype=torch.long)  # [L, H]: prompts with the head in their top-k
        for r in results:
            for layer, head in r.top_heads:
                counts[layer, head] += 1
        with_subject = [r.subject_attention for r in results if r.subject_attention is not None]
        subject = torch.stack(with_subject).mean(0) if with_subject else None  # [L, H]
        return cls(n_prompts=len(results), n_prompts_with_subject=len(with_subject), mean_heads=heads.mean(0),
                   mean_attn_per_layer=torch.stack([r.attribution.attn_per_layer for r in results]).mean(0),
                   mean_mlps=torch.stack([r.attribution.mlps for r in results]).mean(0),
                   mean_subject_attention=subject,
                   frequent_heads=_frequent_heads(results, heads, counts, subject, seed),
                   subject_heads=_subject_heads(heads, counts, subject, top_k), run_002=run_002, notes_002=notes_002,
                   split=attention_vs_mlps(results, seed), split_by_relation=_split_by_relation(results, seed),
                   direct_vs_total=_agreement_over_every_component(results, top_k, seed))

    def as_record(self, root: Path) -> dict:
        subject = self.mean_subject_attention
        return {"n_prompts": self.n_prompts, "n_prompts_with_subject": self.n_prompts_with_subject,
                "mean_heads": self.mean_heads.tolist(), "mean_attn_per_layer": self.mean_attn_per_layer.tolist(),
                "mean_mlps": self.mean_mlps.tolist(),
                "mean_subject_attention": subject.tolist() if subject is not None else None,
                "attention_vs_mlps": self.split, "attention_vs_mlps_by_relation": self.split_by_relation,
                "direct_vs_total": self.direct_vs_total,
                "frequent_heads": [asdict(h) for h in self.frequent_heads],
                "subject_heads": [asdict(h) for h in self.subject_heads],
                "run_002": self.run_002.as_record(root) if self.run_002 else None}


def attention_vs_mlps(results: list[PromptResult], seed: int = 0) -> dict:
    """What all heads and all MLPs write directly, over the prompts, each as common.stats' {"value", "ci95", "n"}:
    "attention" and "mlps" (sums over heads / MLPs, mean over prompts), "attention_minus_mlps" (paired, prompt
    by prompt) and "attention_share" (Attribution.attention_share, mean over prompts)."""
    attention = [float(r.attribution.heads.sum()) for r in results]
    mlps = [float(r.attribution.mlps.sum()) for r in results]
    return {"attention": stats.interval(attention, seed=seed), "mlps": stats.interval(mlps, seed=seed),
            "attention_minus_mlps": stats.paired_difference(attention, mlps, seed=seed),
            "attention_share": stats.interval([r.attribution.attention_share() for r in results], seed=seed)}


def _agreement_over_every_component(results: list[PromptResult], top_k: int, seed: int) -> dict:
    """How well the direct effect (DLA) ranks the total effect (ablation) over every head and MLP, across the
    prompts where each was ablated alone (ABLATE_EVERY_PROMPTS): per kind, the median Spearman correlation and
    the mean overlap of the top-k by |direct| and by |total|, with intervals. {} when no prompt was."""
    every = [r for r in results if r.ablated_every]
    if not every:
        return {}
    out = {"n_prompts": len(every)}
    for _, plural in KINDS:
        agreements = [r.agreement(top_k)[plural] for r in every]
        out[plural] = {"spearman_median": stats.interval([a["spearman"] if a["spearman"] == a["spearman"] else None
                                                          for a in agreements], "median", seed=seed),
                       "top_k_overlap_mean": stats.interval([a["top_k_overlap"] for a in agreements], seed=seed),
                       "k": agreements[0]["k"]}
    return out


def _split_by_relation(results: list[PromptResult], seed: int) -> dict:
    """{relation: attention_vs_mlps over its prompts} for the relations with at least MIN_PER_RELATION prompts."""
    groups: dict[str, list[PromptResult]] = {}
    for r in results:
        if r.prompt.extra.get("relation"):
            groups.setdefault(r.prompt.extra["relation"], []).append(r)
    return {relation: attention_vs_mlps(group, seed) for relation, group in groups.items()
            if len(group) >= MIN_PER_RELATION}


def _frequent_heads(results: list[PromptResult], heads: torch.Tensor, counts: torch.Tensor,
                    subject: torch.Tensor | None, seed: int = 0) -> list[FrequentHead]:
    """Heads in some prompt's top-k, by how many prompts (then |mean DLA|); heads: [prompts, L, H]."""
    total = torch.full_like(heads, float("nan"))  # [prompts, L, H]: total effect where ablated alone
    for p, r in enumerate(results):
        for a in r.singles("head"):
            total[p, a.heads[0][0], a.heads[0][1]] = a.total_effect
    subject_rank = ranks(subject.flatten()).view(subject.shape) if subject is not None else None
    n_layers, n_heads = counts.shape
    frequent = sorted(((int(counts[l, h]), float(heads[:, l, h].mean().abs()), l, h)
                       for l in range(n_layers) for h in range(n_heads) if counts[l, h] > 0), reverse=True)
    rows = []
    for count, _, l, h in frequent:
        seen = ~torch.isnan(total[:, l, h])
        rows.append(FrequentHead(
            layer=l, head=h, n_prompts_in_top_k=count,
            in_top_k=stats.proportion([(l, h) in r.top_heads for r in results], seed=seed),
            mean_dla=float(heads[:, l, h].mean()), dla=stats.interval(heads[:, l, h].tolist(), seed=seed),
            mean_total_effect=float(total[seen, l, h].mean()) if seen.any() else None, n_ablated=int(seen.sum()),
            mean_subject_attention=float(subject[l, h]) if subject is not None else None,
            subject_attention_rank=int(subject_rank[l, h]) if subject_rank is not None else None))
    return rows


def _subject_heads(heads: torch.Tensor, counts: torch.Tensor, subject: torch.Tensor | None,
                   top_k: int) -> list[SubjectHead]:
    """The top-k heads by mean attention on the subject (none without a subject); heads: [prompts, L, H]."""
    if subject is None:
        return []
    n_heads = subject.shape[1]
    return [SubjectHead(layer=l, head=h, mean_subject_attention=float(subject[l, h]),
                        n_prompts_in_top_k=int(counts[l, h]), mean_dla=float(heads[:, l, h].mean()))
            for l, h in (divmod(i, n_heads) for i in top_indices(subject.flatten(), top_k, by="signed"))]


# ----------------------------------------------------------------------------- the run


@dataclass
class CircuitResults:
    """One run of 003 on one model: the settings that shape the numbers, every prompt, the summary."""
    model: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    metric: str  # "logit" or "logit_diff"
    ablation: str  # "zero" or "mean"
    ablated_every: int  # on how many prompts every head and MLP was ablated alone (the first ones)
    top_k: int
    softcap: float | None
    final_norm_weight: str  # "w" or "1 + w": how the final norm applies its weight (read by running it)
    post_attention_norm: bool
    prompts: list[PromptResult]
    across: AcrossPrompts

    def failed_checks(self) -> list[str]:
        return [c["name"] for r in self.prompts for c in r.checks if not c["passed"]]

    def as_record(self, root: Path) -> dict:
        """results.json (the folder of 002's run written relative to `root`, the repository)."""
        return {"experiment": "003_circuit_analysis", "model": self.model, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "metric": self.metric,
                "ablation": self.ablation, "ablated_every": self.ablated_every, "top_k": self.top_k,
                "softcap": self.softcap, "final_norm_weight": self.final_norm_weight,
                "post_attention_norm": self.post_attention_norm,
                "prompts": [r.as_record(self.top_k) for r in self.prompts],
                "across_prompts": self.across.as_record(root)}


# ----------------------------------------------------------------------------- findings and figures


def findings(results: CircuitResults) -> list[str]:
    """The headlines in plain words: the strongest direct writer, and attention vs MLPs."""
    across, n = results.across, results.across.n_prompts
    lines = []
    if across.frequent_heads:
        top = across.frequent_heads[0]
        lines.append(f"Head {head_name(top.layer, top.head)} writes the {results.metric} most often: in the top "
                     f"{results.top_k} for {top.n_prompts_in_top_k} of {n} prompts "
                     f"({interval_text(top.in_top_k, percent=True)}), mean direct attribution "
                     f"{interval_text(top.dla, 2)} (mean [95% interval]).")
    split = across.split
    lines.append(f"Summed over layers, attention heads write {interval_text(split['attention'], 2)} and MLPs "
                 f"{interval_text(split['mlps'], 2)} of the {results.metric} directly (mean [95% interval] over "
                 f"{n} prompts); attention's share {interval_text(split['attention_share'], percent=True)}.")
    return lines


def _head_map(results: CircuitResults, matrix: torch.Tensor, title: str):
    limit = float(matrix.abs().max()) or 1.0
    return heatmap(matrix.numpy(), list(range(results.n_layers)), [f"H{h}" for h in range(results.n_heads)], title,
                   f"{results.metric} attribution", cmap="RdBu_r", vmin=-limit, vmax=limit, xlabel="head",
                   ylabel="layer")


def draw_figures(run, results: CircuitResults) -> dict:
    """Heatmaps layer x head of the attribution, bars per layer (attention vs MLP), direct vs total effects."""
    name, metric, across = results.model, results.metric, results.across
    figures = {"heads": run.save_figure("dla_heads_mean.png", _head_map(
        results, across.mean_heads, f"{name}: direct attribution of the {metric} per head, mean over "
                                    f"{across.n_prompts} prompts")),
               "heads_per_prompt": [run.save_figure(f"dla_heads_prompt{p}.png", _head_map(
                   results, r.attribution.heads, f"{name}: {r.prompt.text!r} -> {r.target.token!r}"))
                   for p, r in enumerate(results.prompts[:PROMPT_FIGURES])]}
    figures["layers"] = run.save_figure("attn_vs_mlp_per_layer.png", _per_layer_bars(results))
    figures["direct_vs_total"] = run.save_figure("direct_vs_total.png", _direct_vs_total(results))
    return figures


def _per_layer_bars(results: CircuitResults):
    """Bars per layer: what its attention and its MLP write, mean over prompts, with bootstrap 95% error bars."""
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * results.n_layers + 2), 4))
    x = np.arange(results.n_layers)
    for offset, label, per_prompt in ((-0.2, "attention (sum of heads)", [r.attribution.attn_per_layer for r in
                                                                          results.prompts]),
                                      (0.2, "MLP", [r.attribution.mlps for r in results.prompts])):
        value, lo, hi = stats.band(torch.stack(per_prompt).numpy())  # [n_layers] each; NaN with one prompt
        ax.bar(x + offset, value, width=0.4, label=label,
               yerr=None if np.isnan(lo).all() else np.stack([value - lo, hi - value]), capsize=1.5)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(x, list(range(results.n_layers)), fontsize=7)
    ax.set(xlabel="layer", ylabel=f"{results.metric} attribution, mean over prompts",
           title=f"{results.model}: what each layer writes to the {results.metric} (bars: 95% interval)")
    ax.legend()
    return fig


def _direct_vs_total(results: CircuitResults):
    """Scatter of every single ablation's direct effect against its total effect, with the diagonal."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for kind, label in (("head", "heads"), ("mlp", "MLPs")):
        points = [(a.direct_effect, a.total_effect) for r in results.prompts for a in r.singles(kind)]
        if points:
            ax.scatter(*zip(*points), s=10, alpha=0.6, label=label)
    limits = ax.get_xlim() + ax.get_ylim()
    low, high = min(limits), max(limits)
    ax.plot([low, high], [low, high], color="gray", linewidth=0.8, label="total = direct")
    ax.set(xlabel=f"direct effect (DLA of what the {results.ablation} ablation removes)",
           ylabel=f"total effect (clean - ablated {results.metric})",
           title=f"{results.model}: direct vs total effect, single ablations")
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- report.md


def write_report(results: CircuitResults, figures: dict, model) -> str:
    """report.md: how the numbers were made, the self-checks, then the tables, per prompt and across prompts."""
    out = _method(results, model) + ["## Self-checks (worst over the prompts)", "",
                                     check_lines(worst_over_prompts([r.checks for r in results.prompts])), ""]
    if results.ablation == "mean":
        out += [position0_warning(results.prompts), ""]
    out += _split_over_prompts(results) + _split_table(results)
    out += ["## Figures", "", f"![mean attribution per head]({figures['heads']})", "",
            f"![attention vs MLP per layer]({figures['layers']})", "",
            f"![direct vs total effect]({figures['direct_vs_total']})", ""]
    out += ["## Attention vs MLP per layer (mean over prompts)", ""]
    rows = [[layer, f"{100 * (layer + 1) / results.n_layers:.0f}%", attn, mlp, attn + mlp] for layer, (attn, mlp)
            in enumerate(zip(results.across.mean_attn_per_layer.tolist(), results.across.mean_mlps.tolist()))]
    out += [markdown_table(["layer", "depth", "attention", "MLP", "both"], rows), ""]
    out += [f"## Per prompt: top {results.top_k} heads and MLPs, confirmed by ablation", "",
            "Sorted by |attribution| (DLA), with its sign. Ranks (1 = largest) by |direct effect| and by "
            "|total effect| are among the components ablated alone. Δp = change of the target's probability when "
            "the component is ablated.", ""]
    for p, r in enumerate(results.prompts):
        figure = figures["heads_per_prompt"][p] if p < len(figures["heads_per_prompt"]) else None
        out += _prompt_section(results, r, figure)
    return "\n".join(out + _agreement_table(results) + _recurring_heads(results))


def _method(results: CircuitResults, model) -> list[str]:
    """The report's first lines: the model, the metric, how DLA and ablation are computed, the device notes."""
    metric_text = ("the logit of the target" if results.metric == "logit"
                   else "logit(target) - logit(counterfactual answer)")
    cap = (f" {results.model} soft-caps its final logits ({results.softcap:g} * tanh(x / {results.softcap:g})); "
           "the attribution is of the logits **before** the soft-cap, the probabilities are after it."
           if results.softcap else "")
    post = (" The attention output passes through a post-attention norm before it joins the residual stream; "
            "its scale is frozen from the run too (then it is linear), so the heads still add up exactly to "
            "hook_attn_out." if results.post_attention_norm else "")
    ablation_text = ("zero" if results.ablation == "zero"
                     else "its mean over this prompt's positions (each prompt's own mean)")
    return [f"# 003 circuit analysis: {results.model}", "",
            f"{results.n_layers} layers x {results.n_heads} heads ({results.n_kv_heads} key/value heads), "
            f"device {model.device}, dtype {str(model.dtype).replace('torch.', '')}, {len(results.prompts)} prompts.",
            "", f"**Metric**: {metric_text}, at the last prompt position.{cap}", "",
            "**Direct logit attribution**: the residual stream entering the final norm is split into the "
            "embeddings, every head (its hook_z times its slice of W_O), every MLP (hook_mlp_out) and the biases. "
            "The final norm is handled the standard way: its scale rms(x_final) is **frozen from the actual run**, "
            f"so each piece p contributes (p / rms) * w @ W_U[answer]; the norm multiplies by "
            f"`{results.final_norm_weight}` (read by running the module, not assumed).{post} The pieces add "
            "up to the model's own metric; the self-checks below show the residual.", "",
            f"**Ablation**: a head's hook_z (or an MLP's output) is replaced at every position by {ablation_text}. "
            "Total effect = clean metric - ablated metric (positive: the component helps the answer). Direct "
            "effect = the attribution of what the ablation removes at the last position (for zero ablation, the "
            "DLA itself); the difference flows through later layers. "
            + (f"Every head and every MLP is ablated alone on the first {results.ablated_every} of the prompts "
               f"(ABLATE_EVERY_PROMPTS); on the others the top {results.top_k} heads and MLPs by |attribution|."
               if results.ablated_every else
               f"The top {results.top_k} heads and MLPs by |attribution| are ablated alone."), "",
            *[f"Note: {note}" for note in model.notes], ""]  # device check, offloaded layers


def position0_warning(prompts: list[PromptResult]) -> str:
    """A measured caveat of mean ablation: components whose mean over positions is mostly position 0's value."""
    heads = torch.stack([r.position0_heads for r in prompts])  # [prompts, L, H]
    mlps = torch.stack([r.position0_mlps for r in prompts])  # [prompts, L]
    big_heads, big_mlps = (heads > 10).any(0), (mlps > 10).any(0)
    if not (big_heads.any() or big_mlps.any()):
        return "Mean ablation: on every prompt, position 0 is within 10x of the other positions' output norms."
    names = [f"MLP{l}" for l in big_mlps.nonzero().flatten().tolist()]
    listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return (f"**Caveat of mean ablation**: the mean includes position 0 (the attention sink). For "
            f"{int(big_heads.sum())} heads and {int(big_mlps.sum())} MLPs ({listed}) "
            f"position 0's output is over 10x the median of the other positions on some prompt (largest ratio: "
            f"heads {float(heads.max()):.0f}x, MLPs {float(mlps.max()):.0f}x), so their mean is mostly position 0's "
            "massive activation, and mean ablation writes it into every position: their total effects measure "
            "that damage more than the component's role.")


def _split_row(label: str, split: dict) -> list:
    return [label, split["attention"]["n"], interval_text(split["attention"]), interval_text(split["mlps"]),
            interval_text(split["attention_minus_mlps"]), interval_text(split["attention_share"], percent=True)]


def _split_over_prompts(results: CircuitResults) -> list[str]:
    """Attention vs MLPs over all prompts and per relation, each a mean with its bootstrap 95% interval."""
    across = results.across
    rows = [_split_row("all prompts", across.split)] + [_split_row(relation, split) for relation, split
                                                         in across.split_by_relation.items()]
    return ["## Attention vs MLPs over the prompts", "",
            f"What all heads and all MLPs write directly to the {results.metric}: mean over the prompts [seeded "
            "bootstrap 95% interval over the prompts, common/stats.py]. Attention - MLPs is paired prompt by "
            "prompt. Attention's share = a / (|a| + |m|) per prompt (a, m: the sums over heads and over MLPs), "
            f"then its mean: 50% = equal parts, 100% = all from attention. Per relation where it has at least "
            f"{MIN_PER_RELATION} prompts.", "",
            markdown_table(["prompts", "n", "attention", "MLPs", "attention - MLPs", "attention's share"], rows), ""]


def _split_table(results: CircuitResults) -> list[str]:
    """One row per prompt: the metric and its parts (embed, attention, MLPs, biases), the top head and MLP."""
    rows = []
    for r in results.prompts:
        a, (layer, head), mlp = r.attribution, r.top_heads[0], r.top_mlps[0]
        answer = md_escape(r.target.token) + (f" vs {md_escape(r.counter.token)}" if results.metric == "logit_diff"
                                              else "")
        rows.append([md_escape(r.prompt.text), answer, r.target_prob, md_escape(r.top1_token), r.metric, a.embed,
                     sum(a.attn_per_layer.tolist()), sum(a.mlps.tolist()), a.bias, a.total(),
                     f"{head_name(layer, head)} {float(a.heads[layer, head]):+.4f}",
                     f"MLP{mlp} {float(a.mlps[mlp]):+.4f}"])
    return ["## The metric, split", "",
            "Attention = the sum of all heads; biases = o_proj and unembedding biases (none in most models); "
            "sum = embed + attention + MLPs + biases, which equals the model's metric.", "",
            markdown_table(["prompt", "answer", "p(target)", "top-1", results.metric, "embed", "attention", "MLPs",
                            "biases", "sum", "top head", "top MLP"], rows), ""]


def _prompt_section(results: CircuitResults, r: PromptResult, figure: str | None) -> list[str]:
    """One prompt: its top heads and MLPs beside their ablations, the joint ablations, agreement, disagreements."""
    metric = results.metric
    note = (f" (the answer spans {r.target.n_tokens} tokens; the first is attributed)" if r.target.n_tokens > 1
            else "")
    out = [f"### {md_escape(r.prompt.text)} -> {md_escape(r.target.token)}{note}", "",
           f"{metric} {r.metric:.6f}, p(target) {r.target_prob:.6f}."
           + (f" [attribution per head]({figure})" if figure else ""), ""]
    single = {(a.kind, a.components[0]): a for kind, _ in KINDS for a in r.singles(kind)}
    for kind, label, top in (("head", "head", [head_name(l, h) for l, h in r.top_heads]),
                             ("mlp", "MLP", [f"MLP{l}" for l in r.top_mlps])):
        rows = [[name, a.dla, a.direct_effect, a.total_effect, a.prob_change, a.direct_rank + 1, a.total_rank + 1]
                for name, a in ((name, single[(kind, name)]) for name in top)]
        out += [markdown_table([label, "DLA", "direct effect", "total effect", "Δp", "rank direct", "rank total"],
                               rows), ""]
    for kind in ("top heads", "top MLPs"):
        a = r.joint(kind)
        if not a.components:
            out.append(f"- No {kind[4:-1]} of the top {results.top_k} has a positive attribution: nothing to "
                       "ablate together.")
        else:
            out.append(f"- Ablating the {kind} with positive attribution together ({', '.join(a.components)}): "
                       f"{metric} changes by {-a.total_effect:+.6f} (direct part {-a.direct_effect:+.6f}), "
                       f"p(target) {r.target_prob:.6f} -> {a.target_prob:.6f}.")
    for plural, g in r.agreement(results.top_k).items():
        out.append(f"- {plural}: Spearman(direct, total) over {g['n_ablated']} ablated = {fmt(g['spearman'])}; "
                   f"{g['top_k_overlap']} of the top {g['k']} by |direct| are in the top {g['k']} by |total|; "
                   f"{g['sign_flips_in_top_k']} sign flip(s).")
    lines = disagreements(r, results.top_k, r.ablated_every)
    if not lines:
        return out + ["", "Direct and total effects agree on the top components.", ""]
    return out + ["", f"<details><summary>Where direct and total effect disagree ({len(lines)} components)"
                      "</summary>", ""] + [f"- {line}" for line in lines] + ["", "</details>", ""]


def disagreements(r: PromptResult, top_k: int, ablate_every: bool) -> list[str]:
    """Sentences naming where direct effect (DLA) and total effect (ablation) disagree, for one prompt.

    For the top-k by |direct effect|: opposite signs, or a total effect under half or over twice the direct
    one. With every component ablated, also the top-k by |total effect| that are not in the top-k by direct.
    """
    lines = []
    for kind, label in (("head", "head"), ("mlp", "MLP")):
        singles = r.singles(kind)
        k = min(top_k, len(singles))
        for a in sorted(singles, key=lambda a: a.direct_rank)[:k]:
            name, direct, total = a.components[0], a.direct_effect, a.total_effect
            numbers = f"direct {direct:+.4f}, total {total:+.4f}"
            if a.opposite_signs():
                lines.append(f"{label} {name}: opposite signs ({numbers}): the rest of the model more than undoes "
                             "what it writes directly.")
            elif abs(total) < 0.5 * abs(direct):
                lines.append(f"{label} {name}: ablation confirms less than half of its direct effect ({numbers}): "
                             "the rest of the model compensates (later layers, or the final norm's new scale).")
            elif abs(total) > 2 * abs(direct):
                lines.append(f"{label} {name}: total effect over twice its direct effect ({numbers}): it also "
                             "acts through later layers.")
        if ablate_every:
            for a in sorted(singles, key=lambda a: a.total_rank)[:k]:
                if a.direct_rank >= k:
                    lines.append(f"{label} {a.components[0]}: #{a.total_rank + 1} by |total effect| "
                                 f"({a.total_effect:+.4f}) but only #{a.direct_rank + 1} by |direct effect| "
                                 f"({a.direct_effect:+.4f}): it acts mostly through later layers.")
    return lines


def _agreement_summary(results: CircuitResults) -> list[str]:
    """The direct-vs-total agreement over every component, summarized across the prompts ablated in full."""
    summary = results.across.direct_vs_total
    if not summary:
        return []
    n = summary["n_prompts"]
    lines = [f"Over every head and MLP, on the {n} prompt{'s' * (n != 1)} where each was ablated alone "
             "(95% bootstrap intervals over those prompts):", ""]
    for _, plural in KINDS:
        g = summary[plural]
        lines.append(f"- {plural}: Spearman(direct, total), median {interval_text(g['spearman_median'])}; of the "
                     f"top {g['k']} by |direct|, also top {g['k']} by |total|: mean "
                     f"{interval_text(g['top_k_overlap_mean'], 2)}.")
    return lines + [""]


def _agreement_table(results: CircuitResults) -> list[str]:
    """Across prompts: how well direct and total effects agree, and what the joint ablations do."""
    k, metric, rows = results.top_k, results.metric, []
    for r in results.prompts:
        g, heads, mlps = r.agreement(k), r.joint("top heads"), r.joint("top MLPs")
        rows.append([md_escape(r.prompt.text), "all" if r.ablated_every else f"top {k}",
                     g["heads"]["spearman"], g["heads"]["top_k_overlap"],
                     g["heads"]["sign_flips_in_top_k"], g["mlps"]["spearman"], g["mlps"]["top_k_overlap"],
                     g["mlps"]["sign_flips_in_top_k"], -heads.total_effect, heads.target_prob,
                     -mlps.total_effect, mlps.target_prob])
    return ["## Across prompts: direct vs total effect", "", *_agreement_summary(results),
            f"Per prompt: rank agreement of direct and total effects (Spearman, over the components ablated alone), "
            f"how many of the top {k} by |direct| are also top {k} by |total|, sign flips among "
            "them, and what ablating the positive top writers together does to the metric and p(target). "
            f"'ablated' says over which components: 'all' (every head and MLP alone) or 'top {k}' (only the top {k} "
            f"by |direct|, so their overlap is {k} by construction and their Spearman is among the strongest "
            "writers only): do not compare the two kinds of row.", "",
            markdown_table(["prompt", "ablated", "heads Spearman", "heads overlap", "heads flips", "MLPs Spearman",
                            "MLPs overlap", "MLPs flips", f"Δ{metric}, top heads off", "p, top heads off",
                            f"Δ{metric}, top MLPs off", "p, top MLPs off"], rows), ""]


def _subject_note(across: AcrossPrompts) -> str:
    """What the subject-attention columns mean, and where 002's ranking came from (or why there is none)."""
    note = (f"Subject attention = mass from the last position on the subject's tokens (position 0, the sink, "
            f"excluded), mean over the {across.n_prompts_with_subject} prompts that name a subject; rank 1 = the "
            "head that looks at the subject most." if across.mean_subject_attention is not None
            else "No prompt names a subject, so there is no subject attention to compare.")
    run_002 = across.run_002
    if run_002:
        note += (f" 002 column: the head's rank by subject attention in the 002 run `{display_path(run_002.folder)}` "
                 f"({run_002.n_prompts} prompts of its own, only layers {run_002.layers[0]}-{run_002.layers[-1]}; "
                 "'-' = outside that band).")
    else:
        note += " No 002 run folder of this model was found, so subject attention is computed here only."
    return " ".join([note] + across.notes_002)


def _rank_002(across: AcrossPrompts, layer: int, head: int) -> list[str]:
    """The 002 column of a head ('' column when there is no 002 run)."""
    if not across.run_002:
        return []
    entry = across.run_002.rank_of(layer, head)
    return [f"#{entry.rank + 1} ({entry.mean:.3f})" if entry else "-"]


def _recurring_heads(results: CircuitResults) -> list[str]:
    """The heads in some prompt's top-k beside their attention on the subject (here and in 002's run)."""
    across, k = results.across, results.top_k
    column_002 = ["002 rank"] if across.run_002 else []
    rows = [[head_name(h.layer, h.head), h.n_prompts_in_top_k, interval_text(h.in_top_k, percent=True),
             interval_text(h.dla, 4), h.mean_total_effect if h.mean_total_effect is not None else "-", h.n_ablated,
             h.mean_subject_attention if h.mean_subject_attention is not None else "-",
             h.subject_attention_rank + 1 if h.subject_attention_rank is not None else "-"]
            + _rank_002(across, h.layer, h.head) for h in across.frequent_heads[:25]]
    out = ["## Across prompts: recurring heads beside attention on the subject", "",
           f"Heads in the top {k} by |DLA| of at least one prompt, most frequent first. Share in top {k} and "
           f"mean DLA over all {across.n_prompts} prompts with seeded bootstrap 95% intervals; mean total effect over "
           f"the prompts where the head was ablated alone (n ablated: the first ones, where every head is, and those "
           f"where it made the top {k}; a selected subset, so it is not comparable with the mean DLA beside it). "
           + _subject_note(across), "",
           markdown_table(["head", f"prompts in top {k}", f"share in top {k} [95% CI]", "mean DLA [95% CI]",
                           "mean total effect", "n ablated", "subject attention", "subject rank"] + column_002,
                          rows), ""]
    if across.subject_heads:
        rows = [[head_name(h.layer, h.head), h.mean_subject_attention, h.n_prompts_in_top_k, h.mean_dla]
                + _rank_002(across, h.layer, h.head) for h in across.subject_heads]
        out += [f"The {len(rows)} heads that attend most to the subject, and what they write:", "",
                markdown_table(["head", "subject attention", f"prompts in top {k}", "mean DLA"] + column_002, rows),
                ""]
    return out
