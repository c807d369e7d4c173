"""002's results as typed objects, and everything a person reads from them: results.json, figures, report.md.

PromptResult is one prompt (its labels, where its final position looks, what the model predicts);
AttentionStudy is the whole run. results.json is written from them by `AttentionStudy.to_json` (its schema
is in analyses.md; 003 reads "layers" and "head_ranking"); report.md and the figures read the same objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.attention import BUCKETS, Band, FinalPositionAttention, LabelledPrompt, RankedHead, batches_by_length
from common.attention_results import interval_text
from common.report import check_lines, heatmap, markdown_table, md_escape, plt, visible_token

EXPERIMENT = "002_attention_patterns"
PATTERN_FIGURES = 4  # the top heads' patterns are drawn for the first this many prompts (of prompts.json): size
SHORT = {"sink": "S", "special": "X", "entity": "E", "relation": "R", "function": "F", "punctuation": "P"}


def float32_digits(value: float) -> float:
    """A float32 value with the 7 significant digits float32 holds (its float64 form adds 10 digits of noise)."""
    return float(f"{value:.7g}")


@dataclass
class PromptResult:
    """One prompt of the run."""
    labelled: LabelledPrompt
    attention: FinalPositionAttention
    top1_token: str  # the model's most likely next token
    target_prob: float  # the probability of the answer's first token

    @property
    def buckets(self) -> list[str]:
        """[seq]: where each position's mass is counted (its type, or "sink" at position 0)."""
        return [BUCKETS[b] for b in self.labelled.bucket_index]

    def as_record(self, band: Band) -> dict:
        """The prompt as results.json holds it: tokens with their types, and per layer, per head the final
        position's attention row and its mass on the subject (float32's 7 significant digits).

        The masses by bucket, on the sink, the previous and the final token follow exactly from final_row and
        "buckets" and are not stored: at 60+ prompts they would make results.json over 5 MB.
        """
        p, a = self.labelled, self.attention
        layers = [{"layer": layer, "depth": band.depth(layer), "local_window": band.local_windows.get(layer),
                   "heads": [{"head": h, "kv_head": band.kv_head_of_head[h],
                              "subject": float32_digits(float(a.subject[b, h])),
                              "final_row": [float32_digits(x) for x in a.final_rows[b, h].tolist()]}
                             for h in range(band.n_heads)]}
                  for b, layer in enumerate(band.layers)]
        return {"prompt": p.prompt.text, "target": p.prompt.target, "target_token_id": p.target.token_id,
                "target_token": p.target.token, "fact_id": p.prompt.fact_id,
                "relation": p.prompt.extra.get("relation"), "tokens": p.tokens,
                "token_types": p.token_types, "buckets": self.buckets, "label_source": p.label_source,
                "subject_positions": p.subject_positions, "top1_token": self.top1_token,
                "target_prob": self.target_prob, "layers": layers}


@dataclass
class AttentionStudy:
    """The whole run: the band, every prompt, the heads ranked by attention on the subject, the self-checks."""
    model_name: str
    band: Band
    depth_range: tuple
    include_bos: bool
    prompts_per_forward: int
    prompts: list[PromptResult]
    ranking: list[RankedHead]
    checks: list[dict]

    def to_json(self) -> dict:
        band = self.band
        return {"experiment": EXPERIMENT, "model": self.model_name, "n_layers": band.n_layers,
                "n_heads": band.n_heads, "n_kv_heads": band.n_kv_heads, "kv_head_of_head": band.kv_head_of_head,
                "depth_range": list(self.depth_range), "layers": band.layers,
                "local_layers": {str(i): w for i, w in band.local_windows.items()}, "include_bos": self.include_bos,
                "buckets": list(BUCKETS), "self_checks": self.checks,
                "head_ranking": [head.as_record() for head in self.ranking],
                "prompts": [p.as_record(band) for p in self.prompts]}

    def mean(self, field: str) -> torch.Tensor:
        """A FinalPositionAttention field ("by_bucket", "previous", ...) averaged over prompts: [blocks, heads, ...]."""
        return torch.stack([getattr(p.attention, field) for p in self.prompts]).mean(0)

    def with_subject(self) -> list[PromptResult]:
        return [p for p in self.prompts if p.labelled.subject_positions]

    def mean_subject(self) -> torch.Tensor | None:
        """[blocks, heads]: mass on the subject, mean over the prompts that have one (None when none has)."""
        prompts = self.with_subject()
        return torch.stack([p.attention.subject for p in prompts]).mean(0) if prompts else None

    def row_labels(self) -> list[str]:
        return [f"{layer} ({100 * self.band.depth(layer):.0f}%)" for layer in self.band.layers]


def findings(study: AttentionStudy) -> list[str]:
    """The headline of the run in plain words: the head that looks at the subject most."""
    if not study.ranking:
        return []
    top, layers = study.ranking[0], study.band.layers
    return [f"Head L{top.layer}H{top.head} puts {interval_text(top.subject_mass, percent=True)} of the last "
            f"position's attention on the subject (mean [95% interval] over {top.subject_mass['n']} prompts), the "
            f"most of the heads in blocks {layers[0]}-{layers[-1]}; it is among a prompt's top heads on "
            f"{interval_text(top.in_top_k, percent=True)} of them."]


# ----------------------------------------------------------------------------- figures


def draw_figures(run, study: AttentionStudy, top_heads: int) -> dict:
    """Heatmaps layer x head (entity, sink, subject mass), mass by type per layer, the top heads' patterns."""
    by_bucket, rows, name = study.mean("by_bucket"), study.row_labels(), study.model_name
    cols = [f"H{h}/kv{k}" for h, k in enumerate(study.band.kv_head_of_head)]
    maps = [("entity", by_bucket[:, :, BUCKETS.index("entity")], "on entity, mean over prompts"),
            ("sink", by_bucket[:, :, BUCKETS.index("sink")], "on sink (position 0), mean over prompts")]
    if study.mean_subject() is not None:
        maps.append(("subject", study.mean_subject(),
                     f"on the subject entity, mean over {len(study.with_subject())} prompts"))
    figures = {}
    for key, matrix, what in maps:
        fig = heatmap(matrix, rows, cols, f"{name}: attention from the final position {what}", "attention mass",
                      vmin=0, vmax=1, xlabel="head / its key-value head", ylabel="layer (depth)")
        figures[key] = run.save_figure(f"{key}_mass_heatmap.png", fig)
    figures["by_type"] = run.save_figure("mass_by_type_per_layer.png", mass_by_type_figure(study))
    top = study.ranking[:top_heads]
    figures["top_heads"] = [run.save_figure(f"top_heads_prompt{p}.png", top_heads_figure(study, prompt, top))
                            for p, prompt in enumerate(study.prompts[:PATTERN_FIGURES]) if top]
    return figures


def mass_by_type_figure(study: AttentionStudy):
    """Stacked bars: each layer's mean mass on each type (over heads and prompts)."""
    per_layer, rows = study.mean("by_bucket").mean(1), study.row_labels()  # [blocks, buckets]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4.5))
    bottom = np.zeros(len(rows))
    for k, bucket in enumerate(BUCKETS):
        ax.bar(rows, per_layer[:, k], bottom=bottom, label=bucket)
        bottom += per_layer[:, k].numpy()
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("attention mass, mean over heads and prompts")
    ax.set_title(f"{study.model_name}: where the final position looks, by token type")
    ax.tick_params(axis="x", rotation=90)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def token_labels(prompt: PromptResult) -> list[str]:
    """'<token> [E]' per position: the token text and its type letter (S marks the sink)."""
    return [f"{visible_token(token)} [{SHORT[bucket]}]" for token, bucket in zip(prompt.labelled.tokens, prompt.buckets)]


def top_heads_figure(study: AttentionStudy, prompt: PromptResult, top: list[RankedHead]):
    """The top heads' full patterns on one prompt: token labels on the first panel only, one colour bar."""
    labels = token_labels(prompt)
    size = min(1.2 + 0.28 * len(labels), 14)  # inches per panel; long prompts get smaller labels
    font = 7 if len(labels) <= 40 else max(2, 280 // len(labels))
    fig, axes = plt.subplots(1, len(top), figsize=(min(size * len(top) + 2, 60), size + 1.2), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, head in zip(axes[0], top):
        pattern = prompt.attention.pattern[study.band.layers.index(head.layer), head.head]
        image = ax.imshow(pattern.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=font)
        ax.set_title(f"L{head.layer} H{head.head} (kv {head.kv_head})", fontsize=9)
        ax.set_xlabel("key (attended to)", fontsize=8)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=font)
    axes[0][0].set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="attention weight", shrink=0.8)
    fig.suptitle(f"{study.model_name}: top subject heads on {prompt.labelled.prompt.text!r}", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- report.md


def write_report(study: AttentionStudy, figures: dict, model, top_heads: int) -> str:
    """report.md: the setting, the self-checks, the head ranking, figures, tables by type, labels, every head."""
    return "\n".join(setting_section(study, model) + ["## Self-checks", "", check_lines(study.checks), ""]
                     + ranking_section(study, top_heads) + figures_section(figures) + by_type_section(study)
                     + labels_section(study) + every_head_section(study))


def setting_section(study: AttentionStudy, model) -> list[str]:
    band, n = study.band, study.band.n_layers
    forwards = len(batches_by_length([len(p.labelled.ids) for p in study.prompts], study.prompts_per_forward))
    sink_rule = ("counted under its own type as well (INCLUDE_BOS = True; the sink bucket stays empty)"
                 if study.include_bos else "counted only as the sink, not under its token type (INCLUDE_BOS = False)")
    return [f"# 002 attention patterns: {study.model_name}", "",
            f"{n} layers; each has {band.n_heads} query heads and {band.n_kv_heads} key/value "
            f"head{'s' if band.n_kv_heads > 1 else ''} (grouped-query attention: query head h reads key/value "
            f"head h // {band.n_heads // band.n_kv_heads}). Device {model.device}, "
            f"dtype {str(model.dtype).replace('torch.', '')}. {len(study.prompts)} prompts in {forwards} forward "
            f"pass(es), at most {study.prompts_per_forward} per pass (BATCH_SIZE), right-padded; each prompt's own "
            "tokens are read.", "",
            f"Band: DEPTH_RANGE = {tuple(study.depth_range)} selects blocks {band.layers[0]}-{band.layers[-1]} "
            f"({len(band.layers)} of {n}); block i writes lens layer i + 1, so its depth is (i + 1)/{n}.", "",
            "Local (sliding-window) attention: " + sliding_note(study), "",
            f"Masses are the attention of the final position (the one that predicts the answer). Position 0 "
            f"is the attention sink (BOS, or the first token when the tokenizer adds none) and is {sink_rule}. "
            "Masses over the buckets sum to 1 per head.", "",
            *[f"Note: {note}" for note in model.notes], ""]  # device check, offloaded layers


def sliding_note(study: AttentionStudy) -> str:
    """Which blocks of the band are local, and whether any prompt is long enough for the window to matter."""
    local = study.band.local_windows
    local_in_band = [b for b in study.band.layers if b in local]
    if not local_in_band:
        return "none in the band; every block attends to the whole prompt."
    window = min(local[b] for b in local_in_band)
    longest = max(len(p.labelled.tokens) for p in study.prompts)
    effect = (f"the longest prompt here has {longest} tokens, so the window changes nothing" if longest <= window
              else f"prompts up to {longest} tokens: the final position of these blocks cannot see the start "
                   "of the longer ones (the patterns show what the model does)")
    return (f"blocks {', '.join(map(str, local_in_band))} of the band attend only to the last {window} tokens "
            f"({effect}); the other blocks are global.")


def ranking_section(study: AttentionStudy, top_heads: int) -> list[str]:
    out = [f"## Heads ranked by attention on the subject entity ({len(study.with_subject())} of "
           f"{len(study.prompts)} prompts have one)", ""]
    if not study.ranking:
        return out + ["No prompt has a subject entity (no capitalized word before the last token): name one with "
                      "\"subject\" in a PROMPTS_FILE.", ""]
    by_bucket, previous, layers = study.mean("by_bucket"), study.mean("previous"), study.band.layers
    rows = []
    for rank, h in enumerate(study.ranking[: max(top_heads, 10)]):
        b = layers.index(h.layer)
        rows.append([rank + 1, h.layer, f"{100 * study.band.depth(h.layer):.0f}%", h.head, h.kv_head,
                     interval_text(h.subject_mass), h.std, h.min, interval_text(h.in_top_k, percent=True),
                     float(by_bucket[b, h.head, BUCKETS.index("entity")]),
                     float(by_bucket[b, h.head, BUCKETS.index("sink")]), float(previous[b, h.head])])
    return out + [f"Subject mean [95% interval]: the mass on the subject's tokens, mean over those prompts, with a "
                  "seeded bootstrap interval over the prompts (common/stats.py); std and min over the same "
                  f"prompts. In top {top_heads} [95% interval]: the share of them on which the head is among that "
                  f"prompt's {top_heads} best. Entity, sink and previous (the token just before the final one, "
                  "which previous-token heads read): mean over all prompts.", "",
                  markdown_table(["rank", "layer", "depth", "head", "kv head", "subject mean [95% CI]",
                                  "subject std", "subject min", f"in top {top_heads} [95% CI]", "entity", "sink",
                                  "previous"], rows), ""]


def figures_section(figures: dict) -> list[str]:
    out = ["## Figures", "", f"![entity mass per head]({figures['entity']})", "",
           f"![sink mass per head]({figures['sink']})", ""]
    if "subject" in figures:
        out += [f"![subject mass per head]({figures['subject']})", ""]
    out += [f"![mass by type per layer]({figures['by_type']})", ""]
    for name in figures["top_heads"]:
        out += [f"![top heads]({name})", ""]
    return out


def by_type_section(study: AttentionStudy) -> list[str]:
    by_bucket, previous, itself, band = study.mean("by_bucket"), study.mean("previous"), study.mean("itself"), study.band
    rows = [[b, f"{100 * band.depth(b):.0f}%", "local" if b in band.local_windows else "global"]
            + by_bucket[i].mean(0).tolist() + [float(previous[i].mean()), float(itself[i].mean())]
            for i, b in enumerate(band.layers)]
    return ["## Mass by type per layer (mean over heads and prompts)", "",
            "The buckets sum to 1; previous and self (the final token itself) are shown apart and are also "
            "counted in their token's bucket.", "",
            markdown_table(["layer", "depth", "attention"] + list(BUCKETS) + ["previous", "self"], rows), ""]


def labels_section(study: AttentionStudy) -> list[str]:
    out = ["## Token labels", "",
           "Type per token by the rule in common/attention.py (or by hand where the prompts file says so); "
           "`*` marks the subject's tokens, S the sink. Letters: " +
           ", ".join(f"{v} {k}" for k, v in SHORT.items()) + ".", ""]
    for p in study.prompts:
        labelled = p.labelled
        marks = [SHORT[b] + ("*" if i in labelled.subject_positions else "") for i, b in enumerate(p.buckets)]
        note = (f"labels: {labelled.label_source}; model's top-1: {md_escape(p.top1_token)}, "
                f"p(target {md_escape(labelled.target.token)}) = {p.target_prob:.6f}")
        out += [f"**{md_escape(labelled.prompt.text)}** ({note})", "",
                "| " + " | ".join(md_escape(t) for t in labelled.tokens) + " |",
                "|" + "---|" * len(labelled.tokens),
                "| " + " | ".join(f"{m} {t}" for m, t in zip(marks, labelled.token_types)) + " |", ""]
    return out


def every_head_section(study: AttentionStudy) -> list[str]:
    by_bucket, previous, itself = study.mean("by_bucket"), study.mean("previous"), study.mean("itself")
    subject, kv_of = study.mean_subject(), study.band.kv_head_of_head
    rows = [[layer, h, kv_of[h]] + by_bucket[i, h].tolist()
            + [float(subject[i, h]) if subject is not None else float("nan"), float(previous[i, h]),
               float(itself[i, h])]
            for i, layer in enumerate(study.band.layers) for h in range(study.band.n_heads)]
    return ["## Every head (mean over prompts)", "", "<details><summary>table</summary>", "",
            markdown_table(["layer", "head", "kv head"] + list(BUCKETS) + ["subject", "previous", "self"], rows),
            "", "</details>", ""]
