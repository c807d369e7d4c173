"""004 - Activation patching: which activations cause the answer?

001-003 read the model (lens, attention, attributions); here we intervene. Each pair is two prompts that
differ in a few tokens and have different answers: clean "The capital of France is" -> " Paris", corrupt
"The capital of Italy is" -> " Rome". We run the corrupt prompt and copy ONE clean activation into it,
then ask how far the answer moves back towards the clean one:

  metric = logit(clean answer) - logit(corrupt answer) at the last position, normalized so that
           1 = the clean run and 0 = the corrupt run (from the model's final logits, after Gemma-2's soft-cap).

Exact patching does one patched run per cell, batched: the residual stream at every layer x position,
the attention and MLP outputs of every block x position, and every head's output (at all positions and at
the final one). Attribution patching estimates all those cells at once from one gradient (two forwards,
one backward) and is shown beside the exact numbers. Causal tracing (ROME) noises the subject tokens
instead - the positions where clean and corrupt differ - and restores single clean states or windows of
MLP / attention outputs. Finally the depth at which patching the final position's residual switches the
answer is compared with the depth at which 001's NORM lens resolves the same prompt.

Run:   python 004_activation_patching/run.py
Help:  python 004_activation_patching/run.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `common` imports from any folder

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
PAIRS_FILE = None  # None = this folder's pairs.json; else a JSON list of {"clean", "corrupt", "clean_answer", "corrupt_answer"}
SITES = ["resid", "attn", "mlp", "head"]  # what to patch: any of "resid", "attn", "mlp", "head"
METHOD = "both"  # one of "exact", "attribution" or "both": a patched run per cell, a gradient estimate, or both
EXACT = "top"  # one of "top" or "all": for the head/attn/mlp grids, "top" = exact runs only for the EXACT_TOP_K cells attribution ranks highest
EXACT_TOP_K = 20  # with EXACT = "top": cells confirmed exactly per grid (the residual grid is always exact)
NOISE_TRACING = True  # also run ROME's causal tracing: noise on the subject tokens, restore clean states
NOISE_SAMPLES = 5  # noised runs averaged per causal-tracing cell
NOISE_LEVEL = 3.0  # noise standard deviation in units of the embeddings' standard deviation (ROME: 3)
BATCH_SIZE = "auto"  # patched runs per forward pass: "auto" = from free memory and the model's shapes, or a number
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # seeds the causal-tracing noise and the cells re-run one at a time as a check
# ----------------------------------------------------------------------------- end of toggles

from common import hooks  # noqa: E402
from common.checks import check  # noqa: E402
from common.lens import first_layer_staying_true  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.progress import progress  # noqa: E402
from common.errors import LabError  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERIMENT = "004_activation_patching"
# Constants, not toggles (their comments sit above them, so --help does not list them as settings).
# The heatmaps: grid name -> the site it patches.
GRIDS = {"resid": "resid", "attn": "attn", "mlp": "mlp", "head_all": "head", "head_final": "head"}
# Causal tracing restores single residual states, windows of MLP outputs, windows of attention outputs.
TRACE_KINDS = ("resid", "mlp", "attn")
# How many exact cells are re-run one forward each, to check that batching changes nothing.
N_LOOP_CHECKS = 3


def check_toggles(cfg) -> list[dict]:
    """Refuse bad toggles before the model loads; return the pairs to study."""
    from common.patching import SITES, load_pairs
    sites = cfg.SITES if isinstance(cfg.SITES, list) else [cfg.SITES]
    if not sites or any(site not in SITES for site in sites):
        raise LabError(f"SITES must list some of {', '.join(map(repr, SITES))}, not {cfg.SITES!r}.")
    if cfg.EXACT_TOP_K < 1:
        raise LabError(f"EXACT_TOP_K must be at least 1, not {cfg.EXACT_TOP_K}.")
    if cfg.NOISE_SAMPLES < 1:
        raise LabError(f"NOISE_SAMPLES must be at least 1, not {cfg.NOISE_SAMPLES}.")
    if cfg.NOISE_LEVEL <= 0:
        raise LabError(f"NOISE_LEVEL must be above 0, not {cfg.NOISE_LEVEL}.")
    return load_pairs(cfg.PAIRS_FILE or HERE / "pairs.json")


def main(cfg):
    import torch

    from common import html_report, report
    from common.batching import batch_size
    from common.models import load_model
    from common.patching import embedding_std, encode_pair

    # 1. Check every input that can be checked without the model.
    pairs = check_toggles(cfg)
    torch.manual_seed(cfg.SEED)

    # 2. Load the model and tokenize every pair (a pair that cannot be patched stops the run here).
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    encoded = [encode_pair(model, pair, f"Pair {i} ({pair['clean']!r} / {pair['corrupt']!r})")
               for i, pair in enumerate(pairs)]
    cfg.BATCH_SIZE = batch_size(cfg.BATCH_SIZE, model, max(e["corrupt_ids"].shape[1] for e in encoded))
    sites = [s for s in ("resid", "attn", "mlp", "head") if s in cfg.SITES]
    grids = [g for g, site in GRIDS.items() if site in sites]
    noise_std = embedding_std(model, [e[k] for e in encoded for k in ("clean_ids", "corrupt_ids")]) \
        if cfg.NOISE_TRACING else None

    # 3. Each pair: baselines, exact and attribution patching, causal tracing, the link to 001.
    records = [study_pair(model, cfg, pair, enc, grids, noise_std, seed=cfg.SEED + i)
               for i, (pair, enc) in enumerate(progress(list(zip(pairs, encoded)), "pairs", unit="pair"))]
    results = {"experiment": EXPERIMENT, "model": model.name, "n_layers": model.n_layers,
               "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "sites": sites, "grids": grids,
               "method": cfg.METHOD, "metric": "normalized logit difference (1 = clean run, 0 = corrupt run)",
               "noise_tracing": cfg.NOISE_TRACING, "pairs": records}

    # 4. Write the run folder: numbers, settings, figures, and the report a person reads.
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        figures = draw_figures(run, results)
        run.write_text("report.md", write_report(results, figures, model))
        html_report.write_page(run, results)
    report.finish_run(run.final_path, findings(results), [c["name"] for r in records for c in r["self_checks"]
                                                          if not c["passed"]])
    return run.final_path


def findings(results) -> list[str]:
    """The headline per pair in plain words: where patching the last position restores the clean answer."""
    n, lines = results["n_layers"], []

    def from_layer(layer):
        return "at no layer" if layer is None else f"from layer {layer} of {n} ({100 * layer / n:.0f}% depth)"
    for i, pair in enumerate(results["pairs"][:3]):
        link = pair["link_to_001"]
        lines.append(f"Pair {i} ({pair['clean']!r}): patching the clean residual into the last position restores "
                     f"{pair['clean_answer_token']!r} as top-1 {from_layer(link['switch_layer'])}; 001's lens "
                     f"makes it top-1 {from_layer(link['resolution_layer'])}.")
    return lines


# ----------------------------------------------------------------------------- one pair


def grid_layout(model, grid: str, seq: int) -> dict:
    """Cells and axis labels of one heatmap: rows are layers (resid) or blocks, columns positions or heads."""
    from common import patching as P
    names = hooks.site_names(GRIDS[grid], model.n_layers)
    if grid == "head_all":
        cells, cols = P.head_cells(names, model.n_heads), model.n_heads
    elif grid == "head_final":
        cells, cols = P.head_cells(names, model.n_heads, position=seq - 1), model.n_heads
    else:
        cells, cols = P.position_cells(names, seq), seq
    return {"cells": cells, "hook_names": names, "shape": (len(names), cols)}


def study_pair(model, cfg, pair, enc, grids, noise_std, seed) -> dict:
    """Everything about one pair: its baselines, the patching grids, the self-checks, causal tracing, the link
    to 001. Returns the pair's record in results.json."""
    import torch

    from common import lens
    from common import patching as P
    from common.prompts import token_strings

    clean_ids, corrupt_ids = enc["clean_ids"], enc["corrupt_ids"]
    clean_id, corrupt_id = enc["clean_target"].token_id, enc["corrupt_target"].token_id
    seq, n = clean_ids.shape[1], model.n_layers
    layouts = {g: grid_layout(model, g, seq) for g in grids}
    resid_names = hooks.site_names("resid", n)
    names = sorted({name for layout in layouts.values() for name in layout["hook_names"]} | set(resid_names))

    # Baselines: the clean and the corrupt run, with every activation a patch may copy.
    clean_logits, clean_acts = P.cache_activations(model, clean_ids, names)
    corrupt_logits, corrupt_acts = P.cache_activations(model, corrupt_ids, names)
    readout = P.answer_readout(clean_id, corrupt_id)
    clean_read, corrupt_read = readout(clean_logits[None]), readout(corrupt_logits[None])
    ld_clean, ld_corrupt = float(clean_read["logit_diff"][0]), float(corrupt_read["logit_diff"][0])
    tol_logit = P.logit_tolerance(model.dtype, clean_logits)
    if abs(ld_clean - ld_corrupt) <= tol_logit:
        raise LabError(f"Pair {pair['clean']!r} / {pair['corrupt']!r}: the logit difference of the answers is "
                       f"the same in both runs ({ld_clean:.4f}), so there is nothing to restore: pick a pair the "
                       "model answers differently.")
    tol = tol_logit / abs(ld_clean - ld_corrupt)  # the same tolerance, in normalized units

    def norm(values):
        return P.normalize(values, ld_clean, ld_corrupt)

    record = {key: pair[key] for key in P.PAIR_FIELDS} | {
        "id": pair.get("id", ""),
        "clean_answer_token": enc["clean_target"].token, "clean_answer_id": clean_id,
        "corrupt_answer_token": enc["corrupt_target"].token, "corrupt_answer_id": corrupt_id,
        "clean_tokens": token_strings(model.tokenizer, clean_ids[0]),
        "corrupt_tokens": token_strings(model.tokenizer, corrupt_ids[0]),
        "differing_positions": P.differing_positions(clean_ids, corrupt_ids),
        "logit_diff_clean": ld_clean, "logit_diff_corrupt": ld_corrupt,
        "p_clean_answer": {"clean": float(clean_read["p_clean"][0]), "corrupt": float(corrupt_read["p_clean"][0])},
        "clean_answer_top1_in_clean_run": bool(clean_read["clean_is_top1"][0]),
        "exact": {}, "attribution": {}, "correlation": {}, "changed_cells": {}}
    changed = {g: ~torch.tensor(P.unchanged_cells(layout["cells"], clean_acts, corrupt_acts))
               for g, layout in layouts.items()}
    record["changed_cells"] = {g: int(c.sum()) for g, c in changed.items()}
    checks = []

    # Attribution patching (every cell from one backward pass), then exact patching (batched) of the resid grid
    # and, with EXACT="top", only of the cells attribution ranks highest; then the identity checks.
    final_cells = [[(name, (seq - 1,))] for name in resid_names]
    if cfg.METHOD in ("attribution", "both") or cfg.EXACT == "top":
        record["attribution"], attribution_check = attribution_patching(
            model, corrupt_ids, layouts, names, clean_acts, (clean_id, corrupt_id), ld_clean, ld_corrupt, tol_logit)
        checks.append(attribution_check)
    if cfg.METHOD in ("exact", "both"):
        chosen = exact_cells(cfg, layouts, record["attribution"], changed)
        record["exact_cells"] = {g: {"run": len(c), "of": len(layouts[g]["cells"])} for g, c in chosen.items()}
        record["exact"], final_top1, batch_check = exact_patching(model, cfg, corrupt_ids, layouts, chosen,
                                                                  clean_acts, corrupt_acts, readout, norm, tol, seed)
        checks.append(batch_check)
    if "resid" not in record["exact"]:  # the link to 001 needs the final position's residual, patched exactly
        final_top1 = P.patch_batched(model, corrupt_ids, final_cells, clean_acts, readout, cfg.BATCH_SIZE,
                                     base=corrupt_acts)["clean_is_top1"].tolist()
    checks += identity_checks(model, cfg, clean_ids, corrupt_ids, clean_acts, corrupt_acts, final_cells,
                              resid_names, readout, norm, tol)
    if cfg.METHOD == "exact":
        record["attribution"] = {}  # computed only to choose the exact cells
    for g in grids:
        if g in record["exact"] and g in record["attribution"]:
            exact, estimate = (P.grid_values(record[m][g]).flatten() for m in ("exact", "attribution"))
            record["correlation"][g] = P.pearson(exact[changed[g]], estimate[changed[g]])

    # The link to 001: where the final position's residual switches the answer vs where the lens resolves it.
    switch = first_layer_staying_true([bool(x) for x in final_top1])
    sweep = lens.sweep(model, clean_ids, clean_id, use_norm=True)[1.0]
    resolution = lens.resolution_depth(sweep.target_rank, sweep.target_prob, sweep.entropy)["first_top1_layer"]
    record["link_to_001"] = {
        "switch_layer": switch, "switch_depth": None if switch is None else switch / n,
        "resolution_layer": resolution, "resolution_depth": None if resolution is None else resolution / n,
        "final_position_clean_is_top1": final_top1, "lens_target_rank": sweep.target_rank}

    if cfg.NOISE_TRACING:
        record["causal_trace"], trace_check = trace_pair(model, cfg, clean_ids, clean_acts, record, readout,
                                                         noise_std, tol_logit, seed)
        checks.append(trace_check)
    record["self_checks"] = checks
    return record


def exact_cells(cfg, layouts, estimates, changed) -> dict[str, list[int]]:
    """Which cells of each grid run exactly: all of them, or (EXACT="top") the resid grid and the EXACT_TOP_K
    changed cells per other grid with the largest |attribution| estimate. Flat indices per grid."""
    import torch

    from common import patching as P
    return {g: list(range(len(layout["cells"]))) if cfg.EXACT == "all" or g == "resid" else
            P.strongest_cells(torch.tensor(estimates[g]).flatten(), changed[g], cfg.EXACT_TOP_K)
            for g, layout in layouts.items()}


def exact_patching(model, cfg, corrupt_ids, layouts, chosen, clean_acts, corrupt_acts, readout, norm, tol, seed):
    """The chosen cells of every grid patched clean into corrupt, batched. Cells that would write what is
    already there are not run (they get the unpatched corrupt run's value, 0); cells not chosen stay None.

    Returns ({grid: normalized values [rows][cols]}, the final position's residual column as "clean answer is
    top-1" flags (None without the resid grid), the batched-vs-alone self-check).
    """
    from common import patching as P
    all_cells = [layout["cells"][i] for g, layout in layouts.items() for i in chosen[g]]
    out = P.patch_batched(model, corrupt_ids, all_cells, clean_acts, readout, cfg.BATCH_SIZE, base=corrupt_acts,
                          description=f"exact patching, {len(all_cells)} cells")
    grids, final_top1, start = {}, None, 0
    for g, layout in layouts.items():
        count = len(chosen[g])
        grids[g] = P.fill_grid(norm(out["logit_diff"][start:start + count]), chosen[g], layout["shape"])
        if g == "resid":  # always complete: every cell chosen
            final_top1 = out["clean_is_top1"][start:start + count].reshape(layout["shape"])[:, -1].tolist()
        start += count
    return grids, final_top1, loop_check(model, corrupt_ids, all_cells, out, clean_acts, readout, norm, tol, seed)


def attribution_patching(model, corrupt_ids, layouts, names, clean_acts, answer_ids, ld_clean, ld_corrupt, tol_logit):
    """Attribution patching of every grid: (clean - corrupt) . d(logit diff)/d(activation) at the corrupt run,
    normalized like the exact values. Returns ({grid: [rows][cols]}, the self-check of its corrupt forward)."""
    from common import patching as P
    clean_id, corrupt_id = answer_ids

    def logit_diff(logits):
        return logits[clean_id] - logits[corrupt_id]
    products, ld_grad_run = P.attribution_products(model, corrupt_ids, names, clean_acts, logit_diff)
    grids = {}
    for g, layout in layouts.items():
        estimate = P.attribution_for_cells(products, layout["cells"]) / (ld_clean - ld_corrupt)
        grids[g] = estimate.reshape(layout["shape"]).tolist()
    return grids, check("attribution's corrupt forward == the corrupt run (logit difference)",
                        abs(ld_grad_run - ld_corrupt), tol_logit)


def identity_checks(model, cfg, clean_ids, corrupt_ids, clean_acts, corrupt_acts, final_cells, resid_names,
                    readout, norm, tol) -> list[dict]:
    """Patching must give 0 when it writes nothing, 1 when it writes everything, 1 clean into clean."""
    from common import patching as P
    every_position = (slice(None),)
    cells = [[], [(resid_names[-1], every_position)], [(resid_names[0], every_position)]]
    out = norm(P.patch_batched(model, corrupt_ids, cells, clean_acts, readout, cfg.BATCH_SIZE)["logit_diff"])
    clean_into_clean = norm(P.patch_batched(model, clean_ids, final_cells, clean_acts, readout,
                                            cfg.BATCH_SIZE)["logit_diff"])
    corrupt_into_corrupt = norm(P.patch_batched(model, corrupt_ids, final_cells, corrupt_acts, readout,
                                                cfg.BATCH_SIZE)["logit_diff"])
    return [check("corrupt run in a batch, nothing patched == 0", abs(float(out[0])), tol),
            check("whole residual at the last layer, all positions == 1", abs(float(out[1]) - 1), tol),
            check("whole residual at layer 0 (embeddings), all positions == 1", abs(float(out[2]) - 1), tol),
            check("clean into clean (final-position residual, every layer) == 1",
                  float((clean_into_clean - 1).abs().max()), tol),
            check("corrupt into corrupt (final-position residual, every layer) == 0",
                  float(corrupt_into_corrupt.abs().max()), tol)]


def loop_check(model, corrupt_ids, cells, batched, clean_acts, readout, norm, tol, seed) -> dict:
    """Re-run a few seeded exact cells one forward each: batching must not change their value."""
    import torch

    from common import patching as P
    ran = torch.nonzero(batched["ran"]).flatten()
    picks = ran[torch.randperm(len(ran), generator=torch.Generator().manual_seed(seed))[:N_LOOP_CHECKS]].tolist()
    diff = 0.0
    for i in picks:
        alone = P.patch_batched(model, corrupt_ids, [cells[i]], clean_acts, readout, batch_size=1)
        diff = max(diff, abs(float(norm(alone["logit_diff"])[0] - norm(batched["logit_diff"][i:i + 1])[0])))
    return check(f"batched == one forward per cell ({len(picks)} cells re-run alone)", diff, tol)


def trace_pair(model, cfg, clean_ids, clean_acts, record, readout, noise_std, tol_logit, seed):
    """ROME's causal tracing of one pair: noise on the differing positions (the subject), restore clean states."""
    from common import patching as P
    n, seq = model.n_layers, clean_ids.shape[1]
    window = P.trace_window(n)
    kinds = {"resid": P.position_cells(hooks.site_names("resid", n), seq),
             "mlp": P.window_cells(hooks.site_names("mlp", n), seq, window),
             "attn": P.window_cells(hooks.site_names("attn", n), seq, window)}
    restore_all = [[(hooks.resid(0), (slice(None),))]]  # check: removes all the noise
    cells = [cell for kind in TRACE_KINDS for cell in kinds[kind]] + restore_all
    names = sorted({name for cell in cells for name, _ in cell})
    missing = [name for name in names if name not in clean_acts]
    acts = clean_acts | (P.cache_activations(model, clean_ids, missing)[1] if missing else {})
    subject = record["differing_positions"]
    noise = P.gaussian_noise(cfg.NOISE_SAMPLES, len(subject), model.d_model, cfg.NOISE_LEVEL * noise_std, seed)
    out = P.causal_trace(model, clean_ids, acts, cells, readout, noise, subject, cfg.BATCH_SIZE)
    p_clean = record["p_clean_answer"]["clean"]
    trace = {"subject_positions": subject, "noise_std": noise_std * cfg.NOISE_LEVEL,
             "embedding_std": noise_std, "noise_level": cfg.NOISE_LEVEL, "samples": cfg.NOISE_SAMPLES,
             "window": window, "metric": "p(clean answer)", "p_clean": p_clean, "p_noised": out["p_noised"]}
    start = 0
    for kind in TRACE_KINDS:
        rows = len(kinds[kind]) // seq
        trace[kind] = out["restored"][start:start + rows * seq].reshape(rows, seq).tolist()
        start += rows * seq
    restored_all = float(out["restored"][-1])
    return trace, check("causal trace: restoring every clean embedding removes the noise (p == clean p)",
                        abs(restored_all - p_clean), tol_logit)


# ----------------------------------------------------------------------------- figures


def grid_labels(results, record, grid) -> tuple[list[str], list[str], str, str]:
    """Row labels, column labels and axis names of a grid drawn as [columns-of-positions as rows, ...]."""
    n = results["n_layers"]
    if grid.startswith("head"):
        return [str(b) for b in range(n)], [str(h) for h in range(results["n_heads"])], "block", "head"
    tokens = [f"{p}: {c}" + (f" / {k}" if c != k else "") for p, (c, k) in
              enumerate(zip(record["clean_tokens"], record["corrupt_tokens"]))]
    layers = [str(layer) for layer in range(n + 1 if grid == "resid" else n)]
    return tokens, layers, "position: clean / corrupt token", "layer" if grid == "resid" else "block"


def oriented(grid, matrix):
    """Position grids are stored [layers, positions] and drawn [positions, layers] (tokens down the side)."""
    import numpy as np
    data = np.asarray(matrix, dtype=float)
    return data if grid.startswith("head") else data.T


def draw_figures(run, results) -> dict:
    """Per pair: a heatmap per grid and method, the exact-vs-attribution scatter, the causal-trace heatmaps."""
    import numpy as np

    from common.report import heatmap
    figures = {}
    for i, record in enumerate(results["pairs"]):
        title = f"{record['clean']!r} vs {record['corrupt']!r}"
        for grid in results["grids"]:
            rows, cols, ylabel, xlabel = grid_labels(results, record, grid)
            present = {m: np.asarray(record[m][grid], dtype=float) for m in ("exact", "attribution")
                       if grid in record[m]}  # None (a cell EXACT="top" did not run) -> nan: drawn blank
            limit = max([1.0] + [float(np.nanmax(np.abs(v))) for v in present.values()])
            for method, matrix in present.items():
                fig = heatmap(oriented(grid, matrix), rows, cols,
                              f"{title}\n{grid} patching ({method}), clean into corrupt", "normalized logit diff",
                              cmap="RdBu_r", vmin=-limit, vmax=limit, xlabel=xlabel, ylabel=ylabel)
                figures[(i, grid, method)] = run.save_figure(f"pair{i}_{grid}_{method}.png", fig)
        if record["exact"] and record["attribution"]:
            figures[(i, "scatter")] = run.save_figure(f"pair{i}_exact_vs_attribution.png",
                                                      scatter_figure(record, results["grids"], title))
        trace = record.get("causal_trace")
        if trace:
            rows, _, ylabel, _ = grid_labels(results, record, "resid")
            for kind in TRACE_KINDS:
                what = {"resid": "single residual states", "mlp": f"MLP outputs, window {trace['window']}",
                        "attn": f"attention outputs, window {trace['window']}"}[kind]
                cols = [str(c) for c in range(len(trace[kind]))]
                fig = heatmap(np.asarray(trace[kind]).T, rows, cols,
                              f"{title}\ncausal trace: restoring {what} (noised p = {trace['p_noised']:.3f})",
                              "p(clean answer)", cmap={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}[kind],
                              vmin=0, xlabel="layer" if kind == "resid" else "centre block", ylabel=ylabel)
                figures[(i, "trace", kind)] = run.save_figure(f"pair{i}_trace_{kind}.png", fig)
    return figures


def scatter_figure(record, grids, title):
    """Exact (x) against attribution (y) for every cell, one colour per grid, with the diagonal."""
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 6))
    values = []
    for grid in grids:
        x, y = (np.asarray(record[m][grid], dtype=float).ravel() for m in ("exact", "attribution"))
        r = record["correlation"].get(grid)
        ax.scatter(x, y, s=10, alpha=0.6, label=f"{grid} (r = {r:.2f})" if r is not None else grid)
        values += [x, y]
    low, high = float(np.min(np.concatenate(values))), float(np.max(np.concatenate(values)))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, label="attribution = exact")
    ax.set_xlabel("exact patching (normalized logit diff)")
    ax.set_ylabel("attribution patching (estimate)")
    ax.set_title(f"{title}\nexact vs attribution patching")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- report


def depth_text(layer, n) -> str:
    return "never" if layer is None else f"{layer} ({layer / n:.2f})"


def top_cells(record, grid, results, k: int = 8) -> list[list]:
    """The k cells with the largest |exact| effect (or |attribution| when exact was not run)."""
    import numpy as np
    from common.report import md_escape
    method = "exact" if grid in record["exact"] else "attribution"
    values = np.asarray(record[method][grid], dtype=float)
    order = np.argsort(-np.abs(values), axis=None)[:k]
    rows = []
    for flat in order:
        r, c = np.unravel_index(flat, values.shape)
        where = f"L{r}H{c}" if grid.startswith("head") else f"layer {r}, {md_escape(record['clean_tokens'][c])} ({c})"
        exact = record["exact"][grid][r][c] if grid in record["exact"] else None
        attribution = record["attribution"][grid][r][c] if grid in record["attribution"] else None
        rows.append([where, exact, attribution])
    return rows


def write_report(results, figures, model) -> str:
    from common.report import check_lines, fmt, markdown_table, md_escape
    n = results["n_layers"]
    out = [f"# 004 activation patching: {results['model']}", "",
           f"{n} layers, {results['n_heads']} heads ({results['n_kv_heads']} key/value heads), device "
           f"{model.device}, dtype {str(model.dtype).replace('torch.', '')}. Method: {results['method']}; "
           f"sites: {', '.join(results['sites'])}.", "",
           "Metric: logit(clean answer) - logit(corrupt answer) at the last position, normalized so that 1 = "
           "the clean run and 0 = the corrupt run; read from the model's own final logits (after the final "
           "soft-cap on models that have one, e.g. Gemma-2). A clean activation is patched into the corrupt run.",
           "Rows: residual layer l = the stream entering block l (0 = embeddings, n = after the last block); "
           "attn/mlp/head rows are block indices. head_all patches a head's output (hook_z) at every position, "
           "head_final only at the final position. Cells before the first differing token are identical in both "
           "runs (the model is causal): they are not run and get the unpatched corrupt run's value (0).", "",
           *[f"Note: {note}" for note in model.notes], "",  # device check, offloaded layers
           "## Self-checks", ""]
    for i, record in enumerate(results["pairs"]):
        out += [f"Pair {i}:", "", check_lines(record["self_checks"]), ""]

    out += ["## Summary", "",
            "Switch layer: the first layer from which patching the final position's clean residual into the "
            "corrupt run makes the clean answer top-1 (to the last layer). Resolution layer: 001's NORM lens on "
            "the clean prompt, the first layer from which the clean answer is top-1 (to the last layer). "
            "Correlations: Pearson r of exact vs attribution over the cells that differ between the runs.", ""]
    rows = []
    for i, r in enumerate(results["pairs"]):
        link = r["link_to_001"]
        corr = ", ".join(f"{g} {fmt(v, 3)}" for g, v in r["correlation"].items()) or "-"
        rows.append([i, md_escape(r["clean"]), md_escape(r["corrupt"]),
                     f"{md_escape(r['clean_answer_token'])} / {md_escape(r['corrupt_answer_token'])}",
                     r["logit_diff_clean"], r["logit_diff_corrupt"], r["p_clean_answer"]["clean"],
                     depth_text(link["switch_layer"], n), depth_text(link["resolution_layer"], n), corr])
    out += [markdown_table(["pair", "clean", "corrupt", "answers", "logit diff clean", "logit diff corrupt",
                            "p(clean answer), clean run", "switch layer (depth)", "001 resolution layer (depth)",
                            "exact vs attribution r"], rows), ""]

    for i, record in enumerate(results["pairs"]):
        out += pair_section(i, record, results, figures)
    return "\n".join(out)


def pair_section(i, record, results, figures) -> list[str]:
    from common.report import markdown_table, md_escape
    n = results["n_layers"]
    out = [f"## Pair {i}: {md_escape(record['clean'])} -> {md_escape(record['clean_answer_token'])} vs "
           f"{md_escape(record['corrupt'])} -> {md_escape(record['corrupt_answer_token'])}", ""]
    if not record["clean_answer_top1_in_clean_run"]:
        out += ["Note: the clean answer is not the model's top-1 in the clean run, so no patch can 'switch' to it.", ""]
    out += [markdown_table(["position", "clean token", "corrupt token", "differs"],
                           [[p, md_escape(c), md_escape(k), "yes" if p in record["differing_positions"] else ""]
                            for p, (c, k) in enumerate(zip(record["clean_tokens"], record["corrupt_tokens"]))]), ""]
    for grid in results["grids"]:
        out += [f"### {grid}", "", f"Cells that differ between the runs: {record['changed_cells'][grid]}."]
        exact_run = record.get("exact_cells", {}).get(grid)
        if exact_run and exact_run["run"] < exact_run["of"]:
            out[-1] += (f" Exact runs: the {exact_run['run']} of {exact_run['of']} cells with the largest |attribution| "
                        "(EXACT='top'; blank cells were screened out, and r below is over the run cells only; EXACT='all' runs every cell).")
        if grid in record["correlation"]:
            r = record["correlation"][grid]
            out += [f"Exact vs attribution: r = {'n/a' if r is None else f'{r:.3f}'}."]
        out += [""] + [f"![{grid} {m}]({figures[(i, grid, m)]})" for m in ("exact", "attribution")
                       if (i, grid, m) in figures] + [""]
        out += [markdown_table(["cell", "exact", "attribution"], top_cells(record, grid, results)), ""]
    if (i, "scatter") in figures:
        out += [f"![exact vs attribution]({figures[(i, 'scatter')]})", ""]

    link = record["link_to_001"]
    out += ["### Final position's residual vs 001's lens", "",
            f"Switch layer {depth_text(link['switch_layer'], n)}; 001 resolution layer "
            f"{depth_text(link['resolution_layer'], n)}.", ""]
    exact = record["exact"].get("resid")
    attribution = record["attribution"].get("resid")
    rows = [[layer, f"{layer / n:.2f}", exact[layer][-1] if exact else None,
             attribution[layer][-1] if attribution else None,
             "yes" if link["final_position_clean_is_top1"][layer] else "", link["lens_target_rank"][layer]]
            for layer in range(n + 1)]
    out += [markdown_table(["layer", "depth", "exact", "attribution", "patched run answers clean",
                            "001 lens rank of clean answer"], rows), ""]

    trace = record.get("causal_trace")
    if trace:
        subject = ", ".join(f"{md_escape(record['clean_tokens'][p])} ({p})" for p in trace["subject_positions"])
        out += ["### Causal tracing (ROME)", "",
                f"Noise on the subject tokens {subject} (the positions where clean and corrupt differ): Gaussian, "
                f"standard deviation {trace['noise_level']} x {trace['embedding_std']:.6f} (the embeddings' std "
                f"over this run's prompts) = {trace['noise_std']:.6f}, {trace['samples']} samples. p(clean "
                f"answer): clean {trace['p_clean']:.6f}, noised {trace['p_noised']:.6f}. MLP and attention "
                f"windows: {trace['window']} blocks centred on the row's block.", ""]
        out += [f"![trace {k}]({figures[(i, 'trace', k)]})" for k in TRACE_KINDS] + [""]
        rows = []
        for kind in TRACE_KINDS:
            best = max(((value, layer, p) for layer, row in enumerate(trace[kind]) for p, value in enumerate(row)))
            rows.append([kind, best[1], f"{md_escape(record['clean_tokens'][best[2]])} ({best[2]})", best[0],
                         best[0] - trace["p_noised"]])
        out += [markdown_table(["restored", "layer / centre block", "position", "p(clean answer)",
                                "indirect effect"], rows), ""]
    return out


if __name__ == "__main__":
    main(parse_toggles(globals()))
