"""002 - Attention patterns: where do the heads at 40-85% depth look?

001 showed that the answer resolves in the upper-middle of the network. Here we look at every attention
head of the blocks in that band of depth, on this folder's prompts.json (eight facts whose subject is named
by hand and is not the token just before the final one) and, by default, 60 facts of 001's fact set (six per
relation, subject from the fact), and ask where the final position (the one that
predicts the answer) looks: at the entities ("France"), the relation words ("capital"), function words
("the", "of"), punctuation, special tokens, or the attention sink at position 0, which soaks up most of the
attention of many heads. Heads that look hard and consistently at the subject entity are the candidates for
factual retrieval that 003 will test. Over the set, each head's subject mass and how often it is among a
prompt's top heads come with bootstrap 95% intervals over the prompts (common/stats.py).

Why the facts are read from 001's file (the FACTS toggle) and not copied into prompts.json: the lab has one
fact set; a copy would drift from it as it grows, while prompts.json keeps the hand-labelled prompts that
test the labelling (subjects that are not the token before the last one).

Grouped-query attention: the query heads of a layer share fewer key/value heads; query head h reads
key/value head h // (n_heads // n_kv_heads). Each query head has its own pattern, and all are analysed.

Run:   python 002_attention_patterns/run.py
Help:  python 002_attention_patterns/run.py --help
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # common/ and this folder's report module

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
DEPTH_RANGE = (0.40, 0.85)  # which blocks, as a fraction of depth: block i sits at depth (i + 1) / n_layers
PROMPTS_FILE = None  # None = this folder's prompts.json plus FACTS facts; else a JSON list of {"prompt", "target"}, optional "subject"/"types", used alone
FACTS = 60  # with the default prompts: also rank heads over this many facts of 001's fact set, relations taking turns (0 = only prompts.json)
TOP_HEADS = 5  # how many heads to rank and draw as subject-entity candidates
INCLUDE_BOS = False  # count position 0 (BOS or first token, the attention sink) under its token type too
BATCH_SIZE = "auto"  # prompts per forward pass (right-padded): "auto" = from free memory and the model's shapes, or a number
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed: torch and the bootstrap intervals over prompts (same seed, same intervals)
# ----------------------------------------------------------------------------- end of toggles

import common  # noqa: E402,F401 - first: it sets PYTORCH_ENABLE_MPS_FALLBACK before torch loads
from functools import partial  # noqa: E402

import torch  # noqa: E402

from common import attention, html_report, report  # noqa: E402
from common.batching import batch_size  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.errors import LabError  # noqa: E402
from common.models import load_model  # noqa: E402
from common.prompts import load_prompt_list  # noqa: E402
from attention_report import (EXPERIMENT, AttentionStudy, PromptResult, draw_figures, findings,  # noqa: E402
                              write_report)

HERE = Path(__file__).resolve().parent
OWN_PROMPTS = HERE / "prompts.json"  # the default prompts, with hand-named subjects (a data file, not code)
FACT_SET = HERE.parent / "001_layers_and_logits" / "prompts.json"  # the lab's fact set (common/facts.py)


def main(cfg):
    # 1. Check every input that can be checked without the model.
    attention.check_depth_range(cfg.DEPTH_RANGE)
    if cfg.TOP_HEADS < 1:
        raise LabError(f"TOP_HEADS must be at least 1, not {cfg.TOP_HEADS}.")
    prompts = read_prompts(cfg)
    torch.manual_seed(cfg.SEED)

    # 2. Load the model; pick the band; tokenize and label every prompt.
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    band = attention.Band.of(model, cfg.DEPTH_RANGE)
    labelled = [attention.label(model, prompt, cfg.INCLUDE_BOS) for prompt in prompts]
    per_forward = batch_size(cfg.BATCH_SIZE, model, max(len(p.ids) for p in labelled))

    # 3. Patterns: HF eager attention first (the reference; booting the bridge wraps those modules), then
    #    the bridge's hook_pattern, which is what the analysis reads.
    sequences = [p.ids for p in labelled]
    references = attention.run_in_batches(partial(attention.hf_patterns, model.hf_model, blocks=band.layers),
                                          sequences, per_forward, model.device, "reference patterns (HF eager)")
    readouts = attention.run_in_batches(partial(attention.bridge_patterns, model.bridge, blocks=band.layers),
                                        sequences, per_forward, model.device,
                                        f"attention of {len(band.layers)} blocks x {model.n_heads} heads")

    # 4. Where each prompt's final position looks; the heads ranked by attention on the subject.
    results = [prompt_result(p, pattern, logits, model.tokenizer) for p, (pattern, logits) in zip(labelled, readouts)]
    ranking = rank_heads(results, band, cfg.TOP_HEADS, cfg.SEED)

    # 5. Self-checks, each against a computation of its own: HF's attention, a prompt run alone, 1 and 0.
    alone = attention.most_padded_prompt_alone(model.bridge, sequences, per_forward, band.layers, model.device)
    checks = attention.pattern_checks([r.attention.pattern for r in results], references,
                                      [r.attention.by_bucket for r in results], model.dtype, alone)
    study = AttentionStudy(model.name, band, tuple(cfg.DEPTH_RANGE), cfg.INCLUDE_BOS, per_forward, results,
                           ranking, checks)

    # 6. Write the run folder: numbers, settings, figures, and the report a person reads.
    return write_run(study, model, cfg)


def read_prompts(cfg) -> list:
    """PROMPTS_FILE alone, or this folder's hand-labelled prompts.json plus cfg.FACTS facts of the fact set."""
    if cfg.PROMPTS_FILE:
        return load_prompt_list(cfg.PROMPTS_FILE, facts_file=None)  # also checks the hand labels
    return load_prompt_list(OWN_PROMPTS, facts_file=None) + attention.fact_set_prompts(FACT_SET, cfg.FACTS)


def prompt_result(labelled, pattern, logits, tokenizer) -> PromptResult:
    """One prompt's masses from its patterns [blocks, heads, seq, seq], and what its logits [vocab] predict."""
    probs = logits.softmax(-1)
    return PromptResult(labelled, attention.FinalPositionAttention.of(pattern, labelled.bucket_index,
                                                                      labelled.subject_positions),
                        top1_token=tokenizer.decode([int(probs.argmax())]),
                        target_prob=float(probs[labelled.target.token_id]))


def rank_heads(results: list[PromptResult], band, top_heads: int, seed: int):
    """The band's heads ranked by attention on the subject, over the prompts that have one (intervals seeded)."""
    subject_mass = torch.stack([r.attention.subject for r in results])  # [prompts, blocks, heads]
    has_subject = torch.tensor([bool(r.labelled.subject_positions) for r in results])
    return attention.rank_heads(subject_mass, has_subject, top_heads, band, seed)


def write_run(study: AttentionStudy, model, cfg) -> Path:
    """The run folder: results.json, config.json, figures, report.md and report.html; then what it found."""
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        results = study.to_json()
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        figures = draw_figures(run, study, cfg.TOP_HEADS)
        run.write_text("report.md", write_report(study, figures, model, cfg.TOP_HEADS))
        html_report.write_page(run, results)
    report.finish_run(run.final_path, findings(study), [c["name"] for c in study.checks if not c["passed"]])
    return run.final_path


if __name__ == "__main__":
    main(parse_toggles(globals()))
