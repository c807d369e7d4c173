"""Measures of 004: batched activation patching against one forward per cell, and the default run (exact
patching only of the cells attribution patching ranks highest) against the exhaustive one."""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import REPO, alternating_medians

CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"
BATCH_SIZE = 32  # 004's default BATCH_SIZE


def patching_batched_vs_loop() -> float:
    """Residual patching over all layers x positions: the engine as 004 runs it (BATCH_SIZE cells per forward,
    the positions before the first differing token run once per batch from a KV cache) / one whole-prompt
    forward per cell. Both run every cell (no skipping of unchanged cells), with the same hooks and readout.
    Also prints the batched engine without the shared prefix, to show what each of the two saves."""
    import torch

    from common import hooks
    from common.interventions import BaseRun, cache_run, run_rows
    from common.models import load_model
    from common.patching import answer_readout, differing_positions, patch_rows, position_cells
    from common.prompts import encode, target_token
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", "cpu", "float32")
    clean, corrupt = encode(model, CLEAN), encode(model, CORRUPT)
    readout = answer_readout(target_token(model.tokenizer, CLEAN, "Paris").token_id,
                             target_token(model.tokenizer, CORRUPT, "Rome").token_id)
    names = hooks.site_names("resid", model.n_layers)
    clean_acts, corrupt_acts = cache_run(model, clean, names).acts, cache_run(model, corrupt, names).acts
    rows = patch_rows(position_cells(names, clean.shape[1]), clean_acts)  # 31 layers x 5 positions = 155 cells
    shared = differing_positions(clean, corrupt)[0]

    def run(batch_size, prefix):
        base = BaseRun(corrupt, corrupt_acts, shared_prefix=prefix)
        return lambda: run_rows(model, base, rows, readout, batch_size, skip_unchanged=False)
    times = alternating_medians({"batched": run(BATCH_SIZE, shared), "batched, whole prompt": run(BATCH_SIZE, 0),
                                 "loop": run(1, 0)}, repeats=3, warmup=1)
    print(f"  batched, whole prompt / loop: {times['batched, whole prompt'] / times['loop']:.3f}; medians "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items()), flush=True)
    return times["batched"] / times["loop"]


def _run_004(out: Path, exact: str) -> tuple[float, dict]:
    """Wall time of 004's default run (20 fact pairs, causal tracing of the first 2) as the user starts it, with
    EXACT = `exact`, and its results.json."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "004_activation_patching" / "run.py"), f"--OUT_DIR={out}",
                           f"--EXACT={exact}"], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"004 failed:\n{done.stderr[-2000:]}")
    [results] = [p for p in out.glob("*/*/results.json") if not p.parent.is_symlink()]
    return seconds, json.loads(results.read_text())


def _top(grid, k: int) -> set:
    cells = [(abs(v), (r, c)) for r, row in enumerate(grid) for c, v in enumerate(row) if v is not None and v == v]
    return {cell for _, cell in sorted(cells, reverse=True)[:k]}


def patching_default_vs_exhaustive() -> float:
    """Wall time of 004's default run (EXACT="top": exact patching only of the cells attribution ranks highest)
    / the same run with EXACT="all", on the embedded model: 20 pairs from the fact set, causal tracing of 2 (the
    same in both). One run each (each is minutes long). Also prints what the screen keeps, pair by pair: the
    median and lowest recall of the exhaustive top-20 cells per grid, on how many pairs the top-5 heads at the
    last position and the switch layer are the same; and the floor set by the grids alone: the patched runs of
    the default run over those of the exhaustive one (the residual grid is exact in both, as it should be)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times, results = {}, {}
        for exact in ("top", "all"):
            times[exact], results[exact] = _run_004(tmp / exact, exact)
    pairs = list(zip(results["top"]["pairs"], results["all"]["pairs"]))
    for grid in ("attn", "mlp", "head_all", "head_final"):
        recalls = sorted(len(_top(full["exact"][grid], 20) & _top(top["exact"][grid], 20)) / 20 for top, full in pairs)
        print(f"  {grid}: recall of the exhaustive top-20 cells, median {recalls[len(recalls) // 2]:.2f}, "
              f"lowest {recalls[0]:.2f} over {len(pairs)} pairs", flush=True)
    rows = {exact: sum(min(cells["run"], pair["changed_cells"][grid]) for pair in results[exact]["pairs"]
                       for grid, cells in pair["exact_cells"].items()) for exact in ("top", "all")}
    print(f"  patched runs in the grids (cells that write something new), default / exhaustive: {rows['top']} / "
          f"{rows['all']} = {rows['top'] / rows['all']:.3f}: the ratio if nothing but those runs took time",
          flush=True)
    print("  the same count at the lab's 7-9B shapes (these pairs' changed cells scaled to each model's layers and "
          "heads; arithmetic, not timed): " + ", ".join(
              f"{name} {ratio:.3f}" for name, ratio in grid_runs_at_scale(results["top"]["pairs"]).items()), flush=True)
    same_heads = sum(_top(full["exact"]["head_final"], 5) == _top(top["exact"]["head_final"], 5) for top, full in pairs)
    same_switch = sum(top["link_to_001"]["switch_layer"] == full["link_to_001"]["switch_layer"] for top, full in pairs)
    print(f"  same top-5 heads (head_final) on {same_heads} of {len(pairs)} pairs; same switch layer on "
          f"{same_switch}; {times['top']:.0f} s vs {times['all']:.0f} s", flush=True)
    return times["top"] / times["all"]


def grid_runs_at_scale(pairs: list[dict], top_k: int = 20) -> dict:
    """{model: default / exhaustive patched runs in the grids} for the seed models' configs (model-configs/), from
    one run's pairs: each grid's changed cells scaled from the run's model to that model's layers (resid: layers
    + 1) and heads (every head cell changes), EXACT_TOP_K cells confirmed per head, attention and MLP grid."""
    from common.standins import SEED_MODELS, seed_config
    out = {}
    for name in SEED_MODELS:
        config = seed_config(name)
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        top = everything = 0
        for pair in pairs:
            run_layers = len(pair["exact"]["mlp"])
            changed = pair["changed_cells"]
            resid = changed["resid"] * (layers + 1) / (run_layers + 1)
            blocks = [changed[g] * layers / run_layers for g in ("attn", "mlp")] + [layers * heads] * 2
            top += resid + sum(min(top_k, cells) for cells in blocks)
            everything += resid + sum(blocks)
        out[name] = top / everything
    return out


MEASURES = [
    ("patching_batched_vs_loop", "<= 0.1", patching_batched_vs_loop),
    ("patching_default_vs_exhaustive", "<= 0.2", patching_default_vs_exhaustive),
]
