"""001's results as typed objects, and everything a person reads from them: report.md, figures, findings.

run.py reads every prompt into a `PromptReading` (its lens trajectories: common.lens.LensTrajectory, one per
temperature, the other lens and the tuned lens beside it) and each model's prompts into a `ModelStudy`.
This module writes them as results.json (`to_json`: the DESIGN.md contract, keys and numbers as they were),
as markdown sections and figures, and compares several models by depth %.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from statistics import median

from common.lens import LensTrajectory, Resolution, key_layers
from common.prompts import PROMPT_FORMATS, Prompt, Target
from common.report import check_lines, curves, heatmap, markdown_table, md_escape, visible_token
from common.tuned_lens import TrainedLens
from lens_statistics import comparison as comparison_statistics, statistics, text as stat_text

EXPERIMENT = "001_layers_and_logits"
PROBES = (("direction", ("forward", "reverse")), ("answer_position", ("target_first", "target_second")))


# ----------------------------------------------------------------------------- the typed results


@dataclass
class PromptReading:
    """One prompt of a run and what each lens read from it at its last position."""
    prompt: Prompt
    target: Target
    tokens: list[str]  # the prompt's tokens as the model sees them
    by_temperature: dict[float, LensTrajectory]  # the run's lens (NORM or RAW), T = 1.0 among them
    other_lens: LensTrajectory | None = None  # RAW under NORM, NORM under RAW: main prompts only
    tuned: LensTrajectory | None = None  # with USE_TUNED_LENS

    @property
    def lens(self) -> LensTrajectory:
        """The run's lens at temperature 1: the contract's "layers"."""
        return self.by_temperature[1.0]

    @property
    def probe(self) -> str | None:
        return self.prompt.extra.get("probe")

    @property
    def probe_side(self) -> str | None:
        return self.prompt.extra.get("side")

    def to_json(self, other_lens_name: str) -> dict:
        """This prompt's results.json entry: the contract's fields, then 001's own."""
        record = {"prompt": self.prompt.text, "target": self.prompt.target, "target_token_id": self.target.token_id,
                  "target_token": self.target.token, "tokens": self.tokens, "layers": self.lens.layer_records(),
                  "target_n_tokens": self.target.n_tokens, "fact_id": self.prompt.fact_id,
                  "format": self.prompt.format, "variant": self.prompt.variant, "probe": self.probe,
                  "probe_side": self.probe_side, "resolution": self.lens.resolution().as_record(),
                  "temperatures": [{"temperature": t, "target_prob": s.target_prob, "target_rank": s.target_rank,
                                    "entropy": s.entropy, "top_k_mass": s.top_k_mass}
                                   for t, s in self.by_temperature.items()],
                  "self_check": self.lens.check}
        if self.tuned:
            record |= {"tuned_layers": self.tuned.layer_records(), "tuned_self_check": self.tuned.check,
                       "tuned_resolution": self.tuned.resolution().as_record()}
        if self.other_lens:
            record[f"{other_lens_name}_layers"] = self.other_lens.layer_records()
        return record


@dataclass
class ModelStudy:
    """One model's run: every prompt read, the run-level self-checks, notes for the report."""
    model: str
    n_layers: int
    lens_name: str  # "norm" | "raw"
    device: str
    dtype: str
    readings: list[PromptReading]
    notes: list[str] = field(default_factory=list)
    tuned_lens: TrainedLens | None = None  # with USE_TUNED_LENS
    checks: list[dict] = field(default_factory=list)
    run_folder: Path | None = None
    seed: int = 0  # seeds the bootstrap intervals
    main_format: str = "completion"  # the format of the main prompts: completion, unless the run asked only qa or chat

    @cached_property
    def statistics(self) -> dict:
        """Every statistic over prompts with its 95% interval (lens_statistics.py)."""
        return statistics(self, self.seed)

    @property
    def main_readings(self) -> list[PromptReading]:
        """The main prompts: each fact in the main format, first wording (every prompt of a PROMPTS_FILE)."""
        return [r for r in self.readings if self.is_main(r)]

    def is_main(self, reading: PromptReading) -> bool:
        return (reading.probe is None and reading.prompt.variant == 0
                and reading.prompt.format in (self.main_format, "verbatim"))

    def chosen(self, prompt_format: str, probe: str | None = None, side: str | None = None) -> list[PromptReading]:
        """The first wordings in one format (with `probe`: that probe's prompts, of one side when given)."""
        return [r for r in self.readings if r.probe == probe and r.prompt.format == prompt_format
                and r.prompt.variant == 0 and (side is None or r.probe_side == side)]

    def to_json(self) -> dict:
        """The run's results.json (DESIGN.md's 001 contract, plus 001's own fields)."""
        other = "raw" if self.lens_name == "norm" else "norm"
        results = {"experiment": EXPERIMENT, "model": self.model, "n_layers": self.n_layers, "lens": self.lens_name,
                   "prompts": [r.to_json(other) for r in self.readings], "statistics": self.statistics}
        if self.tuned_lens is not None:
            results["tuned_lens"] = self.tuned_lens.summary()
        return results


def depth_cell(layer: int | None, depth: float | None) -> str:
    """A resolution layer for a table: "12 (40%)", or "never"."""
    return "never" if layer is None else f"{layer} ({100 * depth:.0f}%)"


def resolution_cells(resolution: Resolution) -> list[str]:
    """Table cells for one resolution: top-1-for-good layer and depth, p > 0.5 layer, entropy-drop layer."""
    return [depth_cell(resolution.first_top1_layer, resolution.first_top1_depth),
            depth_cell(resolution.first_p50_layer, resolution.first_p50_depth),
            depth_cell(resolution.entropy_drop_layer, resolution.entropy_drop_depth)]


def findings(study: ModelStudy) -> list[str]:
    """Two headlines of one model's study in plain words: the first fact, and the median over all facts."""
    mains, n, name = study.main_readings, study.n_layers, study.model
    if not mains:
        return []
    first = mains[0]
    layer = first.lens.resolution().first_top1_layer
    said = (f"becomes top-1 for good at layer {layer} of {n} ({100 * layer / n:.0f}% depth)" if layer is not None
            else f"is never top-1 (rank {first.lens.final_rank} at the last layer)")
    lines = [f"{name}: {first.target.token!r} {said} after {first.prompt.text!r}."]
    resolved = sorted(r.lens.resolution().first_top1_layer for r in mains
                      if r.lens.resolution().first_top1_layer is not None)
    if len(mains) > 1 and resolved:
        lines.append(f"{name}: {len(resolved)} of {len(mains)} facts resolve; median first top-1 layer "
                     f"{median(resolved):g} of {n} ({100 * median(resolved) / n:.0f}% depth).")
    return lines


# ----------------------------------------------------------------------------- figures


def draw_figures(run, study: ModelStudy) -> dict:
    """Heatmaps over layers x main prompts (target probability; top-1 token), and temperature curves;
    with the tuned lens, its heatmaps and the held-out KL of both lenses. Returns {figure: file name}."""
    mains = study.main_readings
    figures = lens_heatmaps(run, study.model, [r.prompt.text for r in mains], [r.lens for r in mains],
                            study.lens_name.upper(), "")
    if study.tuned_lens is not None:
        figures |= lens_heatmaps(run, study.model, [r.prompt.text for r in mains], [r.tuned for r in mains],
                                 "tuned", "tuned_")
        figures["heldout_kl"] = run.save_figure("tuned_heldout_kl.png", heldout_kl_figure(
            study.tuned_lens.heldout_kl, f"{study.model}: held-out KL to the final layer, NORM vs tuned lens"))
    layers = list(range(study.n_layers + 1))
    band = study.statistics["p_target_by_layer"]
    figures["p_target_band"] = run.save_figure("p_target_band.png", curves(
        [{"ylabel": "mean p(target)", "series": [(f"{study.lens_name.upper()} lens", layers, band["value"],
                                                  tuple(band["ci95"]))], "ylim": (0, 1)}],
        f"{study.model}: mean p(target) by layer, 95% band over {band['n']} main prompts", "layer"))
    series = {"target_prob": [], "entropy": []}
    for temperature in mains[0].by_temperature:
        for key in series:
            mean = [sum(getattr(r.by_temperature[temperature], key)[layer] for r in mains) / len(mains)
                    for layer in layers]
            series[key].append((f"T = {temperature:g}", layers, mean))
    figures["temperature"] = run.save_figure("temperature.png", curves(
        [{"ylabel": "mean p(target)", "series": series["target_prob"], "ylim": (0, 1)},
         {"ylabel": "mean entropy (nats)", "series": series["entropy"]}],
        f"{study.model}: temperature rescales confidence, not ranks (main prompts)", "layer"))
    return figures


def lens_heatmaps(run, model_name: str, prompts: list[str], trajectories: list[LensTrajectory], lens_name: str,
                  prefix: str) -> dict:
    """Target probability and top-1 token heatmaps of one lens: whole prompts as labels, full top-1 tokens
    written horizontally with whitespace made visible."""
    labels = [textwrap.fill(visible_token(prompt, spaces=False), 60) for prompt in prompts]
    layers = list(range(trajectories[0].n_layers + 1))
    figures = {f"{prefix}target_prob": run.save_figure(f"{prefix}target_prob_heatmap.png", heatmap(
        [t.target_prob for t in trajectories], labels, layers,
        f"{model_name}: target probability by layer ({lens_name} lens)", "p(target)", vmin=0, vmax=1,
        xlabel="layer", ylabel="prompt"))}
    top_text = [[visible_token(top[0][0]) for top in t.top_tokens] for t in trajectories]
    figures[f"{prefix}top_token"] = run.save_figure(f"{prefix}top_token_heatmap.png", heatmap(
        [[top[0][1] for top in t.top_tokens] for t in trajectories], labels, layers,
        f"{model_name}: top-1 token by layer ({lens_name} lens)", "p(top-1)", cell_text=top_text, vmin=0, vmax=1,
        xlabel="layer", ylabel="prompt"))
    return figures


def heldout_kl_figure(heldout_kl: dict, title: str):
    """Held-out KL(final || lens) of both lenses against depth (symlog scale: layer 0 is far above the rest).
    heldout_kl: {"norm": [n_layers + 1], "tuned": [n_layers + 1]}, nats."""
    n_layers = len(heldout_kl["norm"]) - 1
    depth = [layer / n_layers for layer in range(n_layers + 1)]
    fig = curves([{"ylabel": "mean KL(final || lens), nats (held-out text)",
                   "series": [("NORM lens", depth, heldout_kl["norm"]), ("tuned lens", depth, heldout_kl["tuned"])]}],
                 title, "depth (layer / n_layers)")
    fig.axes[0].set_yscale("symlog", linthresh=0.1)
    fig.axes[0].set_ylim(bottom=0)
    return fig


# ----------------------------------------------------------------------------- report.md


def report_markdown(study: ModelStudy, figures: dict) -> str:
    """The whole report.md of one model's run."""
    out = [f"# 001 layers and logits: {study.model} ({study.lens_name.upper()} lens)", "",
           f"{study.n_layers} layers (+ the embeddings as layer 0); device {study.device}, dtype "
           f"{study.dtype}. Probabilities at the last prompt position; rank 0 = top-1; "
           "entropy and KL(final || layer) in nats; depth % = layer / n_layers.", ""]
    out += section_summary(study) + [""]
    out += section_statistics(study, figures)
    out += [f"- Note: {note}" for note in study.notes] + [""]
    out += ["## Self-checks", "", check_lines(study.checks), ""]
    out += section_key_layers(study)
    out += section_resolution(study)
    out += section_other_lens(study)
    out += [f"![target probability]({figures['target_prob']})", "", f"![top-1 token]({figures['top_token']})", ""]
    out += section_tuned_lens(study, figures) if study.tuned_lens is not None else []
    out += section_formats(study)
    out += section_direction(study)
    out += section_temperature(study, figures["temperature"])
    out += section_paraphrases(study)
    out += section_every_layer(study)
    return "\n".join(out)


def section_summary(study: ModelStudy) -> list[str]:
    mains = study.main_readings
    depths = [r.lens.resolution().first_top1_depth for r in mains if r.lens.final_rank == 0]
    lines = ["## Summary", "",
             f"- Main prompts (first wording, {study.main_format} format): {len(depths)} of {len(mains)} have the "
             "target as the final layer's top-1 token."]
    if depths:
        lines.append(f"- The answer becomes top-1 for good at a median depth of {100 * median(depths):.0f}% "
                     f"(range {100 * min(depths):.0f}%-{100 * max(depths):.0f}% of {study.n_layers} layers).")
    for prompt_format in PROMPT_FORMATS[1:]:
        chosen = study.chosen(prompt_format)
        if chosen:
            right = sum(r.lens.final_rank == 0 for r in chosen)
            lines.append(f"- {prompt_format} format: {right} of {len(chosen)} facts right at the final layer.")
    for kind, sides in PROBES:
        for side in sides:
            chosen = study.chosen("completion", kind, side)
            if chosen:
                right = sum(r.lens.final_rank == 0 for r in chosen)
                mean_p = sum(r.lens.final_prob for r in chosen) / len(chosen)
                lines.append(f"- {kind.replace('_', ' ')}, {side.replace('_', ' ')}: {right} of {len(chosen)} right, "
                             f"mean final p(target) {mean_p:.6f}.")
    return lines


def section_statistics(study: ModelStudy, figures: dict) -> list[str]:
    """The statistics over prompts with their 95% bootstrap intervals, and the per-relation breakdown."""
    st, percent = study.statistics, True
    main = st["main_prompts"]
    out = ["## Statistics over prompts (95% bootstrap intervals, seeded)", "",
           f"- Right at the final layer (main prompts): {stat_text(main['accuracy'], percent)}.",
           "- Where it is right, the answer becomes top-1 for good at a median depth of "
           f"{stat_text(main['first_top1_depth_median'], percent)}."]
    for prompt_format, record in st["by_format"].items():
        line = f"- {prompt_format} format: right {stat_text(record['accuracy'], percent)}"
        if "accuracy_minus_completion" in record:
            line += f"; minus completion, fact by fact: {stat_text(record['accuracy_minus_completion'], percent)}"
        out.append(line + ".")
    for kind in ("direction", "answer_position"):
        if f"{kind}_bias_final_p" in st:
            sides = "forward minus reverse" if kind == "direction" else "target first minus target second"
            out.append(f"- {kind.replace('_', ' ')} bias, final p(target) {sides}: {stat_text(st[kind + '_bias_final_p'])}.")
    if "paraphrases" in st:
        wording = st["paraphrases"]
        out.append(f"- Paraphrases ({wording['facts']} facts in {wording['wordings']} wordings; each fact one unit): "
                   f"share of a fact's wordings that are right, mean {stat_text(wording['accuracy_per_fact'], percent)}; "
                   f"facts whose wordings all agree (all right or all wrong): "
                   f"{stat_text(wording['wordings_agree'], percent)}; spread of the top-1-for-good depth across a "
                   f"fact's wordings (facts where two or more resolve), median "
                   f"{stat_text(wording['first_top1_depth_spread'], percent)}.")
    rows = [[relation, stat_text(r["accuracy"], percent), stat_text(r["first_top1_depth_median"], percent)]
            for relation, r in st["by_relation"].items()]
    out += ["", "### By relation (main prompts)", "",
            markdown_table(["relation", "right at the final layer", "median top-1 depth (where right)"], rows), "",
            f"![p(target) by layer with its band]({figures['p_target_band']})", ""]
    return out


def target_heading(reading: PromptReading) -> str:
    return f"{md_escape(reading.prompt.text)} -> {md_escape(reading.target.token)}"


def section_key_layers(study: ModelStudy) -> list[str]:
    out = ["## Key layers (0, n/6, n/3, n/2, 2n/3, 5n/6, last), main prompts", ""]
    for r in study.main_readings:
        lens, n = r.lens, study.n_layers
        note = f" (the answer takes {r.target.n_tokens} tokens; the first is tracked)" if r.target.n_tokens > 1 else ""
        rows = [[layer, f"{100 * layer / n:.0f}%", md_escape(lens.top_tokens[layer][0][0]), lens.top_tokens[layer][0][1],
                 lens.target_prob[layer], lens.target_rank[layer], lens.entropy[layer], lens.kl_to_final[layer]]
                for layer in key_layers(n)]
        out += [f"### {target_heading(r)}{note}", "",
                markdown_table(["layer", "depth", "top-1", "p(top-1)", "p(target)", "rank", "entropy", "KL to final"],
                               rows), ""]
    return out


def section_resolution(study: ModelStudy) -> list[str]:
    rows = [[md_escape(r.prompt.text), md_escape(r.target.token), r.lens.final_prob, r.lens.final_rank]
            + resolution_cells(r.lens.resolution()) for r in study.main_readings]
    return ["## Resolution depth (main prompts)", "",
            "Top-1 for good: the first layer from which the target stays top-1 to the end. "
            "p > 0.5: the first layer where it passes one half. Entropy drop: the layer whose block lowers "
            "the entropy most.", "",
            markdown_table(["prompt", "target", "final p", "final rank", "top-1 for good", "p > 0.5", "entropy drop"],
                           rows), ""]


def section_other_lens(study: ModelStudy) -> list[str]:
    """NORM beside RAW at the key layers, over the main prompts: mean p(target), median rank, and how many have
    the target top-1 (the other lens is read for the main prompts only)."""
    pairs = [(r.lens, r.other_lens) for r in study.main_readings if r.other_lens is not None]
    if not pairs:
        return []
    names = (study.lens_name.upper(), "RAW" if study.lens_name == "norm" else "NORM")
    rows = []
    for layer in key_layers(study.n_layers):
        row = [layer, f"{100 * layer / study.n_layers:.0f}%"]
        for side in (0, 1):
            probs = [pair[side].target_prob[layer] for pair in pairs]
            ranks = [pair[side].target_rank[layer] for pair in pairs]
            row += [sum(probs) / len(probs), median(ranks), sum(rank == 0 for rank in ranks)]
        rows.append(row)
    headers = ["layer", "depth"] + [f"{name} {what}" for name in names
                                     for what in ("mean p(target)", "median rank", "top-1")]
    return [f"## {names[0]} beside {names[1]} (main prompts, key layers)", "",
            f"The same {len(pairs)} main prompts through both lenses: RAW unembeds the residual stream as it is, "
            "NORM applies the final norm first (at the last layer NORM is the model's own output, RAW is not).", "",
            markdown_table(headers, rows), ""]


def section_tuned_lens(study: ModelStudy, figures: dict) -> list[str]:
    """The tuned lens beside the NORM lens: held-out KL by layer, resolution depth under each, heatmaps."""
    trained, n, lens_name = study.tuned_lens, study.n_layers, study.lens_name.upper()
    kl_rows = [[layer, f"{100 * layer / n:.0f}%", trained.heldout_kl["norm"][layer], trained.heldout_kl["tuned"][layer]]
               for layer in key_layers(n)]
    rows = [[md_escape(r.prompt.text), md_escape(r.target.token)] + resolution_cells(r.lens.resolution())[:2]
            + resolution_cells(r.tuned.resolution())[:2] for r in study.main_readings]
    return ["## Tuned lens beside the NORM lens", "",
            f"A learned affine translator per layer before the final norm and unembedding (common/tuned_lens.py), "
            f"trained on {md_escape(trained.trained_on)}. Mean KL(final || lens) in nats on the held-out text:", "",
            markdown_table(["layer", "depth", "NORM lens", "tuned lens"], kl_rows), "",
            f"![held-out KL]({figures['heldout_kl']})", "", "Resolution depth under each lens (main prompts):", "",
            markdown_table(["prompt", "target", f"{lens_name} top-1 for good", f"{lens_name} p > 0.5",
                            "tuned top-1 for good", "tuned p > 0.5"], rows), "",
            f"![tuned target probability]({figures['tuned_target_prob']})", "",
            f"![tuned top-1 token]({figures['tuned_top_token']})", ""]


def section_formats(study: ModelStudy) -> list[str]:
    by_format = {f: study.chosen(f) for f in PROMPT_FORMATS if study.chosen(f)}
    if len(by_format) < 2:
        return []
    facts = list(dict.fromkeys(r.prompt.fact_id for r in study.readings if r.probe is None))
    rows = []
    for fact in facts:
        cells = [next(r for r in chosen if r.prompt.fact_id == fact) for chosen in by_format.values()]
        rows.append([fact] + [f"rank {r.lens.final_rank}, p {r.lens.final_prob:.6f}, top-1 from "
                              + resolution_cells(r.lens.resolution())[0] for r in cells])
    summary = ["**right at the final layer**"]
    for chosen in by_format.values():
        right = [r.lens.resolution().first_top1_depth for r in chosen if r.lens.final_rank == 0]
        summary.append(f"{len(right)} of {len(chosen)}" + (f", median top-1 depth {100 * median(right):.0f}%" if right else ""))
    return ["## Prompt formats", "",
            "The same facts as a completion, as `Question: ...\\nAnswer:`, and in the chat template with the "
            "completion as the start of the assistant's answer.", "",
            markdown_table(["fact"] + list(by_format), rows + [summary]), ""]


def section_direction(study: ModelStudy) -> list[str]:
    out = []
    for kind, title, text in (
            ("direction", "Directional bias: the same fact asked both ways",
             "Forward asks for the attribute (France -> Paris); reverse asks back (Paris -> France). Both sides "
             "start with the same two worked examples in their own direction (facts that are not probed), so the "
             "next word is the answer rather than ' the'."),
            ("answer_position", "Answer-position bias: options in both orders",
             "The same question with the right option named first, then second, after two worked examples (one "
             "answered with the first option, one with the second).")):
        chosen = [r for r in study.readings if r.probe == kind]
        if not chosen:
            continue
        rows = [[r.prompt.fact_id, r.probe_side.replace("_", " "), md_escape(r.prompt.text), md_escape(r.target.token),
                 r.lens.final_prob, r.lens.final_rank] + resolution_cells(r.lens.resolution())[:2] for r in chosen]
        out += [f"## {title}", "", text, "",
                markdown_table(["probe", "side", "prompt", "target", "final p", "final rank", "top-1 for good",
                                "p > 0.5"], rows), ""]
    return out


def section_temperature(study: ModelStudy, figure: str) -> list[str]:
    """Final layer, mean over the main prompts, per temperature; whether every rank is as at T = 1 (the
    temperature self-check compares the same ranks against the untempered logits, prompt by prompt)."""
    mains, rows = study.main_readings, []
    intervals = study.statistics["by_temperature"]
    for temperature in mains[0].by_temperature:
        at = [r.by_temperature[temperature] for r in mains]
        top_k_mass = sum(t.top_k_mass[-1] for t in at) / len(at)
        same = all(t.target_rank == r.lens.target_rank for t, r in zip(at, mains))
        record = intervals[f"{temperature:g}"]
        rows.append([f"{temperature:g}", stat_text(record["final_p_target"]), stat_text(record["final_entropy"]),
                     top_k_mass, "yes" if same else "NO"])
    return ["## Temperature", "",
            "Final layer, mean over the main prompts (95% bootstrap intervals). Logits are divided by T before "
            "the softmax, at every layer.", "",
            markdown_table(["T", "mean p(target)", "mean entropy (nats)", "mean top-k mass", "ranks as at T = 1"],
                           rows), "",
            f"![temperature]({figure})", ""]


def section_paraphrases(study: ModelStudy) -> list[str]:
    facts = list(dict.fromkeys(r.prompt.fact_id for r in study.readings if r.probe is None and r.prompt.variant > 0))
    if not facts:
        return []
    rows = []
    for fact in facts:
        wordings = [r for r in study.readings
                    if r.prompt.fact_id == fact and r.prompt.format == "completion" and r.probe is None]
        depths = [r.lens.resolution().first_top1_depth for r in wordings]
        known = [d for d in depths if d is not None]
        spread = f"{100 * (max(known) - min(known)):.0f} points" if len(known) > 1 else "n/a"
        if len(known) < len(depths):
            spread += f" ({len(depths) - len(known)} never top-1)"
        rows.append([fact, len(wordings), sum(r.lens.final_rank == 0 for r in wordings),
                     ", ".join("never" if d is None else f"{100 * d:.0f}%" for d in depths),
                     ", ".join(f"{r.lens.final_prob:.6f}" for r in wordings), spread])
    return ["## Paraphrases", "",
            "Every wording of each fact (completion format): where the answer becomes top-1 for good, and how far "
            "apart the wordings are.", "",
            markdown_table(["fact", "wordings", "right at the end", "top-1-for-good depth per wording",
                            "final p per wording", "spread"], rows), ""]


def section_every_layer(study: ModelStudy) -> list[str]:
    out = ["## Every layer, every prompt", ""]
    for r in study.readings:
        lens = r.lens
        rows = [[layer, ", ".join(f"{md_escape(tok)} {p:.6f}" for tok, p in lens.top_tokens[layer]),
                 lens.target_prob[layer], lens.target_rank[layer], lens.entropy[layer], lens.kl_to_final[layer]]
                for layer in range(lens.n_layers + 1)]
        label = r.prompt.format + (f", {r.probe} {r.probe_side}" if r.probe else "") + \
            (f", wording {r.prompt.variant}" if r.prompt.variant else "")
        out += [f"<details><summary>{target_heading(r)} ({label})</summary>", "",
                "Tokens: " + " ".join(md_escape(token) for token in r.tokens), "",
                markdown_table(["layer", "top tokens", "p(target)", "rank", "entropy", "KL to final"], rows), "",
                "</details>", ""]
    return out


# ----------------------------------------------------------------------------- models compared by depth %


def comparison_record(studies: list[ModelStudy]) -> dict:
    """The comparison's results.json: the statistics by depth % with intervals (lens_statistics.comparison),
    then per model its main prompts' resolution and curves by depth."""
    return {"experiment": EXPERIMENT, "comparison": True, "lens": studies[0].lens_name,
            "statistics": comparison_statistics(studies, studies[0].seed),
            "models": [{"model": s.model, "n_layers": s.n_layers, "run_folder": str(s.run_folder),
                        "prompts": [{"fact_id": r.prompt.fact_id, "prompt": r.prompt.text, "target": r.prompt.target,
                                     "resolution": r.lens.resolution().as_record(),
                                     "depth": [layer / s.n_layers for layer in range(s.n_layers + 1)],
                                     "target_prob": r.lens.target_prob, "entropy": r.lens.entropy}
                                    for r in s.main_readings]} for s in studies]}


def comparison_figure(statistics: dict, lens_name: str):
    """Mean p(target) and mean entropy of the main prompts against depth %, one curve per model, each with its
    95% band over prompts (`statistics`: lens_statistics.comparison's record)."""
    panels = [{"ylabel": "mean p(target)", "series": [], "ylim": (0, 1)}, {"ylabel": "mean entropy (nats)", "series": []}]
    for record in statistics["models"]:
        for panel, key in zip(panels, ("p_target_by_depth", "entropy_by_depth")):
            panel["series"].append((record["model"], record["depth"], record[key]["value"], tuple(record[key]["ci95"])))
    return curves(panels, f"Models by depth % ({lens_name.upper()} lens, main prompts, 95% bands)",
                  "depth (layer / n_layers)")


def comparison_markdown(studies: list[ModelStudy], statistics: dict, out_dir: Path, figure: str) -> str:
    """The comparison's report.md: per model how many facts resolve and where; per fact, each model's layer."""
    summary = [[s.model, s.n_layers, stat_text(record["accuracy"], percent=True),
                stat_text(record["first_top1_depth_median"], percent=True),
                md_escape(str(s.run_folder.relative_to(out_dir)))] for s, record in zip(studies, statistics["models"])]
    differences = [[pair, stat_text(record["accuracy"], percent=True),
                    stat_text(record["first_top1_depth"], percent=True)]
                   for pair, record in statistics["paired_differences"].items()]
    by_model = [{r.prompt.fact_id: r for r in s.main_readings} for s in studies]
    rows = [[fact] + ["n/a" if fact not in facts else
                      f"{resolution_cells(facts[fact].lens.resolution())[0]}, final p {facts[fact].lens.final_prob:.6f}"
                      for facts in by_model]
            for fact in dict.fromkeys(fact for facts in by_model for fact in facts)]
    return "\n".join([
        f"# 001 models compared by depth % ({studies[0].lens_name.upper()} lens)", "",
        "Each number with its 95% bootstrap interval over the main prompts (seeded).", "",
        markdown_table(["model", "layers", "right at the final layer", "median top-1-for-good depth (where right)",
                        "run folder (in OUT_DIR)"], summary), "",
        "Fact by fact, over the facts both models were asked (the median of the per-fact differences in depth, "
        "over the facts both get right):", "",
        markdown_table(["models", "right at the final layer", "top-1-for-good depth"], differences), "",
        f"![by depth]({figure})", "",
        "## Where each fact becomes top-1 for good (layer and depth %)", "",
        markdown_table(["fact"] + [s.model for s in studies], rows), ""])
