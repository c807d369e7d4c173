"""004's report: results.json, report.md and the figures, from the typed results of common/patching.py.

PatchingResults holds a whole run (the model, what was patched, every pair's PairStudy); the functions below
turn it into what a person reads. No tensor work happens here.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.report import check_lines, fmt, heatmap, markdown_table, md_escape  # first: it picks the Agg backend
from common.checks import worst_over_prompts

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.patching import (METRIC, RESTORED, TOP_HEADS, TRACE_KINDS, AcrossPairs, PairStudy,  # noqa: E402
                             PatchingGrid, grids_for_sites, position_labels)

TRACE_WHAT = {"resid": "single residual states", "mlp": "MLP outputs", "attn": "attention outputs"}
TRACE_COLOURS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


@dataclass
class PatchingResults:
    """A whole 004 run; `to_json()` is its results.json (the contract the html page and other tools read)."""
    experiment: str
    model: object  # common.models.LoadedModel
    sites: list[str]
    method: str
    noise_tracing: bool
    pairs: list[PairStudy]
    across: AcrossPairs
    pairs_source: str  # where the pairs came from, one sentence
    detail_pairs: int  # the first pairs with causal tracing and their own report sections

    @property
    def detailed(self) -> list[PairStudy]:
        return self.pairs[:self.detail_pairs]

    @property
    def grids(self) -> list[str]:
        return grids_for_sites(self.sites)

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def to_json(self) -> dict:
        m = self.model
        return {"experiment": self.experiment, "model": m.name, "n_layers": m.n_layers, "n_heads": m.n_heads,
                "n_kv_heads": m.n_kv_heads, "sites": self.sites, "grids": self.grids, "method": self.method,
                "metric": METRIC, "noise_tracing": self.noise_tracing, "pairs_source": self.pairs_source,
                "detail_pairs": self.detail_pairs, "across_pairs": self.across.as_record(),
                "pairs": [study.as_record() for study in self.pairs]}

    def failed_checks(self) -> list[str]:
        return [c["name"] for study in self.pairs for c in study.checks if not c["passed"]]


def depth_text(layer, n) -> str:
    return "never" if layer is None else f"{layer} ({layer / n:.2f})"


def stat_text(record: dict, decimals: int = 2) -> str:
    """A statistic over pairs as "0.80 [0.77, 0.83] (n = 20)"; "-" when it has no value."""
    if record["value"] is None:
        return f"- (n = {record['n']})"
    lo, hi = record["ci95"]
    spread = "" if lo is None else f" [{lo:.{decimals}f}, {hi:.{decimals}f}]"
    return f"{record['value']:.{decimals}f}{spread} (n = {record['n']})"


def findings(results: PatchingResults) -> list[str]:
    """The headline in plain words: the switch across pairs, the most frequent head, then the first pairs."""
    a, n = results.across, results.n_layers
    lines = [f"Across {a.n_pairs} pairs: a share {stat_text(a.switchable)} can switch (clean run answers clean, "
             f"corrupt run does not); of those, a share "
             f"{stat_text(a.switch_share)} switch to the clean answer when the last position's clean residual is "
             f"patched in, at a median depth of {stat_text(a.switch_depth)}; 001's lens resolves at a median "
             f"depth of {stat_text(a.resolution_depth)} (lag, median over pairs: {stat_text(a.lens_lag)})."]
    if a.heads:
        lines.append(f"Most frequent among a pair's top-{TOP_HEADS} heads: {a.heads[0]['head']} in a share "
                     f"{stat_text(a.heads[0]['share'])} of the pairs.")

    def from_layer(layer):
        return "at no layer" if layer is None else f"from layer {layer} of {n} ({100 * layer / n:.0f}% depth)"
    for i, study in enumerate(results.pairs[:2]):
        lines.append(f"Pair {i} ({study.pair['clean']!r}): patching the clean residual into the last position "
                     f"restores {study.answers[0].token!r} as top-1 {from_layer(study.link.switch_layer)}; 001's "
                     f"lens makes it top-1 {from_layer(study.link.resolution_layer)}.")
    return lines


# ----------------------------------------------------------------------------- figures


def as_list(values) -> list | None:
    """A grid tensor as nested lists with None for nan (cells not run), or None."""
    return None if values is None else [[None if v != v else v for v in row] for row in values.tolist()]


def drawn(grid: PatchingGrid, values) -> tuple:
    """(matrix, row labels, column labels, y label, x label) as drawn: position grids are stored [layers,
    positions] and drawn [positions, layers] (tokens down the side); head grids as stored."""
    data = np.asarray(values, dtype=float)
    if grid.name.startswith("head"):
        return data, grid.row_labels, grid.col_labels, grid.row_axis, grid.col_axis
    return data.T, grid.col_labels, grid.row_labels, grid.col_axis, grid.row_axis


def grid_figures(run, i: int, study: PairStudy, title: str) -> dict:
    """A heatmap per grid and method of one pair; {(i, grid, method): file name}."""
    figures = {}
    for name, grid in study.grids.items():
        present = {m: v.numpy() for m, v in (("exact", grid.exact), ("attribution", grid.attribution))
                   if v is not None}  # nan (a cell EXACT="top" did not run) is drawn blank
        limit = max([1.0] + [float(np.nanmax(np.abs(v))) for v in present.values()])
        for method, values in present.items():
            data, rows, cols, ylabel, xlabel = drawn(grid, values)
            fig = heatmap(data, rows, cols, f"{title}\n{name} patching ({method}), clean into corrupt",
                          "normalized logit diff", cmap="RdBu_r", vmin=-limit, vmax=limit, xlabel=xlabel, ylabel=ylabel)
            figures[(i, name, method)] = run.save_figure(f"pair{i}_{name}_{method}.png", fig)
    return figures


def trace_figures(run, i: int, study: PairStudy, title: str) -> dict:
    """The three causal-tracing heatmaps of one pair; {(i, "trace", kind): file name}."""
    trace, figures = study.trace, {}
    rows = position_labels(*study.tokens)
    for kind in TRACE_KINDS:
        what = TRACE_WHAT[kind] + ("" if kind == "resid" else f", window {trace.window}")
        data = trace.restored[kind].numpy()
        fig = heatmap(data.T, rows, [str(c) for c in range(len(data))],
                      f"{title}\ncausal trace: restoring {what} (noised p = {trace.p_noised:.3f})", "p(clean answer)",
                      cmap=TRACE_COLOURS[kind], vmin=0, xlabel="layer" if kind == "resid" else "centre block",
                      ylabel="position: clean / corrupt token")
        figures[(i, "trace", kind)] = run.save_figure(f"pair{i}_trace_{kind}.png", fig)
    return figures


def scatter_figure(study: PairStudy, title: str):
    """Exact (x) against attribution (y) for every cell, one colour per grid, with the diagonal."""
    fig, ax = plt.subplots(figsize=(6, 6))
    values = []
    for name, grid in study.grids.items():
        x, y = grid.exact.numpy().ravel(), grid.attribution.numpy().ravel()
        r = grid.correlation()
        ax.scatter(x, y, s=10, alpha=0.6, label=f"{name} (r = {r:.2f})" if r is not None else name)
        values += [x, y]
    low, high = float(np.min(np.concatenate(values))), float(np.max(np.concatenate(values)))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, label="attribution = exact")
    ax.set_xlabel("exact patching (normalized logit diff)")
    ax.set_ylabel("attribution patching (estimate)")
    ax.set_title(f"{title}\nexact vs attribution patching")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def switch_strip_figure(results: PatchingResults):
    """Each pair's switch depth (filled) and 001 resolution depth (open) on one row per relation, "never" at
    the right, with the median switch depth and its interval shaded."""
    a, n = results.across, results.n_layers
    relations = list(dict.fromkeys(s.pair.get("relation", "-") for s in results.pairs))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(relations)))
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(results.pairs))  # only separates equal points
    for study, dy in zip(results.pairs, jitter):
        y = relations.index(study.pair.get("relation", "-")) + dy
        for layer, style in ((study.link.switch_layer, dict(color="C0" if study.can_switch else "lightgrey")),
                             (study.link.resolution_layer, dict(facecolors="none", edgecolors="C1"))):
            ax.scatter(1.08 if layer is None else layer / n, y, s=30, **style)
    if a.switch_depth["value"] is not None:
        ax.axvline(a.switch_depth["value"], color="C0", linewidth=1)
        if a.switch_depth["ci95"][0] is not None:
            ax.axvspan(*a.switch_depth["ci95"], color="C0", alpha=0.15)
    ax.scatter([], [], color="C0", label=f"switch depth (median {stat_text(a.switch_depth)}, 95% interval shaded)")
    ax.scatter([], [], color="lightgrey", label="switch depth of a pair that cannot switch (not counted)")
    ax.scatter([], [], facecolors="none", edgecolors="C1", label="001 lens resolution depth")
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0, 1.08], ["0", "0.25", "0.5", "0.75", "1", "never"])
    ax.set_yticks(range(len(relations)), relations)
    ax.set_xlabel("depth (layer / n_layers)")
    ax.set_title(f"{results.model.name}: switch layer over {len(results.pairs)} pairs")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def restoration_figure(results: PatchingResults):
    """Mean exact patch of one residual position by layer over pairs, subject vs last position, 95% bands."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for which, label in (("subject", "subject's last token"), ("last", "last position")):
        curve = results.across.restoration[which]
        layers = np.arange(len(curve["value"]))
        ax.plot(layers, curve["value"], marker=".", label=f"{label} (mean of {curve['n']} pairs)")
        if curve["n"] > 1:
            ax.fill_between(layers, np.asarray(curve["lo"], float), np.asarray(curve["hi"], float), alpha=0.2)
    ax.axhline(RESTORED, color="grey", linewidth=0.8, linestyle="--", label=f"restored (>= {RESTORED})")
    ax.set_xlabel("residual layer patched (clean into corrupt)")
    ax.set_ylabel("normalized logit diff (1 = clean run)")
    ax.set_title(f"{results.model.name}: where one residual position restores the clean answer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_figures(run, results: PatchingResults) -> dict:
    """Across pairs: the switch-depth strip and the restoration curves. Per detailed pair: a heatmap per grid
    and method, the exact-vs-attribution scatter, the causal-trace heatmaps."""
    figures = {"strip": run.save_figure("switch_depth_across_pairs.png", switch_strip_figure(results))}
    if results.across.restoration["last"]["n"]:
        figures["restoration"] = run.save_figure("restoration_by_layer.png", restoration_figure(results))
    for i, study in enumerate(results.detailed):
        title = f"{study.pair['clean']!r} vs {study.pair['corrupt']!r}"
        figures |= grid_figures(run, i, study, title)
        if all(g.exact is not None and g.attribution is not None for g in study.grids.values()):
            figures[(i, "scatter")] = run.save_figure(f"pair{i}_exact_vs_attribution.png", scatter_figure(study, title))
        if study.trace is not None:
            figures |= trace_figures(run, i, study, title)
    return figures


# ----------------------------------------------------------------------------- report.md


def top_cells(study: PairStudy, grid: PatchingGrid, k: int = 8) -> list[list]:
    """The k cells with the largest |exact| effect (or |attribution| when exact was not run)."""
    values = (grid.exact if grid.exact is not None else grid.attribution).numpy()
    exact, attribution = as_list(grid.exact), as_list(grid.attribution)
    rows = []
    for flat in np.argsort(-np.abs(values), axis=None)[:k]:
        r, c = np.unravel_index(flat, values.shape)
        where = f"L{r}H{c}" if grid.name.startswith("head") else f"layer {r}, {md_escape(study.tokens[0][c])} ({c})"
        rows.append([where, exact[r][c] if exact else None, attribution[r][c] if attribution else None])
    return rows


def write_report(results: PatchingResults, figures: dict) -> str:
    m, n = results.model, results.n_layers
    out = [f"# 004 activation patching: {m.name}", "",
           f"{n} layers, {m.n_heads} heads ({m.n_kv_heads} key/value heads), device {m.device}, dtype "
           f"{str(m.dtype).replace('torch.', '')}. Method: {results.method}; sites: {', '.join(results.sites)}.", "",
           "Metric: logit(clean answer) - logit(corrupt answer) at the last position, normalized so that 1 = "
           "the clean run and 0 = the corrupt run; read from the model's own final logits (after the final "
           "soft-cap on models that have one, e.g. Gemma-2). A clean activation is patched into the corrupt run.",
           "Rows: residual layer l = the stream entering block l (0 = embeddings, n = after the last block); "
           "attn/mlp/head rows are block indices. head_all patches a head's output (hook_z) at every position, "
           "head_final only at the final position. Cells before the first differing token are identical in both "
           "runs (the model is causal): they are not run and get the unpatched corrupt run's value (0); the "
           "positions before it are computed once per batch of patched runs (a KV cache) and shared by all.", "",
           *[f"Note: {note}" for note in m.notes], "",  # device check, offloaded layers
           f"Pairs: {results.pairs_source} Causal tracing and a section of their own: the first "
           f"{len(results.detailed)} pairs; every pair enters the statistics.", ""]
    out += across_section(results, figures)
    out += [f"## Self-checks (worst over the {len(results.pairs)} pairs)", "",
            check_lines(worst_over_prompts([study.checks for study in results.pairs])), "",
            "## Every pair", "",
            "Switch layer: the first layer from which patching the final position's clean residual into the "
            "corrupt run makes the clean answer top-1 (to the last layer). Resolution layer: 001's NORM lens on "
            "the clean prompt, the first layer from which the clean answer is top-1 (to the last layer). "
            "Correlations: Pearson r of exact vs attribution over the cells that differ between the runs.", "",
            markdown_table(["pair", "relation", "clean", "corrupt", "answers", "logit diff clean", "logit diff corrupt",
                            "p(clean answer), clean run", "switch layer (depth)", "001 resolution layer (depth)",
                            "exact vs attribution r"], [summary_row(i, s, n) for i, s in enumerate(results.pairs)]), ""]
    for i, study in enumerate(results.detailed):
        out += pair_section(i, study, n, figures)
    return "\n".join(out)


def across_section(results: PatchingResults, figures: dict) -> list[str]:
    """The statistics over pairs: a table with 95% intervals, the figures, head frequency, per relation."""
    a = results.across
    rows = [["pairs that can switch: clean run answers clean, corrupt run does not (share)", stat_text(a.switchable)],
            ["of those, share with a switch layer", stat_text(a.switch_share)],
            ["switch depth (median)", stat_text(a.switch_depth)],
            ["001 lens resolution depth (median)", stat_text(a.resolution_depth)],
            ["resolution depth - switch depth (median over pairs)", stat_text(a.lens_lag)],
            [f"last depth where the subject's residual restores (>= {RESTORED}, median)", stat_text(a.subject_until)],
            ["first depth from which the last position's residual restores (median)", stat_text(a.last_from)]]
    rows += [[f"exact vs attribution r, {g} (median)", stat_text(r)] for g, r in a.correlation.items()]
    out = ["## Across pairs", "",
           "Each statistic: value [95% seeded bootstrap interval] (n = pairs it is over; an interval needs n >= 2). "
           "Depth = layer / n_layers. Switch layer: the first layer from which patching the last position's clean "
           "residual makes the clean answer top-1 (to the last layer). Only pairs whose clean run answers clean "
           "and whose corrupt run does not can switch; every statistic below the first row, the curves and the "
           "head counts are over those pairs only (for the others the normalized effect has no meaning: the "
           "clean - corrupt logit difference can be near 0 or negative).", "",
           markdown_table(["statistic", "value [95% interval] (n)"], rows), "",
           f"![switch depth across pairs]({figures['strip']})", ""]
    if "restoration" in figures:
        out += [f"![restoration by layer]({figures['restoration']})", ""]
    out += [f"Heads most often among a pair's top {TOP_HEADS} at the final position (|effect|, exact where run; "
            "pairs that can switch):", "",
            markdown_table(["head", "share of pairs [95% interval] (n)"],
                           [[h["head"], stat_text(h["share"])] for h in a.heads[:10]]), "",
            "Per relation (intervals are wide or absent with few pairs):", "",
            markdown_table(["relation", "pairs", "can switch", "share with a switch", "switch depth (median)"],
                           [[md_escape(r), v["n"], v["switchable"], stat_text(v["switch_share"]),
                             stat_text(v["switch_depth"])]
                            for r, v in a.by_relation.items()]), ""]
    return out


def summary_row(i: int, study: PairStudy, n: int) -> list:
    correlations = {g: grid.correlation() for g, grid in study.grids.items()
                    if grid.exact is not None and grid.attribution is not None}
    b, (clean, corrupt) = study.baseline, study.answers
    return [i, md_escape(study.pair.get("relation", "-")), md_escape(study.pair["clean"]), md_escape(study.pair["corrupt"]),
            f"{md_escape(clean.token)} / {md_escape(corrupt.token)}", b.logit_diff_clean, b.logit_diff_corrupt,
            study.p_clean_answer()["clean"], depth_text(study.link.switch_layer, n),
            depth_text(study.link.resolution_layer, n),
            ", ".join(f"{g} {fmt(v, 3)}" for g, v in correlations.items()) or "-"]


def grid_section(i: int, study: PairStudy, grid: PatchingGrid, figures: dict) -> list[str]:
    out = [f"### {grid.name}", "", f"Cells that differ between the runs: {int(grid.changed.sum())}."]
    if study.exact_ran and len(grid.exact_cells) < len(grid.layout.cells):
        out[-1] += (f" Exact runs: the {len(grid.exact_cells)} of {len(grid.layout.cells)} cells with the largest "
                    "|attribution| (EXACT='top'; blank cells were screened out, and r below is over the run cells "
                    "only; EXACT='all' runs every cell).")
    if grid.exact is not None and grid.attribution is not None:
        r = grid.correlation()
        out += [f"Exact vs attribution: r = {'n/a' if r is None else f'{r:.3f}'}."]
    out += [""] + [f"![{grid.name} {m}]({figures[(i, grid.name, m)]})" for m in ("exact", "attribution")
                   if (i, grid.name, m) in figures] + [""]
    return out + [markdown_table(["cell", "exact", "attribution"], top_cells(study, grid)), ""]


def final_position_section(study: PairStudy, n: int) -> list[str]:
    link, resid = study.link, study.grids.get("resid")
    exact = as_list(resid.exact) if resid is not None else None
    attribution = as_list(resid.attribution) if resid is not None else None
    rows = [[layer, f"{layer / n:.2f}", exact[layer][-1] if exact else None,
             attribution[layer][-1] if attribution else None,
             "yes" if link.final_position_clean_is_top1[layer] else "", link.lens_target_rank[layer]]
            for layer in range(n + 1)]
    return ["### Final position's residual vs 001's lens", "",
            f"Switch layer {depth_text(link.switch_layer, n)}; 001 resolution layer "
            f"{depth_text(link.resolution_layer, n)}.", "",
            markdown_table(["layer", "depth", "exact", "attribution", "patched run answers clean",
                            "001 lens rank of clean answer"], rows), ""]


def trace_section(i: int, study: PairStudy, figures: dict) -> list[str]:
    trace, clean_tokens = study.trace, study.tokens[0]
    subject = ", ".join(f"{md_escape(clean_tokens[p])} ({p})" for p in trace.subject_positions)
    rows = []
    for kind in TRACE_KINDS:
        values = trace.restored[kind].tolist()
        best = max((value, layer, p) for layer, row in enumerate(values) for p, value in enumerate(row))
        rows.append([kind, best[1], f"{md_escape(clean_tokens[best[2]])} ({best[2]})", best[0],
                     best[0] - trace.p_noised])
    return ["### Causal tracing (ROME)", "",
            f"Noise on the subject tokens {subject} (the positions where clean and corrupt differ): Gaussian, "
            f"standard deviation {trace.noise_level} x {trace.embedding_std:.6f} (the embeddings' std "
            f"over this run's prompts) = {trace.embedding_std * trace.noise_level:.6f}, {trace.samples} samples. "
            f"p(clean answer): clean {trace.p_clean:.6f}, noised {trace.p_noised:.6f}. MLP and attention "
            f"windows: {trace.window} blocks centred on the row's block.", "",
            *[f"![trace {k}]({figures[(i, 'trace', k)]})" for k in TRACE_KINDS], "",
            markdown_table(["restored", "layer / centre block", "position", "p(clean answer)", "indirect effect"],
                           rows), ""]


def pair_section(i: int, study: PairStudy, n: int, figures: dict) -> list[str]:
    (clean, corrupt), tokens = study.answers, study.tokens
    out = [f"## Pair {i}: {md_escape(study.pair['clean'])} -> {md_escape(clean.token)} vs "
           f"{md_escape(study.pair['corrupt'])} -> {md_escape(corrupt.token)}", ""]
    if not study.clean_is_top1_in_clean_run:
        out += ["Note: the clean answer is not the model's top-1 in the clean run, so no patch can 'switch' to it.", ""]
    out += [markdown_table(["position", "clean token", "corrupt token", "differs"],
                           [[p, md_escape(c), md_escape(k), "yes" if p in study.differing_positions else ""]
                            for p, (c, k) in enumerate(zip(*tokens))]), ""]
    for grid in study.grids.values():
        out += grid_section(i, study, grid, figures)
    if (i, "scatter") in figures:
        out += [f"![exact vs attribution]({figures[(i, 'scatter')]})", ""]
    out += final_position_section(study, n)
    return out + (trace_section(i, study, figures) if study.trace is not None else [])
