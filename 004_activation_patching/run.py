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

import common  # noqa: E402,F401 - first: it sets PYTORCH_ENABLE_MPS_FALLBACK before torch loads
import torch  # noqa: E402

from common import html_report, report  # noqa: E402
from common.batching import batch_size  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.errors import LabError  # noqa: E402
from common.models import load_model  # noqa: E402
from common.patching import (PATCH_SITES, StudySettings, embedding_std, encode_pair, grids_for_sites,  # noqa: E402
                             load_pairs, study_pair)
from common.progress import progress  # noqa: E402
from patching_report import PatchingResults, draw_figures, findings, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERIMENT = "004_activation_patching"
LOOP_CHECKS = 3  # exact cells re-run the plain way (one whole forward each), to check the batched engine


def main(cfg):
    # 1. Check every input that can be checked without the model.
    pairs = check_toggles(cfg)
    torch.manual_seed(cfg.SEED)

    # 2. Load the model and tokenize every pair (a pair that cannot be patched stops the run here).
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    labels = [f"Pair {i} ({pair['clean']!r} / {pair['corrupt']!r})" for i, pair in enumerate(pairs)]
    encoded = [encode_pair(model, pair, label) for pair, label in zip(pairs, labels)]
    cfg.BATCH_SIZE = batch_size(cfg.BATCH_SIZE, model, max(e.corrupt_ids.shape[1] for e in encoded))
    sites, settings = [s for s in PATCH_SITES if s in cfg.SITES], study_settings(cfg)
    noise_std = embedding_std(model, [ids for e in encoded for ids in (e.clean_ids, e.corrupt_ids)]) \
        if cfg.NOISE_TRACING else None

    # 3. Each pair: baselines, attribution and exact patching with their self-checks, the link to 001's lens,
    #    causal tracing.
    studies = [study_pair(model, pair, enc, grids_for_sites(sites), settings, noise_std, cfg.SEED + i, labels[i])
               for i, (pair, enc) in enumerate(progress(list(zip(pairs, encoded)), "pairs", unit="pair"))]
    results = PatchingResults(EXPERIMENT, model, sites, cfg.METHOD, cfg.NOISE_TRACING, studies)

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
    """Refuse bad toggles before the model loads; return the pairs to study."""
    sites = cfg.SITES if isinstance(cfg.SITES, list) else [cfg.SITES]
    if not sites or any(site not in PATCH_SITES for site in sites):
        raise LabError(f"SITES must list some of {', '.join(map(repr, PATCH_SITES))}, not {cfg.SITES!r}.")
    if cfg.EXACT_TOP_K < 1:
        raise LabError(f"EXACT_TOP_K must be at least 1, not {cfg.EXACT_TOP_K}.")
    if cfg.NOISE_SAMPLES < 1:
        raise LabError(f"NOISE_SAMPLES must be at least 1, not {cfg.NOISE_SAMPLES}.")
    if cfg.NOISE_LEVEL <= 0:
        raise LabError(f"NOISE_LEVEL must be above 0, not {cfg.NOISE_LEVEL}.")
    return load_pairs(cfg.PAIRS_FILE or HERE / "pairs.json")


def study_settings(cfg) -> StudySettings:
    """What each pair's study does, from the toggles (BATCH_SIZE already resolved to a number)."""
    return StudySettings(method=cfg.METHOD, exact=cfg.EXACT, exact_top_k=cfg.EXACT_TOP_K, batch_size=cfg.BATCH_SIZE,
                         noise_tracing=cfg.NOISE_TRACING, noise_samples=cfg.NOISE_SAMPLES,
                         noise_level=cfg.NOISE_LEVEL, loop_checks=LOOP_CHECKS)


if __name__ == "__main__":
    main(parse_toggles(globals()))
