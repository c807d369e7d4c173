"""001 - Layers and logits: at which layer does the model "know" the answer?

The logit lens reads the residual stream after every layer through the model's unembedding, as if the
model stopped there. NORM lens (USE_NORM_LENS = True) applies the final norm first, as the model does
before its real output; RAW lens reads the residual as it is. For each prompt we follow the target
token (e.g. " Paris" after "The capital of France is") through all n_layers + 1 layers: its
probability, its rank, the entropy of the whole distribution, and the KL divergence to the final layer.

Run:   python 001_layers_and_logits/run.py            (or `make run`)
Help:  python 001_layers_and_logits/run.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `common` imports from any folder

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
USE_NORM_LENS = True  # apply the final norm before unembedding (False = RAW residual)
PROMPTS_FILE = None  # None = this folder's prompts.json; else a JSON list of {"prompt": ..., "target": ...}
PROMPT_FORMAT = "completion"  # how the folder's facts are asked: "completion", "qa" or "chat"
TOP_K = 5  # how many top tokens to record per layer
DEVICE = "auto"  # "auto" (mps, else cuda, else cpu), "mps", "cuda" or "cpu"
DTYPE = "auto"  # "auto" (float16 on GPU, bfloat16 for Gemma, float32 on cpu), "float16", "bfloat16", "float32"
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed (the lens itself is deterministic)

from common.config import parse_toggles  # noqa: E402
from common.errors import LabError  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERIMENT = "001_layers_and_logits"


def load_prompt_list(cfg, tokenizer):
    """The prompts of this run: PROMPTS_FILE verbatim, or the folder's facts in PROMPT_FORMAT."""
    from common.prompts import load_facts, load_prompts_file, render_fact
    if cfg.PROMPTS_FILE:
        return load_prompts_file(cfg.PROMPTS_FILE)
    return [render_fact(tokenizer, fact, cfg.PROMPT_FORMAT) for fact in load_facts(HERE / "prompts.json")]


def main(cfg):
    import torch

    from common import lens, report
    from common.models import load_model
    from common.prompts import PROMPT_FORMATS, encode, load_prompts_file, target_token, token_strings

    # 1. Check every input that can be checked without the model.
    if cfg.PROMPT_FORMAT not in PROMPT_FORMATS:
        raise LabError(f"PROMPT_FORMAT must be one of {', '.join(PROMPT_FORMATS)}, not {cfg.PROMPT_FORMAT!r}.")
    if cfg.TOP_K < 1:
        raise LabError(f"TOP_K must be at least 1, not {cfg.TOP_K}.")
    if cfg.PROMPTS_FILE:
        load_prompts_file(cfg.PROMPTS_FILE)
    torch.manual_seed(cfg.SEED)

    # 2. Load the model, then turn prompts into tokens and targets (all checked before any sweep).
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE)
    prompts = load_prompt_list(cfg, model.tokenizer)
    encoded = [(p, encode(model, p.text), target_token(model.tokenizer, p.text, p.target)) for p in prompts]

    # 3. The lens over every layer, at the last position of each prompt.
    lens_name = "norm" if cfg.USE_NORM_LENS else "raw"
    print(f"{lens_name.upper()} lens over {model.n_layers + 1} layers, {len(prompts)} prompts...", flush=True)
    records, sweeps = [], []
    for prompt, ids, target in encoded:
        result = lens.sweep(model, ids, target.token_id, cfg.USE_NORM_LENS, cfg.TOP_K)[1.0]
        sweeps.append(result)
        records.append({"prompt": prompt.text, "target": prompt.target, "target_token_id": target.token_id,
                        "target_token": target.token, "target_n_tokens": target.n_tokens,
                        "tokens": token_strings(model.tokenizer, ids[0]), "fact_id": prompt.fact_id,
                        "format": prompt.format, "layers": result.layer_records(),
                        "self_check": result.check})
    results = {"experiment": EXPERIMENT, "model": model.name, "n_layers": model.n_layers, "lens": lens_name,
               "prompts": records}

    # 4. Write the run folder: numbers, settings, figures, and the report a person reads.
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        figures = draw_figures(run, records, sweeps, lens_name, model.name)
        run.write_text("report.md", write_report(results, sweeps, figures, model))
    failed = [r["prompt"] for r in records if not r["self_check"]["passed"]]
    if failed:
        print(f"WARNING: the lens self-check failed on {len(failed)} prompt(s); see report.md.", file=sys.stderr)
    return run.final_path


def draw_figures(run, records, sweeps, lens_name, model_name) -> dict:
    """Two heatmaps over layers x prompts: the target's probability, and the top-1 token of each layer."""
    from common.report import heatmap
    labels = [r["prompt"][-40:] for r in records]
    layers = list(range(len(sweeps[0].target_prob)))
    target = heatmap([s.target_prob for s in sweeps], labels, layers,
                     f"{model_name}: target probability by layer ({lens_name.upper()} lens)",
                     "p(target)", vmin=0, vmax=1, xlabel="layer", ylabel="prompt")
    top_text = [[t[0][0].strip()[:8] or repr(t[0][0])[1:-1][:8] for t in s.top_tokens] for s in sweeps]
    top = heatmap([[t[0][1] for t in s.top_tokens] for s in sweeps], labels, layers,
                  f"{model_name}: top-1 token by layer ({lens_name.upper()} lens)", "p(top-1)", cell_text=top_text,
                  vmin=0, vmax=1, xlabel="layer", ylabel="prompt")
    return {"target_prob": run.save_figure("target_prob_heatmap.png", target),
            "top_token": run.save_figure("top_token_heatmap.png", top)}


def write_report(results, sweeps, figures, model) -> str:
    from common.lens import key_layers
    from common.report import check_lines, markdown_table, md_escape
    n = results["n_layers"]
    lens_name = results["lens"].upper()
    out = [f"# 001 layers and logits: {results['model']} ({lens_name} lens)", "",
           f"{n} layers (+ the embeddings as layer 0), device {model.device}, dtype "
           f"{str(model.dtype).replace('torch.', '')}. Probabilities at the last prompt position; rank 0 = top-1; "
           "entropy and KL(final || layer) in nats.", "",
           "## Self-check", "", check_lines([r["self_check"] for r in results["prompts"]]), "",
           "## Figures", "", f"![target probability]({figures['target_prob']})", "",
           f"![top-1 token per layer]({figures['top_token']})", ""]
    keys = key_layers(n)
    out += ["## Key layers (0, n/6, n/3, n/2, 2n/3, 5n/6, last)", ""]
    for record, result in zip(results["prompts"], sweeps):
        note = f" (the answer spans {record['target_n_tokens']} tokens; the first is tracked)" \
            if record["target_n_tokens"] > 1 else ""
        out += [f"### {md_escape(record['prompt'])} -> {md_escape(record['target_token'])}{note}", ""]
        rows = [[layer, f"{100 * layer / n:.0f}%", md_escape(result.top_tokens[layer][0][0]),
                 result.top_tokens[layer][0][1], result.target_prob[layer], result.target_rank[layer],
                 result.entropy[layer], result.kl_to_final[layer]] for layer in keys]
        out += [markdown_table(["layer", "depth", "top-1", "p(top-1)", "p(target)", "rank", "entropy",
                                "KL to final"], rows), ""]
    out += ["## Every layer", ""]
    for record, result in zip(results["prompts"], sweeps):
        out += [f"<details><summary>{md_escape(record['prompt'])}</summary>", "",
                "Tokens: " + " ".join(md_escape(t) for t in record["tokens"]), ""]
        rows = [[layer, ", ".join(f"{md_escape(tok)} {p:.6f}" for tok, p in result.top_tokens[layer]),
                 result.target_prob[layer], result.target_rank[layer], result.entropy[layer],
                 result.kl_to_final[layer]] for layer in range(n + 1)]
        out += [markdown_table(["layer", "top tokens", "p(target)", "rank", "entropy", "KL to final"], rows), "",
                "</details>", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main(parse_toggles(globals(), choices={"PROMPT_FORMAT": ("completion", "qa", "chat")}))
