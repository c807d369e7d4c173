"""001 - Layers and logits: at which layer does the model "know" the answer?

The logit lens reads the residual stream after every layer through the model's unembedding, as if the
model stopped there. NORM lens (USE_NORM_LENS = True) applies the final norm first, as the model does
before its real output; RAW lens reads the residual as it is. For each prompt we follow the target
token (e.g. " Paris" after "The capital of France is") through all n_layers + 1 layers: its
probability, its rank, the entropy of the whole distribution, and the KL divergence to the final layer.

Then the same question from several sides:
  resolution depth  - the first layer where the answer becomes top-1 for good, passes p = 0.5, and
                      where the entropy drops most;
  prompt formats    - completion, "Question: ... Answer:", and the chat template with an answer prefix;
  direction         - the same fact asked both ways, and options listed in both orders (probes.json);
  temperature       - the distributions divided by T: confidence changes, ranks do not;
  paraphrases       - other wordings of each fact, so one lucky wording is not taken for the model;
  models by depth % - several models on the same prompts, compared at the same fraction of depth;
  tuned lens        - (USE_TUNED_LENS) a trained affine translator per layer before the NORM lens, which
                      removes the logit lens's assumption that every layer speaks the final layer's basis.

Run:   python 001_layers_and_logits/run.py            (or `make run`)
Help:  python 001_layers_and_logits/run.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `common` imports from any folder

# ----------------------------------------------------------------------------- toggles
MODEL = None  # one model to study: embedded name, Hugging Face id (e.g. "Qwen/Qwen3-8B"), folder or .gguf; None = MODELS
MODELS = ["smollm2-135m", "gemma3-270m"]  # used when MODEL is None: run in turn, then compared by depth %
USE_NORM_LENS = True  # apply the final norm before unembedding (False = RAW residual)
USE_TUNED_LENS = False  # also show the tuned lens (a trained translator per layer; trained on first use, ~10 min, then cached)
PROMPTS_FILE = None  # None = this folder's facts; else a JSON list of {"prompt": ..., "target": ...}, used verbatim
PROMPT_FORMAT = "all"  # one of "completion", "qa", "chat" or "all": how the facts are asked (chat needs a chat template)
PARAPHRASES = True  # also run the other wordings of each fact (completion format)
DIRECTION_PROBES = True  # run probes.json: facts asked both ways, and options in both orders
TEMPERATURES = [0.5, 1.0, 1.5, 2.0]  # softmax temperatures compared (1.0 is always computed)
TOP_K = 5  # how many top tokens to record per layer
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed (the lens itself is deterministic)
# ----------------------------------------------------------------------------- end of toggles

import json  # noqa: E402
from statistics import median  # noqa: E402

from common.config import parse_toggles  # noqa: E402
from common.progress import progress  # noqa: E402
from common.errors import LabError  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERIMENT = "001_layers_and_logits"
FORMATS = ("completion", "qa", "chat")


# ----------------------------------------------------------------------------- the experiment


def main(cfg):
    from common import report
    from common.models import load_model, resolve_model
    from common.prompts import load_prompts_file

    # 1. Check every input that can be checked without a model.
    model_specs = [cfg.MODEL] if cfg.MODEL is not None else list(cfg.MODELS)
    if not model_specs:
        raise LabError("MODELS is empty and MODEL is None: name at least one model.")
    for spec in model_specs:
        resolve_model(spec)
    if cfg.TOP_K < 1:
        raise LabError(f"TOP_K must be at least 1, not {cfg.TOP_K}.")
    if not cfg.TEMPERATURES or any(not isinstance(t, (int, float)) or t <= 0 for t in cfg.TEMPERATURES):
        raise LabError(f"TEMPERATURES must be a list of positive numbers, not {cfg.TEMPERATURES!r}.")
    if cfg.PROMPTS_FILE:
        load_prompts_file(cfg.PROMPTS_FILE)
    import torch
    torch.manual_seed(cfg.SEED)

    # 2. Each model in turn: load, sweep every prompt, write its run folder, free the memory.
    studies = []
    for spec in model_specs:
        model = load_model(spec, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
        study = study_model(cfg, model)
        study["run_folder"] = write_model_run(cfg, model, study)
        studies.append(study)
        model.free()

    # 3. Several models: one comparison by depth %. Then: where to look, and what was found.
    folder = write_comparison(cfg, studies) if len(studies) > 1 else studies[0]["run_folder"]
    failed = [c["name"] for s in studies for c in s["checks"] if not c["passed"]]
    report.finish_run(folder, [line for s in studies for line in findings(s)], failed)
    return folder


def findings(study) -> list[str]:
    """Two headlines of one model's study in plain words: the first fact, and the median over all facts."""
    mains, n, name = main_prompts(study["results"]["prompts"]), study["n_layers"], study["model"]
    if not mains:
        return []
    first, layers = mains[0], [r["resolution"]["first_top1_layer"] for r in mains]
    layer = first["resolution"]["first_top1_layer"]
    said = (f"becomes top-1 for good at layer {layer} of {n} ({100 * layer / n:.0f}% depth)" if layer is not None
            else f"is never top-1 (rank {final(first, 'target_rank')} at the last layer)")
    lines = [f"{name}: {first['target_token']!r} {said} after {first['prompt']!r}."]
    resolved = sorted(layer for layer in layers if layer is not None)
    if len(mains) > 1 and resolved:
        lines.append(f"{name}: {len(resolved)} of {len(mains)} facts resolve; median first top-1 layer "
                     f"{median(resolved):g} of {n} ({100 * median(resolved) / n:.0f}% depth).")
    return lines


def build_prompts(cfg, model) -> tuple[list, list[str]]:
    """The prompts of this run, and notes on what was skipped. Each prompt is swept once."""
    from common.prompts import Prompt, load_facts, load_prompts_file, render_fact
    if cfg.PROMPTS_FILE:
        return load_prompts_file(cfg.PROMPTS_FILE), ["PROMPTS_FILE given: formats, paraphrases and direction "
                                                     "probes are not run (they belong to this folder's facts)."]
    notes = []
    formats = FORMATS if cfg.PROMPT_FORMAT == "all" else (cfg.PROMPT_FORMAT,)
    if "chat" in formats and not model.has_chat_template:
        formats = tuple(f for f in formats if f != "chat")
        notes.append(f"{model.name} has no chat template (a base model): the chat format is skipped.")
    if not formats:
        raise LabError(f"{model.name} has no chat template, so PROMPT_FORMAT='chat' has nothing to run: "
                       "use 'completion', 'qa' or 'all'.")
    prompts = []
    for fact in load_facts(HERE / "prompts.json"):
        prompts += [render_fact(model.tokenizer, fact, prompt_format) for prompt_format in formats]
        if cfg.PARAPHRASES:
            prompts += [render_fact(model.tokenizer, fact, "completion", variant)
                        for variant in range(1, len(fact["completions"]))]
    if cfg.DIRECTION_PROBES:
        probes = json.loads((HERE / "probes.json").read_text())
        for kind, sides in (("direction", ("forward", "reverse")), ("answer_position", ("target_first", "target_second"))):
            for probe in probes[kind]:
                prompts += [Prompt(probe[side]["prompt"], probe[side]["target"], fact_id=probe["id"], format="completion",
                                   extra={"probe": kind, "side": side}) for side in sides]
    return prompts, notes


def study_model(cfg, model) -> dict:
    """Sweep the lens over every layer for every prompt; return the results.json content and the sweeps."""
    from common import lens
    from common.prompts import encode, target_token, token_strings
    prompts, notes = build_prompts(cfg, model)
    # Tokens and targets first: a bad prompt stops the run before any sweep.
    encoded = [(p, encode(model, p.text), target_token(model.tokenizer, p.text, p.target)) for p in prompts]
    temperatures = sorted(set(float(t) for t in cfg.TEMPERATURES) | {1.0})
    lens_name = "norm" if cfg.USE_NORM_LENS else "raw"
    trained = None
    if cfg.USE_TUNED_LENS:
        from common import tuned_lens
        trained = tuned_lens.load_or_train(model)
    records = []
    for prompt, ids, target in progress(encoded, f"{model.name}: {lens_name.upper()} lens, {model.n_layers + 1} "
                                                 "layers", unit="prompt"):
        by_temperature = lens.sweep(model, ids, target.token_id, cfg.USE_NORM_LENS, cfg.TOP_K, tuple(temperatures))
        base = by_temperature[1.0]
        records.append({
            "prompt": prompt.text, "target": prompt.target, "target_token_id": target.token_id,
            "target_token": target.token, "tokens": token_strings(model.tokenizer, ids[0]),
            "layers": base.layer_records(),
            # fields added to the contract's:
            "target_n_tokens": target.n_tokens, "fact_id": prompt.fact_id, "format": prompt.format,
            "variant": prompt.variant, "probe": prompt.extra.get("probe"), "probe_side": prompt.extra.get("side"),
            "resolution": lens.resolution_depth(base.target_rank, base.target_prob, base.entropy),
            "temperatures": [{"temperature": t, "target_prob": s.target_prob, "target_rank": s.target_rank,
                              "entropy": s.entropy, "top_k_mass": [sum(p for _, p in top) for top in s.top_tokens]}
                             for t, s in by_temperature.items()],
            "self_check": base.check,
        })
        if trained:
            records[-1].update(tuned_lens.prompt_fields(model, trained, ids, target.token_id, cfg.TOP_K))
    add_other_lens(cfg, model, main_prompts(records))
    results = {"experiment": EXPERIMENT, "model": model.name, "n_layers": model.n_layers, "lens": lens_name,
               "prompts": records}
    checks = [lens_check_summary(records), temperature_rank_check(records)]
    if trained:
        results["tuned_lens"] = trained.summary()
        checks.append(lens_check_summary(records, "tuned_self_check"))
    return {"results": results, "checks": checks, "notes": notes, "model": model.name,
            "n_layers": model.n_layers, "slug": model.slug}


def add_other_lens(cfg, model, records):
    """The other lens (RAW under NORM, NORM under RAW) on these prompts, as `<lens>_layers` beside `layers`:
    report.html shows the lenses side by side."""
    from common import lens
    from common.prompts import encode
    for r in records:
        sweep = lens.sweep(model, encode(model, r["prompt"]), r["target_token_id"], not cfg.USE_NORM_LENS, cfg.TOP_K)
        r["raw_layers" if cfg.USE_NORM_LENS else "norm_layers"] = sweep[1.0].layer_records()


def lens_check_summary(records, key="self_check") -> dict:
    """The per-prompt lens self-checks (kept in results.json) as one line: the worst prompt decides."""
    worst = max(records, key=lambda r: r[key]["max_abs_diff"] - r[key]["tolerance"])
    failed = sum(not r[key]["passed"] for r in records)
    return dict(worst[key], passed=failed == 0,
                name=f"{worst[key]['name']}, all {len(records)} prompts "
                     f"({failed} failed; worst: {worst['prompt'][-40:]!r})")


def temperature_rank_check(records) -> dict:
    """Self-check: dividing logits by T must leave every target rank, at every layer, unchanged."""
    worst = max(abs(a - b) for r in records for t in r["temperatures"]
                for a, b in zip(t["target_rank"], r["temperatures"][0]["target_rank"]))
    return {"name": "temperature keeps the target's rank at every layer (largest rank change)",
            "max_abs_diff": float(worst), "tolerance": 0.0, "passed": worst == 0}


# ----------------------------------------------------------------------------- which prompts are which


def main_prompts(records):
    """The fact prompts in completion format, first wording (or every prompt of a PROMPTS_FILE)."""
    return [r for r in records if r["probe"] is None and r["format"] in ("completion", "verbatim") and r["variant"] == 0]


def resolution_cells(resolution) -> list:
    """Table cells for one resolution: top-1-for-good layer and depth, p > 0.5 layer, entropy-drop layer."""
    def at(key):
        layer = resolution[f"{key}_layer"]
        return "never" if layer is None else f"{layer} ({100 * resolution[f'{key}_depth']:.0f}%)"
    return [at("first_top1"), at("first_p50"), at("entropy_drop")]


def final(record, key):
    return record["layers"][-1][key]


# ----------------------------------------------------------------------------- one model's run folder


def write_model_run(cfg, model, study) -> Path:
    from common import html_report, report
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", study["results"])
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        figures = draw_figures(run, study)
        run.write_text("report.md", write_report(cfg, study, figures, model))
        html_report.write_page(run, study["results"])
    return run.final_path


def draw_figures(run, study) -> dict:
    """Heatmaps over layers x main prompts (target probability; top-1 token), and temperature curves;
    with the tuned lens, its heatmaps and the held-out KL of both lenses."""
    from common.report import curves
    results = study["results"]
    records, name, lens_name = main_prompts(results["prompts"]), results["model"], results["lens"].upper()
    layers = list(range(results["n_layers"] + 1))
    figures = lens_heatmaps(run, records, name, "layers", lens_name, "")
    if "tuned_lens" in results:
        from common.tuned_lens import heldout_kl_figure
        figures.update(lens_heatmaps(run, records, name, "tuned_layers", "tuned", "tuned_"))
        figures["heldout_kl"] = run.save_figure("tuned_heldout_kl.png", heldout_kl_figure(
            results["tuned_lens"]["heldout_kl"], f"{name}: held-out KL to the final layer, NORM vs tuned lens"))
    series = {"target_prob": [], "entropy": []}
    for i, temperature in enumerate(t["temperature"] for t in records[0]["temperatures"]):
        for key in series:
            mean = [sum(r["temperatures"][i][key][layer] for r in records) / len(records) for layer in layers]
            series[key].append((f"T = {temperature:g}", layers, mean))
    figures["temperature"] = run.save_figure("temperature.png", curves(
        [{"ylabel": "mean p(target)", "series": series["target_prob"], "ylim": (0, 1)},
         {"ylabel": "mean entropy (nats)", "series": series["entropy"]}],
        f"{name}: temperature rescales confidence, not ranks (main prompts)", "layer"))
    return figures


def lens_heatmaps(run, records, name, key, lens_name, prefix) -> dict:
    """Target probability and top-1 token heatmaps of one lens (`key`: "layers" or "tuned_layers"): whole
    prompts as labels, full top-1 tokens written horizontally with whitespace made visible."""
    import textwrap

    from common.report import heatmap, visible_token
    labels = [textwrap.fill(visible_token(r["prompt"], spaces=False), 60) for r in records]
    layers = list(range(len(records[0][key])))
    figures = {f"{prefix}target_prob": run.save_figure(f"{prefix}target_prob_heatmap.png", heatmap(
        [[layer["target_prob"] for layer in r[key]] for r in records], labels, layers,
        f"{name}: target probability by layer ({lens_name} lens)", "p(target)", vmin=0, vmax=1,
        xlabel="layer", ylabel="prompt"))}
    top_text = [[visible_token(layer["top_tokens"][0][0]) for layer in r[key]] for r in records]
    figures[f"{prefix}top_token"] = run.save_figure(f"{prefix}top_token_heatmap.png", heatmap(
        [[layer["top_tokens"][0][1] for layer in r[key]] for r in records], labels, layers,
        f"{name}: top-1 token by layer ({lens_name} lens)", "p(top-1)", cell_text=top_text, vmin=0, vmax=1,
        xlabel="layer", ylabel="prompt"))
    return figures


def write_report(cfg, study, figures, model) -> str:
    from common.report import check_lines
    results = study["results"]
    records = results["prompts"]
    out = [f"# 001 layers and logits: {results['model']} ({results['lens'].upper()} lens)", "",
           f"{results['n_layers']} layers (+ the embeddings as layer 0); device {model.device}, dtype "
           f"{str(model.dtype).replace('torch.', '')}. Probabilities at the last prompt position; rank 0 = top-1; "
           "entropy and KL(final || layer) in nats; depth % = layer / n_layers.", ""]
    out += section_summary(records, results["n_layers"]) + [""]
    out += [f"- Note: {note}" for note in study["notes"] + model.notes] + [""]
    out += ["## Self-checks", "", check_lines(study["checks"]), ""]
    out += section_key_layers(records, results["n_layers"])
    out += section_resolution(records)
    out += [f"![target probability]({figures['target_prob']})", "", f"![top-1 token]({figures['top_token']})", ""]
    out += section_tuned_lens(results, figures) if "tuned_lens" in results else []
    out += section_formats(records)
    out += section_direction(records)
    out += section_temperature(records, figures["temperature"])
    out += section_paraphrases(records)
    out += section_every_layer(records, results["n_layers"])
    return "\n".join(out)


def section_summary(records, n_layers) -> list[str]:
    mains = main_prompts(records)
    right = [r for r in mains if final(r, "target_rank") == 0]
    depths = [r["resolution"]["first_top1_depth"] for r in right]
    lines = ["## Summary", "",
             f"- Main prompts (first wording, completion format): {len(right)} of {len(mains)} have the target as "
             "the final layer's top-1 token."]
    if depths:
        lines.append(f"- The answer becomes top-1 for good at a median depth of {100 * median(depths):.0f}% "
                     f"(range {100 * min(depths):.0f}%-{100 * max(depths):.0f}% of {n_layers} layers).")
    for prompt_format in FORMATS:
        chosen = [r for r in records if r["probe"] is None and r["format"] == prompt_format and r["variant"] == 0]
        if chosen and prompt_format != "completion":
            ok = sum(final(r, "target_rank") == 0 for r in chosen)
            lines.append(f"- {prompt_format} format: {ok} of {len(chosen)} facts right at the final layer.")
    for kind, sides in (("direction", ("forward", "reverse")), ("answer_position", ("target_first", "target_second"))):
        for side in sides:
            chosen = [r for r in records if r["probe"] == kind and r["probe_side"] == side]
            if chosen:
                ok = sum(final(r, "target_rank") == 0 for r in chosen)
                mean_p = sum(final(r, "target_prob") for r in chosen) / len(chosen)
                lines.append(f"- {kind.replace('_', ' ')}, {side.replace('_', ' ')}: {ok} of {len(chosen)} right, "
                             f"mean final p(target) {mean_p:.6f}.")
    return lines


def section_key_layers(records, n_layers) -> list[str]:
    from common.lens import key_layers
    from common.report import markdown_table, md_escape
    out = ["## Key layers (0, n/6, n/3, n/2, 2n/3, 5n/6, last), main prompts", ""]
    for r in main_prompts(records):
        note = f" (the answer takes {r['target_n_tokens']} tokens; the first is tracked)" if r["target_n_tokens"] > 1 else ""
        rows = [[layer, f"{100 * layer / n_layers:.0f}%", md_escape(r["layers"][layer]["top_tokens"][0][0]),
                 r["layers"][layer]["top_tokens"][0][1], r["layers"][layer]["target_prob"],
                 r["layers"][layer]["target_rank"], r["layers"][layer]["entropy"], r["layers"][layer]["kl_to_final"]]
                for layer in key_layers(n_layers)]
        out += [f"### {md_escape(r['prompt'])} -> {md_escape(r['target_token'])}{note}", "",
                markdown_table(["layer", "depth", "top-1", "p(top-1)", "p(target)", "rank", "entropy", "KL to final"],
                               rows), ""]
    return out


def section_resolution(records) -> list[str]:
    from common.report import markdown_table, md_escape
    rows = [[md_escape(r["prompt"]), md_escape(r["target_token"]), final(r, "target_prob"), final(r, "target_rank")]
            + resolution_cells(r["resolution"]) for r in main_prompts(records)]
    return ["## Resolution depth (main prompts)", "",
            "Top-1 for good: the first layer from which the target stays top-1 to the end. "
            "p > 0.5: the first layer where it passes one half. Entropy drop: the layer whose block lowers "
            "the entropy most.", "",
            markdown_table(["prompt", "target", "final p", "final rank", "top-1 for good", "p > 0.5", "entropy drop"],
                           rows), ""]


def section_tuned_lens(results, figures) -> list[str]:
    """The tuned lens beside the NORM lens: held-out KL by layer, resolution depth under each, heatmaps."""
    from common.lens import key_layers
    from common.report import markdown_table, md_escape
    info, n = results["tuned_lens"], results["n_layers"]
    kl_rows = [[layer, f"{100 * layer / n:.0f}%", info["heldout_kl"]["norm"][layer], info["heldout_kl"]["tuned"][layer]]
               for layer in key_layers(n)]
    rows = [[md_escape(r["prompt"]), md_escape(r["target_token"])] + resolution_cells(r["resolution"])[:2]
            + resolution_cells(r["tuned_resolution"])[:2] for r in main_prompts(results["prompts"])]
    return ["## Tuned lens beside the NORM lens", "",
            f"A learned affine translator per layer before the final norm and unembedding (common/tuned_lens.py), "
            f"trained on {md_escape(info['trained_on'])}. Mean KL(final || lens) in nats on the held-out text:", "",
            markdown_table(["layer", "depth", "NORM lens", "tuned lens"], kl_rows), "",
            f"![held-out KL]({figures['heldout_kl']})", "", "Resolution depth under each lens (main prompts):", "",
            markdown_table(["prompt", "target", f"{results['lens'].upper()} top-1 for good",
                            f"{results['lens'].upper()} p > 0.5", "tuned top-1 for good", "tuned p > 0.5"], rows), "",
            f"![tuned target probability]({figures['tuned_target_prob']})", "",
            f"![tuned top-1 token]({figures['tuned_top_token']})", ""]


def section_formats(records) -> list[str]:
    from common.report import markdown_table
    present = [f for f in FORMATS if any(r["format"] == f and r["probe"] is None for r in records)]
    if len(present) < 2:
        return []
    facts = list(dict.fromkeys(r["fact_id"] for r in records if r["probe"] is None))
    rows, per_format = [], {f: [] for f in present}
    for fact in facts:
        row = [fact]
        for prompt_format in present:
            r = next(r for r in records if r["fact_id"] == fact and r["format"] == prompt_format and r["variant"] == 0
                     and r["probe"] is None)
            per_format[prompt_format].append(r)
            row.append(f"rank {final(r, 'target_rank')}, p {final(r, 'target_prob'):.6f}, top-1 from "
                       + resolution_cells(r["resolution"])[0])
        rows.append(row)
    summary = ["**right at the final layer**"]
    for prompt_format in present:
        chosen = per_format[prompt_format]
        right = [r["resolution"]["first_top1_depth"] for r in chosen if final(r, "target_rank") == 0]
        summary.append(f"{len(right)} of {len(chosen)}" + (f", median top-1 depth {100 * median(right):.0f}%" if right else ""))
    return ["## Prompt formats", "",
            "The same facts as a completion, as `Question: ...\\nAnswer:`, and in the chat template with the "
            "completion as the start of the assistant's answer.", "",
            markdown_table(["fact"] + present, rows + [summary]), ""]


def section_direction(records) -> list[str]:
    from common.report import markdown_table, md_escape
    out = []
    for kind, title, text in (
            ("direction", "Directional bias: the same fact asked both ways",
             "Forward asks for the attribute (France -> Paris); reverse asks back (Paris -> France)."),
            ("answer_position", "Answer-position bias: options in both orders",
             "The same question with the right option named first, then second.")):
        chosen = [r for r in records if r["probe"] == kind]
        if not chosen:
            continue
        rows = [[r["fact_id"], r["probe_side"].replace("_", " "), md_escape(r["prompt"]), md_escape(r["target_token"]),
                 final(r, "target_prob"), final(r, "target_rank")] + resolution_cells(r["resolution"])[:2]
                for r in chosen]
        out += [f"## {title}", "", text, "",
                markdown_table(["probe", "side", "prompt", "target", "final p", "final rank", "top-1 for good",
                                "p > 0.5"], rows), ""]
    return out


def section_temperature(records, figure) -> list[str]:
    from common.report import markdown_table
    mains = main_prompts(records)
    rows = []
    for i, entry in enumerate(mains[0]["temperatures"]):
        mean = {key: sum(r["temperatures"][i][key][-1] for r in mains) / len(mains)
                for key in ("target_prob", "entropy", "top_k_mass")}
        same = all(r["temperatures"][i]["target_rank"] == r["temperatures"][0]["target_rank"] for r in mains)
        rows.append([f"{entry['temperature']:g}", mean["target_prob"], mean["entropy"], mean["top_k_mass"],
                     "yes" if same else "NO"])
    return ["## Temperature", "",
            "Final layer, mean over the main prompts. Logits are divided by T before the softmax, at every layer.", "",
            markdown_table(["T", "mean p(target)", "mean entropy", "mean top-k mass", "ranks as at T = 1"], rows), "",
            f"![temperature]({figure})", ""]


def section_paraphrases(records) -> list[str]:
    from common.report import markdown_table
    facts = list(dict.fromkeys(r["fact_id"] for r in records if r["probe"] is None and r["variant"] > 0))
    if not facts:
        return []
    rows = []
    for fact in facts:
        wordings = [r for r in records if r["fact_id"] == fact and r["format"] == "completion" and r["probe"] is None]
        depths = [r["resolution"]["first_top1_depth"] for r in wordings]
        known = [d for d in depths if d is not None]
        spread = f"{100 * (max(known) - min(known)):.0f} points" if len(known) > 1 else "n/a"
        if len(known) < len(depths):
            spread += f" ({len(depths) - len(known)} never top-1)"
        rows.append([fact, len(wordings), sum(final(r, "target_rank") == 0 for r in wordings),
                     ", ".join("never" if d is None else f"{100 * d:.0f}%" for d in depths),
                     ", ".join(f"{final(r, 'target_prob'):.6f}" for r in wordings), spread])
    return ["## Paraphrases", "",
            "Every wording of each fact (completion format): where the answer becomes top-1 for good, and how far "
            "apart the wordings are.", "",
            markdown_table(["fact", "wordings", "right at the end", "top-1-for-good depth per wording",
                            "final p per wording", "spread"], rows), ""]


def section_every_layer(records, n_layers) -> list[str]:
    from common.report import markdown_table, md_escape
    out = ["## Every layer, every prompt", ""]
    for r in records:
        rows = [[layer["layer"], ", ".join(f"{md_escape(tok)} {p:.6f}" for tok, p in layer["top_tokens"]),
                 layer["target_prob"], layer["target_rank"], layer["entropy"], layer["kl_to_final"]]
                for layer in r["layers"]]
        label = f"{r['format']}" + (f", {r['probe']} {r['probe_side']}" if r["probe"] else "") + \
                (f", wording {r['variant']}" if r["variant"] else "")
        out += [f"<details><summary>{md_escape(r['prompt'])} -> {md_escape(r['target_token'])} ({label})</summary>", "",
                "Tokens: " + " ".join(md_escape(t) for t in r["tokens"]), "",
                markdown_table(["layer", "top tokens", "p(target)", "rank", "entropy", "KL to final"], rows), "",
                "</details>", ""]
    return out


# ----------------------------------------------------------------------------- models compared by depth %


def write_comparison(cfg, studies) -> Path:
    """One report comparing the models: resolution depth % per prompt, curves against depth %."""
    from common import html_report, report
    from common.report import markdown_table, md_escape
    facts = list(dict.fromkeys(r["fact_id"] for s in studies for r in main_prompts(s["results"]["prompts"])))
    by_model = {s["model"]: {r["fact_id"]: r for r in main_prompts(s["results"]["prompts"])} for s in studies}
    rows = []
    for fact in facts:
        row = [fact]
        for s in studies:
            r = by_model[s["model"]].get(fact)
            row.append("n/a" if r is None else
                       f"{resolution_cells(r['resolution'])[0]}, final p {final(r, 'target_prob'):.6f}")
        rows.append(row)
    panels = [{"ylabel": "mean p(target)", "series": [], "ylim": (0, 1)}, {"ylabel": "mean entropy (nats)", "series": []}]
    summary = []
    for s in studies:
        mains = main_prompts(s["results"]["prompts"])
        n = s["n_layers"]
        depth = [layer / n for layer in range(n + 1)]
        for panel, key in zip(panels, ("target_prob", "entropy")):
            panel["series"].append((s["model"], depth, [sum(r["layers"][layer][key] for r in mains) / len(mains)
                                                        for layer in range(n + 1)]))
        resolved = [r["resolution"]["first_top1_depth"] for r in mains if r["resolution"]["first_top1_depth"] is not None]
        summary.append([s["model"], n, f"{len(resolved)} of {len(mains)}",
                        f"{100 * median(resolved):.0f}%" if resolved else "never",
                        md_escape(str(s["run_folder"].relative_to(Path(cfg.OUT_DIR).expanduser())))])
    comparison = {"experiment": EXPERIMENT, "comparison": True, "lens": studies[0]["results"]["lens"],
                  "models": [{"model": s["model"], "n_layers": s["n_layers"], "run_folder": str(s["run_folder"]),
                              "prompts": [{"fact_id": r["fact_id"], "prompt": r["prompt"], "target": r["target"],
                                           "resolution": r["resolution"],
                                           "depth": [layer["depth"] for layer in r["layers"]],
                                           "target_prob": [layer["target_prob"] for layer in r["layers"]],
                                           "entropy": [layer["entropy"] for layer in r["layers"]]}
                                          for r in main_prompts(s["results"]["prompts"])]} for s in studies]}
    with report.new_run_folder(cfg.OUT_DIR, "comparison") as run:
        run.write_json("results.json", comparison)
        run.write_json("config.json", report.run_config(cfg, None, EXPERIMENT))
        figure = run.save_figure("by_depth.png", report.curves(
            panels, f"Models by depth % ({comparison['lens'].upper()} lens, main prompts)", "depth (layer / n_layers)"))
        run.write_text("report.md", "\n".join([
            f"# 001 models compared by depth % ({comparison['lens'].upper()} lens)", "",
            markdown_table(["model", "layers", "main prompts resolved", "median top-1-for-good depth",
                            "run folder (in OUT_DIR)"],
                           summary), "",
            f"![by depth]({figure})", "",
            "## Where each fact becomes top-1 for good (layer and depth %)", "",
            markdown_table(["fact"] + [s["model"] for s in studies], rows), ""]))
        html_report.write_page(run, comparison)
    return run.final_path


if __name__ == "__main__":
    main(parse_toggles(globals()))
