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

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # common/ and this folder's report module

# ----------------------------------------------------------------------------- toggles
MODEL = None  # one model to study: embedded name, Hugging Face id (e.g. "Qwen/Qwen3-8B"), folder or .gguf; None = MODELS
MODELS = ["smollm2-135m", "gemma3-270m"]  # used when MODEL is None: run in turn, then compared by depth %
USE_NORM_LENS = True  # apply the final norm before unembedding (False = RAW residual)
USE_TUNED_LENS = False  # also show the tuned lens (a trained translator per layer; trained on first use, ~10 min, then cached)
PROMPTS_FILE = None  # None = this folder's facts; else a JSON list of {"prompt": ..., "target": ...}, used verbatim
FACTS = None  # None = every fact of this folder's prompts.json (113); a number N = N facts, relations taking turns (quicker)
PROMPT_FORMAT = "all"  # one of "completion", "qa", "chat" or "all": how the facts are asked (chat needs a chat template)
PARAPHRASES = True  # also run the other wordings of each fact (completion format)
DIRECTION_PROBES = True  # run probes.json: facts asked both ways, and options in both orders
TEMPERATURES = [0.5, 1.0, 1.5, 2.0]  # softmax temperatures compared (1.0 is always computed)
TOP_K = 5  # how many top tokens to record per layer
BATCH_SIZE = "auto"  # prompts per forward pass (padded): "auto" = from free memory and the model's shapes, or a number
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # run folders go to OUT_DIR/<model>/<time>/
SEED = 0  # random seed (the lens itself is deterministic)
# ----------------------------------------------------------------------------- end of toggles

import common  # noqa: E402,F401 - first: it sets PYTORCH_ENABLE_MPS_FALLBACK before torch loads
import json  # noqa: E402

import torch  # noqa: E402

from common import html_report, lens, report, tuned_lens  # noqa: E402
from common.checks import worst_over_prompts  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.facts import facts_in_turns  # noqa: E402
from common.errors import LabError  # noqa: E402
from common.models import load_model, resolve_model  # noqa: E402
from common.progress import progress  # noqa: E402
from common.prompts import (PROMPT_FORMATS, Prompt, encode, load_facts, load_prompts_file, render_fact,  # noqa: E402
                            target_token, token_strings)
from lens_report import (EXPERIMENT, PROBES, ModelStudy, PromptReading, comparison_figure,  # noqa: E402
                         comparison_markdown, comparison_record, draw_figures, findings, report_markdown)

HERE = Path(__file__).resolve().parent


def main(cfg):
    # 1. Check every input that can be checked without a model: a mistake stops here, before any loading.
    model_specs = check_inputs(cfg)
    torch.manual_seed(cfg.SEED)

    # 2. Each model in turn: load it, read every prompt through the lenses, gather the self-checks, write its
    #    run folder, free the memory.
    studies = []
    for spec in model_specs:
        model = load_model(spec, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
        study = study_model(cfg, model)
        study.checks = self_checks(study)
        study.run_folder = write_model_run(cfg, model, study)
        studies.append(study)
        model.free()

    # 3. Several models: one comparison by depth %.
    folder = write_comparison(cfg, studies) if len(studies) > 1 else studies[0].run_folder

    # 4. Where to look, what was found, and any self-check that failed.
    failed = [check["name"] for study in studies for check in study.checks if not check["passed"]]
    report.finish_run(folder, [line for study in studies for line in findings(study)], failed)
    return folder


# ----------------------------------------------------------------------------- inputs and prompts


def check_inputs(cfg) -> list[str]:
    """The models to study, after every check that needs no model (each failure: one LabError line)."""
    model_specs = [cfg.MODEL] if cfg.MODEL is not None else list(cfg.MODELS)
    if not model_specs:
        raise LabError("MODELS is empty and MODEL is None: name at least one model.")
    for spec in model_specs:
        resolve_model(spec)
    if cfg.TOP_K < 1:
        raise LabError(f"TOP_K must be at least 1, not {cfg.TOP_K}.")
    if not cfg.TEMPERATURES or any(not isinstance(t, (int, float)) or t <= 0 for t in cfg.TEMPERATURES):
        raise LabError(f"TEMPERATURES must be a list of positive numbers, not {cfg.TEMPERATURES!r}.")
    if cfg.FACTS is not None and (isinstance(cfg.FACTS, bool) or not isinstance(cfg.FACTS, int) or cfg.FACTS < 1):
        raise LabError(f"FACTS must be None (every fact) or a whole number of facts of at least 1, not {cfg.FACTS!r}.")
    if cfg.PROMPTS_FILE:
        load_prompts_file(cfg.PROMPTS_FILE)
    return model_specs


def build_prompts(cfg, model) -> tuple[list[Prompt], list[str]]:
    """The prompts of this run, and notes on what was skipped. Each prompt is swept once."""
    if cfg.PROMPTS_FILE:
        return load_prompts_file(cfg.PROMPTS_FILE), ["PROMPTS_FILE given: formats, paraphrases and direction "
                                                     "probes are not run (they belong to this folder's facts)."]
    notes = []
    formats = PROMPT_FORMATS if cfg.PROMPT_FORMAT == "all" else (cfg.PROMPT_FORMAT,)
    if "chat" in formats and not model.has_chat_template:
        formats = tuple(f for f in formats if f != "chat")
        notes.append(f"{model.name} has no chat template (a base model): the chat format is skipped.")
    if not formats:
        raise LabError(f"{model.name} has no chat template, so PROMPT_FORMAT='chat' has nothing to run: "
                       "use 'completion', 'qa' or 'all'.")
    prompts = []
    for fact in facts_in_turns(load_facts(HERE / "prompts.json"), cfg.FACTS):
        prompts += [render_fact(model.tokenizer, fact, prompt_format) for prompt_format in formats]
        if cfg.PARAPHRASES:
            prompts += [render_fact(model.tokenizer, fact, "completion", variant)
                        for variant in range(1, len(fact["completions"]))]
    return prompts + (probe_prompts() if cfg.DIRECTION_PROBES else []), notes


def probe_prompts() -> list[Prompt]:
    """probes.json: facts asked both ways (direction), and questions with the options in both orders."""
    probes = json.loads((HERE / "probes.json").read_text())
    return [Prompt(probe[side]["prompt"], probe[side]["target"], fact_id=probe["id"], format="completion",
                   extra={"probe": kind, "side": side})
            for kind, sides in PROBES for probe in probes[kind] for side in sides]


# ----------------------------------------------------------------------------- reading the prompts


def study_model(cfg, model) -> ModelStudy:
    """Every prompt of this run read through the lens, layer by layer, at every temperature."""
    prompts, notes = build_prompts(cfg, model)
    # Tokens and targets first: a bad prompt stops the run before any sweep.
    ids = [encode(model, p.text) for p in prompts]
    targets = [target_token(model.tokenizer, p.text, p.target) for p in prompts]
    trained = tuned_lens.load_or_train(model) if cfg.USE_TUNED_LENS else None
    lens_name = "norm" if cfg.USE_NORM_LENS else "raw"
    sweeps = lens.sweeps(model, ids, [t.token_id for t in targets], cfg.USE_NORM_LENS, cfg.TOP_K, cfg.TEMPERATURES,
                         cfg.BATCH_SIZE, f"{model.name}: {lens_name.upper()} lens, {model.n_layers + 1} layers")
    readings = [PromptReading(p, t, token_strings(model.tokenizer, i[0]), s)
                for p, t, i, s in zip(prompts, targets, ids, sweeps)]
    main_format = cfg.PROMPT_FORMAT if cfg.PROMPT_FORMAT in ("qa", "chat") else "completion"
    study = ModelStudy(model.name, model.n_layers, lens_name, model.device, str(model.dtype).replace("torch.", ""),
                       readings, notes + model.notes, trained, seed=cfg.SEED, main_format=main_format)
    read_other_lenses(cfg, model, study, ids, trained)
    return study


def read_other_lenses(cfg, model, study: ModelStudy, ids: list, trained):
    """The main prompts also through the other lens (report.html shows NORM and RAW side by side); with a
    trained tuned lens, every prompt through it too."""
    readings = study.readings
    main = [k for k, reading in enumerate(readings) if study.is_main(reading)]
    other_name = "RAW" if cfg.USE_NORM_LENS else "NORM"
    other = lens.sweeps(model, [ids[k] for k in main], [readings[k].target.token_id for k in main],
                        not cfg.USE_NORM_LENS, cfg.TOP_K, batch_size=cfg.BATCH_SIZE,
                        description=f"{model.name}: {other_name} lens beside it, main prompts")
    for k, sweep in zip(main, other):
        readings[k].other_lens = sweep[1.0]
    for reading, prompt_ids in progress(list(zip(readings, ids)), f"{model.name}: tuned lens", unit="prompt") \
            if trained else ():
        reading.tuned = tuned_lens.tuned_sweep(model, trained.lens, prompt_ids, reading.target.token_id, cfg.TOP_K)


def self_checks(study: ModelStudy) -> list[dict]:
    """Every self-check of the sweeps, once each, as its worst prompt measured it: the lens's last layer against
    the model's logits, its KL and its ranks under temperature recomputed; the same for the other lens (its
    own KL and ranks) and the tuned lens."""
    checks = worst_over_prompts([r.lens.checks for r in study.readings])
    checks += worst_over_prompts([r.other_lens.checks[1:] for r in study.readings if r.other_lens])
    if study.tuned_lens is not None:
        checks += worst_over_prompts([r.tuned.checks for r in study.readings])
    return checks


# ----------------------------------------------------------------------------- writing the runs


def write_model_run(cfg, model, study: ModelStudy) -> Path:
    """One model's run folder: results.json, config.json, the figures, report.md and report.html."""
    with report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        results = study.to_json()
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        run.write_text("report.md", report_markdown(study, draw_figures(run, study)))
        html_report.write_page(run, results)
    return run.final_path


def write_comparison(cfg, studies: list[ModelStudy]) -> Path:
    """One run folder comparing the models: resolution depth % per fact, mean curves against depth %."""
    comparison = comparison_record(studies)
    with report.new_run_folder(cfg.OUT_DIR, "comparison") as run:
        run.write_json("results.json", comparison)
        run.write_json("config.json", report.run_config(cfg, None, EXPERIMENT))
        statistics = comparison["statistics"]
        figure = run.save_figure("by_depth.png", comparison_figure(statistics, studies[0].lens_name))
        out_dir = Path(cfg.OUT_DIR).expanduser()
        run.write_text("report.md", comparison_markdown(studies, statistics, out_dir, figure))
        html_report.write_page(run, comparison)
    return run.final_path


if __name__ == "__main__":
    main(parse_toggles(globals()))
