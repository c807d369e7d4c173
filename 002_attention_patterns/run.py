"""002 - Attention patterns: where do the heads at 40-85% depth look?

001 showed that the answer resolves in the upper-middle of the network. Here we look at every attention
head of the blocks in that band of depth, on the lab's facts, and ask where the final position (the one
that predicts the answer) looks: at the entities ("France"), the relation words ("capital"), function
words ("the", "of"), punctuation, special tokens, or the attention sink at position 0, which soaks up
most of the attention of many heads. Heads that look hard and consistently at the subject entity are the
candidates for factual retrieval that 003 will test.

Grouped-query attention: the query heads of a layer share fewer key/value heads; query head h reads
key/value head h // (n_heads // n_kv_heads). Each query head has its own pattern, and all are analysed.

Run:   python 002_attention_patterns/run.py
Help:  python 002_attention_patterns/run.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `common` imports from any folder

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
DEPTH_RANGE = (0.40, 0.85)  # which blocks, as a fraction of depth: block i sits at depth (i + 1) / n_layers
PROMPTS_FILE = None  # None = 001's facts (completion format); else a JSON list of {"prompt", "target"}, optional "subject"/"types"
TOP_HEADS = 5  # how many heads to rank and draw as subject-entity candidates
INCLUDE_BOS = False  # count position 0 (BOS or first token, the attention sink) under its token type too
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed (the analysis itself is deterministic)
# ----------------------------------------------------------------------------- end of toggles

from common.config import parse_toggles  # noqa: E402
from common.prompts import load_prompt_list  # noqa: E402
from common.progress import progress  # noqa: E402
from common.errors import LabError  # noqa: E402

HERE = Path(__file__).resolve().parent
FACTS = HERE.parent / "001_layers_and_logits" / "prompts.json"  # the lab's facts (a data file, not code)
EXPERIMENT = "002_attention_patterns"
SHORT = {"sink": "S", "special": "X", "entity": "E", "relation": "R", "function": "F", "punctuation": "P"}


def main(cfg):
    import torch

    from common import attention as att
    from common import html_report, report
    from common.models import load_model
    from common.prompts import encode, target_token, token_strings

    # 1. Check every input that can be checked without the model.
    att.check_depth_range(cfg.DEPTH_RANGE)
    if cfg.TOP_HEADS < 1:
        raise LabError(f"TOP_HEADS must be at least 1, not {cfg.TOP_HEADS}.")
    if cfg.PROMPTS_FILE:
        load_prompt_list(cfg.PROMPTS_FILE, FACTS)
    torch.manual_seed(cfg.SEED)

    # 2. Load the model; pick the band; tokenize and label every prompt.
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    blocks = att.band_layers(model.n_layers, cfg.DEPTH_RANGE)
    local = att.sliding_window_layers(model.text_config)
    kv_of = [att.kv_head_of(h, model.n_heads, model.n_kv_heads) for h in range(model.n_heads)]
    special_ids = set(model.tokenizer.all_special_ids)
    records = []
    for prompt in load_prompt_list(cfg.PROMPTS_FILE, FACTS, model.tokenizer):
        ids = encode(model, prompt.text)
        target = target_token(model.tokenizer, prompt.text, prompt.target)
        text, offsets = att.token_offsets(model.tokenizer, prompt.text, ids[0].tolist())
        hand = {k: prompt.extra[k] for k in ("types", "subject") if k in prompt.extra}
        types, subject = att.label_prompt(text, offsets, [int(i) in special_ids for i in ids[0]], hand)
        buckets = att.bucket_index(types, cfg.INCLUDE_BOS)  # [seq]: where each position's mass is counted
        records.append({"prompt": prompt.text, "target": prompt.target, "target_token_id": target.token_id,
                        "target_token": target.token, "fact_id": prompt.fact_id, "ids": ids,
                        "tokens": token_strings(model.tokenizer, ids[0]), "token_types": types,
                        "bucket_index": buckets, "buckets": [att.BUCKETS[b] for b in buckets],
                        "label_source": "hand" if hand else "rule",
                        "subject_positions": att.counted_positions(subject, cfg.INCLUDE_BOS)})

    # 3. Patterns: HF eager attention first (the reference; booting the bridge wraps those modules), then
    #    the bridge's hook_pattern, which is what the analysis reads.
    references = [att.hf_patterns(model.hf_model, r["ids"].to(model.device), blocks)
                  for r in progress(records, "reference patterns (HF eager)", unit="prompt")]
    patterns, masses, subject_mass = [], [], []
    for record in progress(records, f"attention of {len(blocks)} blocks x {model.n_heads} heads", unit="prompt"):
        pattern, logits = att.bridge_patterns(model.bridge, record["ids"].to(model.device), blocks)
        final_rows = pattern[:, :, -1, :]  # [blocks, heads, seq]: where the predicting position looks
        mass = att.mass_by_bucket(final_rows, record["bucket_index"])  # [blocks, heads, buckets]
        patterns.append(pattern)
        masses.append(mass)
        subject_mass.append(att.mass_on(final_rows, record["subject_positions"]))
        probs = logits.softmax(-1)
        record.update(top1_token=model.tokenizer.decode([int(probs.argmax())]),
                      target_prob=float(probs[record["target_token_id"]]))
    checks = att.pattern_checks(patterns, references, masses, model.dtype)
    subject_mass = torch.stack(subject_mass)  # [prompts, blocks, heads]
    has_subject = torch.tensor([bool(r["subject_positions"]) for r in records])
    ranking = att.rank_heads(subject_mass, has_subject, cfg.TOP_HEADS)
    for entry in ranking:
        entry.update(layer=blocks[entry.pop("block_index")], kv_head=kv_of[entry["head"]])

    results = {"experiment": EXPERIMENT, "model": model.name, "n_layers": model.n_layers,
               "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "kv_head_of_head": kv_of,
               "depth_range": list(cfg.DEPTH_RANGE), "layers": blocks,
               "local_layers": {str(i): w for i, w in local.items()}, "include_bos": cfg.INCLUDE_BOS,
               "buckets": list(att.BUCKETS), "self_checks": checks, "head_ranking": ranking,
               "prompts": [prompt_record(r, p, m, s, blocks, kv_of, local, model.n_layers)
                           for r, p, m, s in zip(records, patterns, masses, subject_mass)]}

    # 4. Write the run folder: numbers, settings, figures, and the report a person reads.
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        figures = draw_figures(run, results, patterns, masses, subject_mass, cfg.TOP_HEADS)
        run.write_text("report.md", write_report(results, patterns, masses, subject_mass, figures, model, cfg))
        html_report.write_page(run, results)
    report.finish_run(run.final_path, findings(results), [c["name"] for c in checks if not c["passed"]])
    return run.final_path


def findings(results) -> list[str]:
    """The headline of the run in plain words: the head that looks at the subject most."""
    if not results["head_ranking"]:
        return []
    top = results["head_ranking"][0]
    return [f"Head L{top['layer']}H{top['head']} puts {100 * top['mean']:.0f}% of the last position's attention on "
            f"the subject (mean over {len(results['prompts'])} prompts), the most of the heads in blocks "
            f"{results['layers'][0]}-{results['layers'][-1]}."]


def prompt_record(record, pattern, mass, subject_mass, blocks, kv_of, local, n_layers) -> dict:
    """One prompt of results.json: tokens with their types, and per layer, per head the masses by type."""
    from common import attention as att
    from common.attention import BUCKETS, block_depth
    keep = ("prompt", "target", "target_token_id", "target_token", "fact_id", "tokens", "token_types", "buckets",
            "label_source", "subject_positions", "top1_token", "target_prob")
    landmarks = att.landmark_masses(pattern)
    layers = []
    for b, block in enumerate(blocks):
        heads = [{"head": h, "kv_head": kv_of[h], "mass": dict(zip(BUCKETS, mass[b, h].tolist())),
                  "subject": float(subject_mass[b, h]), **{k: float(v[b, h]) for k, v in landmarks.items()},
                  "final_row": pattern[b, h, -1].tolist()} for h in range(pattern.shape[1])]
        layers.append({"layer": block, "depth": block_depth(block, n_layers), "local_window": local.get(block),
                       "heads": heads})
    return {**{k: record[k] for k in keep}, "layers": layers}


# ----------------------------------------------------------------------------- figures


def token_labels(record) -> list[str]:
    """'<token> [E]' per position: the token text and its type letter (S marks the sink)."""
    from common.report import visible_token
    return [f"{visible_token(tok)} [{SHORT[bucket]}]" for tok, bucket in zip(record["tokens"], record["buckets"])]


def draw_figures(run, results, patterns, masses, subject_mass, top_heads) -> dict:
    """Heatmaps layer x head (entity, subject, sink mass), the top heads' patterns, mass by type per layer."""
    import numpy as np

    from common.attention import BUCKETS
    from common.report import heatmap, plt
    mean_mass = mean_over_prompts(masses)  # [blocks, heads, buckets]
    rows = [f"{b} ({100 * (b + 1) / results['n_layers']:.0f}%)" for b in results["layers"]]
    cols = [f"H{h}/kv{k}" for h, k in enumerate(results["kv_head_of_head"])]
    name, figures = results["model"], {}
    for bucket, title in (("entity", "entity"), ("sink", "sink (position 0)")):
        fig = heatmap(mean_mass[:, :, BUCKETS.index(bucket)], rows, cols,
                      f"{name}: attention from the final position on {title}, mean over prompts",
                      "attention mass", vmin=0, vmax=1, xlabel="head / its key-value head", ylabel="layer (depth)")
        figures[bucket] = run.save_figure(f"{bucket}_mass_heatmap.png", fig)
    has = [bool(p["subject_positions"]) for p in results["prompts"]]
    if any(has):
        fig = heatmap(subject_mass[has].mean(0), rows, cols,
                      f"{name}: attention on the subject entity, mean over {sum(has)} prompts", "attention mass",
                      vmin=0, vmax=1, xlabel="head / its key-value head", ylabel="layer (depth)")
        figures["subject"] = run.save_figure("subject_mass_heatmap.png", fig)

    # Stacked bars: each layer's mean mass on each type (over heads and prompts).
    per_layer = mean_mass.mean(1)  # [blocks, buckets]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4.5))
    bottom = np.zeros(len(rows))
    for k, bucket in enumerate(BUCKETS):
        ax.bar(rows, per_layer[:, k], bottom=bottom, label=bucket)
        bottom += per_layer[:, k].numpy()
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("attention mass, mean over heads and prompts")
    ax.set_title(f"{name}: where the final position looks, by token type")
    ax.tick_params(axis="x", rotation=90)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    figures["by_type"] = run.save_figure("mass_by_type_per_layer.png", fig)

    # The top heads' full patterns, one figure per prompt: token labels on the first panel only, one colour bar.
    top = results["head_ranking"][:top_heads]
    figures["top_heads"] = []
    for p, record in enumerate(results["prompts"]):
        if not top:
            break
        labels = token_labels(record)
        size = min(1.2 + 0.28 * len(labels), 14)  # inches per panel; long prompts get smaller labels
        font = 7 if len(labels) <= 40 else max(2, 280 // len(labels))
        fig, axes = plt.subplots(1, len(top), figsize=(min(size * len(top) + 2, 60), size + 1.2), squeeze=False,
                                 sharey=True, layout="constrained")
        for ax, head in zip(axes[0], top):
            b = results["layers"].index(head["layer"])
            image = ax.imshow(patterns[p][b, head["head"]].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=font)
            ax.set_title(f"L{head['layer']} H{head['head']} (kv {head['kv_head']})", fontsize=9)
            ax.set_xlabel("key (attended to)", fontsize=8)
        axes[0][0].set_yticks(range(len(labels)), labels, fontsize=font)
        axes[0][0].set_ylabel("query", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), label="attention weight", shrink=0.8)
        fig.suptitle(f"{name}: top subject heads on {record['prompt']!r}", fontsize=10)
        figures["top_heads"].append(run.save_figure(f"top_heads_prompt{p}.png", fig))
    return figures


def mean_over_prompts(tensors):
    """Per-prompt tensors of one shape [...] -> their mean [...]."""
    import torch
    return torch.stack(tensors).mean(0)


# ----------------------------------------------------------------------------- report


def write_report(results, patterns, masses, subject_mass, figures, model, cfg) -> str:
    from common.attention import BUCKETS, landmark_masses
    from common.report import check_lines, markdown_table, md_escape
    n, blocks = results["n_layers"], results["layers"]
    group = model.n_heads // model.n_kv_heads
    local = {int(k): v for k, v in results["local_layers"].items()}
    local_in_band = [b for b in blocks if b in local]
    sink_rule = ("counted under its own type as well (INCLUDE_BOS = True; the sink bucket stays empty)"
                 if cfg.INCLUDE_BOS else "counted only as the sink, not under its token type (INCLUDE_BOS = False)")
    out = [f"# 002 attention patterns: {results['model']}", "",
           f"{n} layers; each has {model.n_heads} query heads and {model.n_kv_heads} key/value "
           f"head{'s' if model.n_kv_heads > 1 else ''} "
           f"(grouped-query attention: query head h reads key/value head h // {group}). Device {model.device}, "
           f"dtype {str(model.dtype).replace('torch.', '')}.", "",
           f"Band: DEPTH_RANGE = {tuple(cfg.DEPTH_RANGE)} selects blocks {blocks[0]}-{blocks[-1]} "
           f"({len(blocks)} of {n}); block i writes lens layer i + 1, so its depth is (i + 1)/{n}.", "",
           "Local (sliding-window) attention: " + sliding_note(local, local_in_band, results["prompts"]), "",
           f"Masses are the attention of the final position (the one that predicts the answer). Position 0 "
           f"is the attention sink (BOS, or the first token when the tokenizer adds none) and is {sink_rule}. "
           "Masses over the buckets sum to 1 per head.", "",
           *[f"Note: {note}" for note in model.notes], "",  # device check, offloaded layers
           "## Self-checks", "", check_lines(results["self_checks"]), ""]

    mean_mass = mean_over_prompts(masses)  # [blocks, heads, buckets], mean over prompts
    landmarks = [landmark_masses(p) for p in patterns]
    previous = mean_over_prompts([lm["previous"] for lm in landmarks])  # [blocks, heads]
    itself = mean_over_prompts([lm["self"] for lm in landmarks])
    ranking = results["head_ranking"][: max(cfg.TOP_HEADS, 10)]
    with_subject = sum(bool(p["subject_positions"]) for p in results["prompts"])
    out += [f"## Heads ranked by attention on the subject entity ({with_subject} of {len(results['prompts'])} "
            "prompts have one)", ""]
    if ranking:
        rows = []
        for rank, h in enumerate(ranking):
            b = blocks.index(h["layer"])
            rows.append([rank + 1, h["layer"], f"{100 * (h['layer'] + 1) / n:.0f}%", h["head"], h["kv_head"],
                         h["mean"], h["std"], h["min"], h["top_rate"],
                         float(mean_mass[b, h["head"], BUCKETS.index("entity")]),
                         float(mean_mass[b, h["head"], BUCKETS.index("sink")]), float(previous[b, h["head"]])])
        out += [f"Mean, std and min of the mass on the subject's tokens over those prompts; top-{cfg.TOP_HEADS} "
                f"rate = share of them on which the head is among that prompt's {cfg.TOP_HEADS} best. "
                "Entity, sink and previous (the token just before the final one, which previous-token heads "
                "read): mean over all prompts.", "",
                markdown_table(["rank", "layer", "depth", "head", "kv head", "subject mean", "subject std",
                                "subject min", f"top-{cfg.TOP_HEADS} rate", "entity", "sink", "previous"], rows), ""]
    else:
        out += ["No prompt has a subject entity (no capitalized word before the last token): name one with "
                "\"subject\" in a PROMPTS_FILE.", ""]

    out += ["## Figures", "", f"![entity mass per head]({figures['entity']})", "",
            f"![sink mass per head]({figures['sink']})", ""]
    if "subject" in figures:
        out += [f"![subject mass per head]({figures['subject']})", ""]
    out += [f"![mass by type per layer]({figures['by_type']})", ""]
    for name in figures["top_heads"]:
        out += [f"![top heads]({name})", ""]

    out += ["## Mass by type per layer (mean over heads and prompts)", "",
            "The buckets sum to 1; previous and self (the final token itself) are shown apart and are also "
            "counted in their token's bucket.", ""]
    rows = [[b, f"{100 * (b + 1) / n:.0f}%", "local" if b in local else "global"] + mean_mass[i].mean(0).tolist()
            + [float(previous[i].mean()), float(itself[i].mean())] for i, b in enumerate(blocks)]
    out += [markdown_table(["layer", "depth", "attention"] + list(BUCKETS) + ["previous", "self"], rows), ""]

    out += ["## Token labels", "",
            "Type per token by the rule in common/attention.py (or by hand where the prompts file says so); "
            "`*` marks the subject's tokens, S the sink. Letters: " +
            ", ".join(f"{v} {k}" for k, v in SHORT.items()) + ".", ""]
    for p in results["prompts"]:
        marks = [SHORT[b] + ("*" if i in p["subject_positions"] else "") for i, b in enumerate(p["buckets"])]
        note = f"labels: {p['label_source']}; model's top-1: {md_escape(p['top1_token'])}, " \
               f"p(target {md_escape(p['target_token'])}) = {p['target_prob']:.6f}"
        out += [f"**{md_escape(p['prompt'])}** ({note})", "",
                "| " + " | ".join(md_escape(t) for t in p["tokens"]) + " |",
                "|" + "---|" * len(p["tokens"]),
                "| " + " | ".join(f"{m} {t}" for m, t in zip(marks, p["token_types"])) + " |", ""]

    out += ["## Every head (mean over prompts)", "", "<details><summary>table</summary>", ""]
    subject_has = [bool(p["subject_positions"]) for p in results["prompts"]]
    subject_mean = subject_mass[subject_has].mean(0) if any(subject_has) else None
    rows = []
    for i, b in enumerate(blocks):
        for h in range(model.n_heads):
            rows.append([b, h, results["kv_head_of_head"][h]] + mean_mass[i, h].tolist()
                        + [float(subject_mean[i, h]) if subject_mean is not None else float("nan"),
                           float(previous[i, h]), float(itself[i, h])])
    out += [markdown_table(["layer", "head", "kv head"] + list(BUCKETS) + ["subject", "previous", "self"], rows),
            "", "</details>", ""]
    return "\n".join(out)


def sliding_note(local, local_in_band, prompts) -> str:
    """Which blocks of the band are local, and whether any prompt is long enough for the window to matter."""
    if not local_in_band:
        return "none in the band; every block attends to the whole prompt."
    window = min(local[b] for b in local_in_band)
    longest = max(len(p["tokens"]) for p in prompts)
    effect = (f"the longest prompt here has {longest} tokens, so the window changes nothing" if longest <= window
              else f"prompts up to {longest} tokens: the final position of these blocks cannot see the start "
                   "of the longer ones (the patterns show what the model does)")
    return (f"blocks {', '.join(map(str, local_in_band))} of the band attend only to the last {window} tokens "
            f"({effect}); the other blocks are global.")


if __name__ == "__main__":
    main(parse_toggles(globals()))
