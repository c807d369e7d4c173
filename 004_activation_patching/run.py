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

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # common/ and this folder's report module

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
PAIRS = "facts"  # one of "facts" or "file": "facts" = N_PAIRS pairs built from FACTS_FILE (two facts of one relation, same token count); "file" = the pairs in PAIRS_FILE
N_PAIRS = 20  # with PAIRS = "facts": how many pairs to build (fewer if the fact set has fewer); the statistics across pairs are over these
FACTS_FILE = None  # None = 001's fact set (001_layers_and_logits/prompts.json); else a fact set in its format
PAIRS_FILE = None  # None = this folder's pairs.json when PAIRS = "file"; a path here means PAIRS = "file": a JSON list of {"clean", "corrupt", "clean_answer", "corrupt_answer"}
DETAIL_PAIRS = 2  # the first pairs that get causal tracing (with NOISE_TRACING) and their own heatmaps in report.md; every pair enters the statistics
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
SEED = 0  # seeds the pairs built from the facts, the causal-tracing noise, the cells re-run one at a time as a check, the bootstrap intervals
# ----------------------------------------------------------------------------- end of toggles

import common  # noqa: E402,F401 - first: it sets PYTORCH_ENABLE_MPS_FALLBACK before torch loads
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from common import html_report, report  # noqa: E402
from common.batching import batch_size  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.errors import LabError  # noqa: E402
from common.facts import counterfactual_pairs, load_fact_set  # noqa: E402
from common.models import load_model  # noqa: E402
from common.patching import (PATCH_SITES, StudySettings, across_pairs, embedding_std, encode_pair,  # noqa: E402
                             grids_for_sites, load_pairs, study_pair)
from common.progress import progress  # noqa: E402
from patching_report import PatchingResults, draw_figures, findings, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERIMENT = "004_activation_patching"
FACTS_001 = HERE.parent / "001_layers_and_logits" / "prompts.json"
LOOP_CHECKS = 3  # exact cells re-run the plain way (one whole forward each), to check the batched engine


def main(cfg):
    # 1. Check every input that can be checked without the model.
    source, items = check_toggles(cfg)
    torch.manual_seed(cfg.SEED)

    # 2. Load the model; build the pairs for its tokenizer (or take the file's) and tokenize every pair (a pair
    #    that cannot be patched stops the run here).
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    pairs = items if source == "file" else pairs_from_facts(model, items, cfg)
    labels = [f"Pair {i} ({pair['clean']!r} / {pair['corrupt']!r})" for i, pair in enumerate(pairs)]
    encoded = [encode_pair(model, pair, label) for pair, label in zip(pairs, labels)]
    cfg.BATCH_SIZE = batch_size(cfg.BATCH_SIZE, model, max(e.corrupt_ids.shape[1] for e in encoded))
    sites, settings = [s for s in PATCH_SITES if s in cfg.SITES], study_settings(cfg)
    noise_std = embedding_std(model, [ids for e in encoded[:cfg.DETAIL_PAIRS] for ids in (e.clean_ids, e.corrupt_ids)]) \
        if cfg.NOISE_TRACING and cfg.DETAIL_PAIRS else None

    # 3. Each pair: baselines, attribution and exact patching with their self-checks, the link to 001's lens,
    #    causal tracing (the first DETAIL_PAIRS pairs); then the statistics across pairs.
    studies = [study_pair(model, pair, enc, grids_for_sites(sites), replace(settings, noise_tracing=(
                   settings.noise_tracing and i < cfg.DETAIL_PAIRS)), noise_std, cfg.SEED + i, labels[i])
               for i, (pair, enc) in enumerate(progress(list(zip(pairs, encoded)), "pairs", unit="pair"))]
    results = PatchingResults(EXPERIMENT, model, sites, cfg.METHOD, cfg.NOISE_TRACING, studies,
                              across_pairs(studies, cfg.SEED), pairs_text(source, cfg, len(pairs)), cfg.DETAIL_PAIRS)

    # 4. Write the run folder: numbers, settings, figures, the report a person reads, the page to explore.
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", results.to_json())
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        run.write_text("report.md", write_report(results, draw_figures(run, results)))
        html_report.write_page(run, results.to_json())

    # 5. Say where it is, what to open and what it found (and any self-check that failed).
    report.finish_run(run.final_path, findings(results), results.failed_checks())
    return run.final_path


def check_toggles(cfg) -> list[dict]:
    """Refuse bad toggles before the model loads; return ("file", the pairs) or ("facts", the fact set)."""
    sites = cfg.SITES if isinstance(cfg.SITES, list) else [cfg.SITES]
    if not sites or any(site not in PATCH_SITES for site in sites):
        raise LabError(f"SITES must list some of {', '.join(map(repr, PATCH_SITES))}, not {cfg.SITES!r}.")
    if cfg.EXACT_TOP_K < 1:
        raise LabError(f"EXACT_TOP_K must be at least 1, not {cfg.EXACT_TOP_K}.")
    if cfg.NOISE_SAMPLES < 1:
        raise LabError(f"NOISE_SAMPLES must be at least 1, not {cfg.NOISE_SAMPLES}.")
    if cfg.NOISE_LEVEL <= 0:
        raise LabError(f"NOISE_LEVEL must be above 0, not {cfg.NOISE_LEVEL}.")
    if cfg.DETAIL_PAIRS < 0:
        raise LabError(f"DETAIL_PAIRS must be 0 or more, not {cfg.DETAIL_PAIRS}.")
    if cfg.PAIRS == "file" or cfg.PAIRS_FILE is not None:
        return "file", load_pairs(cfg.PAIRS_FILE or HERE / "pairs.json")
    if cfg.N_PAIRS < 1:
        raise LabError(f"N_PAIRS must be at least 1, not {cfg.N_PAIRS}.")
    return "facts", load_fact_set(cfg.FACTS_FILE or FACTS_001)


def pairs_from_facts(model, facts: list[dict], cfg) -> list[dict]:
    """N_PAIRS clean/corrupt pairs from the fact set for this model's tokenizer (common.facts)."""
    pairs = counterfactual_pairs(model.tokenizer, facts, cfg.N_PAIRS, cfg.SEED)
    if not pairs:
        raise LabError(f"No two facts of one relation in {cfg.FACTS_FILE or FACTS_001} make a pair for "
                       f"{model.name}'s tokenizer (same template, same token count): add facts or use PAIRS = 'file'.")
    return pairs


def pairs_text(source: str, cfg, n: int) -> str:
    """Where the pairs came from, in one sentence for the report."""
    if source == "file":
        return f"{n} pairs from {cfg.PAIRS_FILE or HERE / 'pairs.json'}."
    return (f"{n} pairs (N_PAIRS = {cfg.N_PAIRS}) built from the fact set {cfg.FACTS_FILE or FACTS_001} by "
            f"common.facts.counterfactual_pairs (two facts of one relation, same template and token count, seed {cfg.SEED}).")


def study_settings(cfg) -> StudySettings:
    """What each pair's study does, from the toggles (BATCH_SIZE already resolved to a number)."""
    return StudySettings(method=cfg.METHOD, exact=cfg.EXACT, exact_top_k=cfg.EXACT_TOP_K, batch_size=cfg.BATCH_SIZE,
                         noise_tracing=cfg.NOISE_TRACING, noise_samples=cfg.NOISE_SAMPLES,
                         noise_level=cfg.NOISE_LEVEL, loop_checks=LOOP_CHECKS)


if __name__ == "__main__":
    main(parse_toggles(globals()))
