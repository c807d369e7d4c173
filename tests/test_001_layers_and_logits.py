"""001 end to end on the embedded model, as the user runs it, its bad inputs, and a fault injected into each
self-check's code path that the run's report must show as FAIL."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import lens, tuned_lens
from common.config import parse_toggles
from conftest import REPO, assert_fails_cleanly, run_folders, run_script

SCRIPT = "001_layers_and_logits/run.py"


def _check_contract(results: dict, lens: str):
    assert results["experiment"] == "001_layers_and_logits"
    assert results["lens"] == lens and results["model"] == "smollm2-135m" and results["n_layers"] == 30
    assert results["prompts"]
    for prompt in results["prompts"]:
        assert isinstance(prompt["prompt"], str) and isinstance(prompt["target"], str)
        assert isinstance(prompt["target_token_id"], int) and isinstance(prompt["target_token"], str)
        assert isinstance(prompt["tokens"], list) and all(isinstance(t, str) for t in prompt["tokens"])
        layers = prompt["layers"]
        assert [layer["layer"] for layer in layers] == list(range(31))
        for layer in layers:
            assert layer["depth"] == pytest.approx(layer["layer"] / 30)
            assert all(isinstance(tok, str) and 0 <= p <= 1 for tok, p in layer["top_tokens"])
            assert 0 <= layer["target_prob"] <= 1 and isinstance(layer["target_rank"], int)
            assert layer["entropy"] >= 0
        assert prompt["self_check"]["passed"]


N_FACTS = 10


def chosen_facts() -> list[dict]:
    """The facts the FACTS=N_FACTS runs read: relations taking turns."""
    from common.facts import facts_in_turns
    return facts_in_turns(json.loads((Path(__file__).parent.parent / "001_layers_and_logits" / "prompts.json")
                                     .read_text()), N_FACTS)


@pytest.fixture(scope="module")
def norm_and_raw_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs001")
    # NORM: everything (all formats, paraphrases, probes, temperatures); RAW: the main prompts only.
    # FACTS=10: one fact of each of the 10 relations (relations take turns), which keeps the test quick.
    norm = run_script(SCRIPT, f"--OUT_DIR={out}", "--MODEL=smollm2-135m", "--TOP_K=3", "--PROMPT_FORMAT=all",
                      f"--FACTS={N_FACTS}")
    raw = run_script(SCRIPT, f"--OUT_DIR={out}", "--MODEL=smollm2-135m", "--USE_NORM_LENS=False", "--TOP_K=3",
                     "--PROMPT_FORMAT=completion", "--PARAPHRASES=False", "--DIRECTION_PROBES=False",
                     f"--FACTS={N_FACTS}")
    return out, norm, raw


def test_norm_and_raw_runs_write_the_contract_files(norm_and_raw_runs):
    out, norm, raw = norm_and_raw_runs
    assert norm.returncode == 0, norm.stderr
    assert raw.returncode == 0, raw.stderr
    folders = sorted(run_folders(out))
    assert len(folders) == 2  # two runs, two folders, nothing overwritten
    by_lens = {}
    for folder in folders:
        assert {"results.json", "config.json", "report.md", "target_prob_heatmap.png",
                "top_token_heatmap.png"} <= {p.name for p in folder.iterdir()}
        results = json.loads((folder / "results.json").read_text())
        by_lens[results["lens"]] = (folder, results)
    _check_contract(by_lens["norm"][1], "norm")
    _check_contract(by_lens["raw"][1], "raw")
    config = json.loads((by_lens["raw"][0] / "config.json").read_text())
    assert config["toggles"]["USE_NORM_LENS"] is False and config["versions"]["torch"]
    assert config["device"] == "cpu" and config["dtype"] == "float32" and config["git_commit"]
    report = (by_lens["norm"][0] / "report.md").read_text()
    assert "PASS: NORM lens at the last layer == model logits" in report
    assert "PASS: NORM lens: KL(final || layer) == torch's kl_div against the model's own logits" in report
    assert "PASS: NORM lens: target rank at T = 0.5, 1, 1.5, 2 == its rank counted in the whole row divided by T" in report
    assert "FAIL" not in report
    raw_report = (by_lens["raw"][0] / "report.md").read_text()
    assert "PASS: RAW lens: KL(final || layer) == torch's kl_div against its own last layer" in raw_report
    assert "PASS: NORM lens: KL(final || layer)" in raw_report and "FAIL" not in raw_report  # the other lens's
    assert report.index("## Summary") < report.index("## Key layers")
    for section in ("## Resolution depth", "## Prompt formats", "## Directional bias", "## Answer-position bias",
                    "## Temperature", "## Paraphrases", "![target probability](target_prob_heatmap.png)"):
        assert section in report


def _main_prompts(results):
    return [p for p in results["prompts"] if p["format"] == "completion" and p["variant"] == 0 and not p["probe"]]


def test_all_formats_paraphrases_and_probes_are_recorded(norm_and_raw_runs):
    out, _, _ = norm_and_raw_runs
    runs = [json.loads((f / "results.json").read_text()) for f in run_folders(out)]
    norm = next(r for r in runs if r["lens"] == "norm")
    facts = chosen_facts()
    by_kind = {}
    for p in norm["prompts"]:
        by_kind.setdefault((p["format"], p["variant"] > 0, p["probe"]), []).append(p)
    assert len(by_kind[("completion", False, None)]) == len(facts)
    assert len(by_kind[("qa", False, None)]) == len(facts) and len(by_kind[("chat", False, None)]) == len(facts)
    assert len(by_kind[("completion", True, None)]) == sum(len(f["completions"]) - 1 for f in facts)
    assert {p["probe_side"] for p in by_kind[("completion", False, "direction")]} == {"forward", "reverse"}
    qa = by_kind[("qa", False, None)][0]
    assert qa["prompt"].startswith("Question: ") and qa["prompt"].endswith("\nAnswer:")
    chat = by_kind[("chat", False, None)][0]
    assert "<|im_start|>assistant\n" in chat["prompt"] and chat["prompt"].endswith(facts[0]["completions"][0])
    # Temperature keeps the order, but dividing by T in float32 can round two logits one ulp apart to a tie (2 of
    # 75888 ranks in the default run moved by 1); the run's self-check counts ranks in the divided row exactly.
    rank_changes = []
    for p in norm["prompts"]:
        temps = {t["temperature"]: t for t in p["temperatures"]}
        assert set(temps) == {0.5, 1.0, 1.5, 2.0}
        assert temps[1.0]["target_prob"] == [layer["target_prob"] for layer in p["layers"]]
        rank_changes += [abs(a - b) for t in temps.values()
                         for a, b in zip(t["target_rank"], temps[1.0]["target_rank"])]
        assert temps[0.5]["entropy"][-1] <= temps[1.0]["entropy"][-1] <= temps[2.0]["entropy"][-1]
        resolution = p["resolution"]
        if p["layers"][-1]["target_rank"] == 0:
            first = resolution["first_top1_layer"]
            assert all(layer["target_rank"] == 0 for layer in p["layers"][first:])
            assert first == 0 or p["layers"][first - 1]["target_rank"] > 0
        else:
            assert resolution["first_top1_layer"] is None
    assert max(rank_changes) <= 1 and sum(change > 0 for change in rank_changes) <= len(rank_changes) // 1000
    assert "PASS: NORM lens: target rank at T = 0.5, 1, 1.5, 2 ==" in norm_report(out)


# The facts of the first runs, all answered by SmolLM2; the larger set keeps facts a model gets wrong.
FIRST_FACTS = ("france_capital", "germany_capital", "japan_capital", "england_capital", "gold_symbol",
               "romeo_author", "first_president", "opposite_hot")


def norm_report(out) -> str:
    """report.md of the NORM run among the run folders under `out`."""
    return next((f / "report.md").read_text() for f in run_folders(out)
                if json.loads((f / "results.json").read_text())["lens"] == "norm")


def test_norm_lens_resolves_late_and_raw_differs(norm_and_raw_runs):
    """The science of the issue: under NORM the answer is top-1 only in the late layers; RAW looks different."""
    out, _, _ = norm_and_raw_runs
    runs = {json.loads((f / "results.json").read_text())["lens"]: json.loads((f / "results.json").read_text())
            for f in run_folders(out)}
    for norm_prompt, raw_prompt in zip(_main_prompts(runs["norm"]), _main_prompts(runs["raw"])):
        assert norm_prompt["prompt"] == raw_prompt["prompt"]
        if norm_prompt["fact_id"] not in FIRST_FACTS:
            continue
        ranks = [layer["target_rank"] for layer in norm_prompt["layers"]]
        assert ranks[-1] == 0, norm_prompt["prompt"]  # the prompts are ones the model answers
        assert all(rank > 0 for rank in ranks[:15])  # not top-1 anywhere in the first half
        raw_probs = [layer["target_prob"] for layer in raw_prompt["layers"][:-1]]
        norm_probs = [layer["target_prob"] for layer in norm_prompt["layers"][:-1]]
        assert raw_probs != pytest.approx(norm_probs, abs=1e-3)


def test_report_sets_norm_beside_raw(norm_and_raw_runs):
    """The NORM run's report.md has NORM beside RAW at the key layers, from the same numbers the RAW run writes."""
    out, _, _ = norm_and_raw_runs
    folders = {json.loads((f / "results.json").read_text())["lens"]: f for f in run_folders(out)}
    raw = _main_prompts(json.loads((folders["raw"] / "results.json").read_text()))
    report = (folders["norm"] / "report.md").read_text()
    section = report.split("## NORM beside RAW (main prompts, key layers)")[1].split("\n## ")[0]
    last_row = [line for line in section.splitlines() if line.startswith("| 30 |")][0].split("|")
    mean_raw_p = sum(p["layers"][30]["target_prob"] for p in raw) / len(raw)
    assert float(last_row[6]) == pytest.approx(mean_raw_p, abs=1e-6)  # RAW mean p(target) at the last layer
    assert int(last_row[8]) == sum(p["layers"][30]["target_rank"] == 0 for p in raw)


def test_prompts_file_is_used_verbatim(tmp_path):
    prompts = tmp_path / "mine.json"
    prompts.write_text(json.dumps([{"prompt": "The capital of Germany is", "target": "Berlin"}]))
    result = run_script(SCRIPT, f"--OUT_DIR={tmp_path / 'out'}", f"--PROMPTS_FILE={prompts}", "--MODEL=smollm2-135m")
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(tmp_path / "out")
    [record] = json.loads((folder / "results.json").read_text())["prompts"]
    assert record["prompt"] == "The capital of Germany is" and record["target_token"] == " Berlin"
    assert record["tokens"] == ["The", " capital", " of", " Germany", " is"]


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: ["--NOT_A_TOGGLE=1"], "unknown toggle"),
    (lambda tmp: ["--USE_NORM_LENS=maybe"], "USE_NORM_LENS must be a bool"),
    (lambda tmp: ["--MODEL=/nowhere/model.gguf"], "does not exist"),
    (lambda tmp: [f"--MODEL={_write(tmp / 'bad.gguf', 'oops')}"], "not a GGUF file"),
    (lambda tmp: [f"--PROMPTS_FILE={_write(tmp / 'p.json', '[{')}"], "not valid JSON"),
    (lambda tmp: [f"--PROMPTS_FILE={_write(tmp / 'p.json', json.dumps([{'prompt': ' ', 'target': 'x'}]))}"],
     "empty prompt"),
    (lambda tmp: [f"--PROMPTS_FILE={tmp / 'missing.json'}"], "does not exist"),
    (lambda tmp: ["--PROMPT_FORMAT=poem"], "PROMPT_FORMAT must be one of"),
    (lambda tmp: ["--TEMPERATURES=[1.0, -2]"], "TEMPERATURES must be a list of positive numbers"),
    (lambda tmp: ["--MODELS=[]"], "MODELS is empty"),
    (lambda tmp: ['--MODELS=["smollm2-135m", "no-such-model"]'], "Unknown model 'no-such-model'"),
])
def test_bad_input_fails_with_one_line_and_no_results(tmp_path, make_args, fragment):
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--OUT_DIR={out}", *make_args(tmp_path))
    assert_fails_cleanly(result, out, fragment)


def _write(path, text):
    path.write_text(text)
    return path


def test_models_compared_by_depth(tmp_path, tiny_folders):
    """MODELS with two tiny models, asked in the QA format only: one run folder each (their main prompts are the
    QA ones), then one comparison whose statistics carry intervals and agree with the per-prompt numbers."""
    models = [str(tiny_folders["llama"]), str(tiny_folders["gemma2"])]
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--OUT_DIR={out}", f"--MODELS={json.dumps(models)}", "--PROMPT_FORMAT=qa",
                        "--FACTS=10", "--PARAPHRASES=False", "--DIRECTION_PROBES=False", "--TEMPERATURES=[1.0]")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["comparison", "gemma2", "llama"]
    [folder] = [p for p in (out / "comparison").iterdir() if not p.is_symlink()]
    comparison = json.loads((folder / "results.json").read_text())
    assert [m["model"] for m in comparison["models"]] == ["llama", "gemma2"]
    for entry, statistics in zip(comparison["models"], comparison["statistics"]["models"]):
        assert Path(entry["run_folder"]).is_dir() and len(entry["prompts"]) == 10
        assert all(p["prompt"].startswith("Question:") for p in entry["prompts"])
        for prompt in entry["prompts"]:
            assert len(prompt["depth"]) == entry["n_layers"] + 1 and prompt["depth"][-1] == 1.0
        band = statistics["p_target_by_depth"]
        means = np.mean([p["target_prob"] for p in entry["prompts"]], axis=0)
        assert band["n"] == 10 and np.allclose(band["value"], means, atol=1e-12)
        assert all(lo <= v <= hi for v, lo, hi in zip(band["value"], *band["ci95"]))
        right = [p["resolution"]["first_top1_layer"] is not None for p in entry["prompts"]]  # top-1 at the end
        assert statistics["accuracy"]["value"] == pytest.approx(np.mean(right))
    [difference] = comparison["statistics"]["paired_differences"].values()
    accuracy = [s["accuracy"]["value"] for s in comparison["statistics"]["models"]]
    assert difference["accuracy"]["value"] == pytest.approx(accuracy[1] - accuracy[0])
    assert difference["accuracy"]["n"] == 10
    text = (folder / "report.md").read_text()
    assert (folder / "by_depth.png").exists() and "models compared by depth" in text and "], n = 10" in text


def test_gemma3_base_model(tmp_path):
    """The second embedded model: BOS added, whole-word tokens, chat skipped with a note, and the late-layer
    un-resolving measured before (DESIGN.md: " Paris" top-1 after block 12 with p 0.72, final top-1 " the")."""
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--OUT_DIR={out}", "--MODEL=gemma3-270m", "--PROMPT_FORMAT=all", "--FACTS=10",
                        "--PARAPHRASES=False", "--DIRECTION_PROBES=False", "--TEMPERATURES=[1.0]")
    assert result.returncode == 0, result.stderr
    [folder] = [p for p in (out / "gemma3-270m").iterdir() if not p.is_symlink()]
    results = json.loads((folder / "results.json").read_text())
    assert results["n_layers"] == 18 and {p["format"] for p in results["prompts"]} == {"completion", "qa"}
    assert "no chat template" in (folder / "report.md").read_text()
    france = results["prompts"][0]
    assert france["tokens"] == ["<bos>", "The", " capital", " of", " France", " is"]
    assert france["target_token"] == " Paris"
    assert france["layers"][13]["target_rank"] == 0 and france["layers"][13]["target_prob"] == pytest.approx(0.72, abs=0.02)
    assert france["layers"][-1]["top_tokens"][0][0] == " the" and france["layers"][-1]["target_rank"] == 2


# ----------------------------------------------------------------------------- faults the self-checks must catch


def run_in_process(*args: str) -> Path:
    """001's main() in this process (so a monkeypatched common module is what it runs); its run folder."""
    spec = importlib.util.spec_from_file_location("run_001_faults", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.main(parse_toggles(vars(module), list(args))))


@pytest.fixture
def tiny_run(tmp_path, tiny_folders):
    """A small 001 run on a tiny model (two prompts, three temperatures): returns (report.md, results). The tiny
    Gemma-2's sharper distributions give KLs up to 0.17 nats (the Llama's stay below 0.015)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "The capital of France is", "target": "Paris"},
                                   {"prompt": "Romeo and Juliet was written by William", "target": "Shakespeare"}]))

    def run(*extra: str, model: str = "llama"):
        folder = run_in_process(f"--OUT_DIR={tmp_path / 'out'}", f"--MODEL={tiny_folders[model]}",
                                f"--PROMPTS_FILE={prompts}", "--TEMPERATURES=[0.5, 1.0, 2.0]", "--TOP_K=3", *extra)
        return (folder / "report.md").read_text(), json.loads((folder / "results.json").read_text())
    return run


def check_line(report: str, fragment: str) -> str:
    """The report's one self-check line that names `fragment`."""
    [line] = [line for line in report.splitlines() if line.startswith("- ") and fragment in line]
    return line


NORM_CHECK = "NORM lens at the last layer == model logits"
KL_CHECK = "NORM lens: KL(final || layer) == torch's kl_div against the model's own logits"
RANK_CHECK = "NORM lens: target rank at T = 0.5, 1, 2 == its rank counted in the whole row divided by T"


@pytest.mark.parametrize("model", ["llama", "gemma2"])
def test_the_tiny_run_passes_every_check(tiny_run, model):
    """The baseline of the fault tests below: without a fault, every check passes."""
    report, results = tiny_run(model=model)
    for fragment in (NORM_CHECK, KL_CHECK, RANK_CHECK, "RAW lens: KL(final || layer)"):
        assert check_line(report, fragment).startswith("- PASS"), fragment
    assert all(prompt["self_check"]["passed"] for prompt in results["prompts"])


def test_a_lens_without_the_final_norm_fails_its_check(tiny_run, monkeypatch):
    """Fault: the unembedding forgets the final norm (what the NORM lens must not do) -> the lens at the last layer
    no longer reproduces the model's logits."""
    unembed = lens.unembed
    monkeypatch.setattr(lens, "unembed", lambda model, resid, use_norm, grad=False: unembed(model, resid, False, grad))
    report, results = tiny_run()
    assert check_line(report, NORM_CHECK).startswith("- **FAIL**")
    assert not any(prompt["self_check"]["passed"] for prompt in results["prompts"])


def _kl_against_the_wrong_row(metrics_of, logits, *args, **kwargs):
    metrics = metrics_of(logits, *args, **kwargs)
    wrong_final = torch.cat([logits[:-1], logits[-2:-1]])  # the last-but-one layer taken for the final one
    metrics["kl_to_final"] = metrics_of(wrong_final, *args, **kwargs)["kl_to_final"]
    return metrics


def _kl_with_the_wrong_sign_clamped(metrics_of, logits, *args, **kwargs):
    metrics = metrics_of(logits, *args, **kwargs)
    metrics["kl_to_final"] = (-metrics["kl_to_final"]).clamp_min(0.0)  # a sign error that the clamp hides as 0
    return metrics


@pytest.mark.parametrize("fault", [_kl_against_the_wrong_row, _kl_with_the_wrong_sign_clamped])
def test_a_wrong_kl_fails_its_check(tiny_run, monkeypatch, fault):
    """Faults in the reported KL(final || layer) (its last entry still 0, every value still >= 0): the check
    recomputes it from the model's own logits and fails; the other checks still pass."""
    metrics_of = lens.lens_metrics
    monkeypatch.setattr(lens, "lens_metrics", lambda *args, **kwargs: fault(metrics_of, *args, **kwargs))
    report, results = tiny_run(model="gemma2")
    assert check_line(report, KL_CHECK).startswith("- **FAIL**")
    assert check_line(report, NORM_CHECK).startswith("- PASS")
    for prompt in results["prompts"]:
        assert prompt["layers"][-1]["kl_to_final"] == 0 and all(layer["kl_to_final"] >= 0 for layer in prompt["layers"])


def test_a_temperature_applied_to_part_of_the_vocabulary_fails_its_check(tiny_run, monkeypatch):
    """Fault: T divides only the odd token ids' logits -> the ranks read at T != 1 leave the untempered ones."""
    metrics_of = lens.lens_metrics

    def uneven(logits, target_id, top_k=5, temperature=1.0):
        if temperature != 1.0:
            logits = logits.clone()
            logits[:, ::2] *= temperature  # undone by the division for the even ids only
        return metrics_of(logits, target_id, top_k, temperature)
    monkeypatch.setattr(lens, "lens_metrics", uneven)
    report, _ = tiny_run()
    assert check_line(report, RANK_CHECK).startswith("- **FAIL**")
    assert check_line(report, KL_CHECK).startswith("- PASS")  # T = 1 is untouched


def _trained_lens(model) -> tuned_lens.TrainedLens:
    """A tuned lens with random translators (no training): acting at every layer but the last."""
    translators = tuned_lens.TunedLens(model.n_layers, model.d_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for translator in translators.translators:
            translator.weight.copy_(0.1 * torch.randn(translator.weight.shape, generator=generator))
            translator.bias.copy_(torch.randn(translator.bias.shape, generator=generator))
    kl = [0.5] * model.n_layers + [0.0]
    return tuned_lens.TrainedLens(translators.eval(), "nothing (a test)", 1, 1, {"norm": kl, "tuned": kl}, 0.0)


@pytest.mark.parametrize("faulty", [False, True])
def test_a_tuned_lens_that_translates_the_last_layer_fails_its_check(tiny_run, monkeypatch, faulty):
    """Fault: the tuned lens translates the last layer too, which must stay the model's own output."""
    monkeypatch.setattr(tuned_lens, "load_or_train", lambda model, settings=None: _trained_lens(model))
    if faulty:
        monkeypatch.setattr(tuned_lens.TunedLens, "translate",
                            lambda self, h, layer: h.float() + self.translators[min(layer, len(self.translators) - 1)](h.float()))
    report, results = tiny_run("--USE_TUNED_LENS=True")
    line = check_line(report, "tuned lens at the last layer == model logits")
    assert line.startswith("- **FAIL**" if faulty else "- PASS"), line
    assert all(prompt["tuned_self_check"]["passed"] is not faulty for prompt in results["prompts"])
    assert check_line(report, NORM_CHECK).startswith("- PASS")


@pytest.mark.parametrize("model, dtype", [("llama", "float16"), ("gemma2", "bfloat16")])
def test_every_check_passes_in_half_precision(tmp_path, tiny_folders, model, dtype):
    """The Mac's dtypes: the checks' half-precision tolerances hold on real runs (results.json keeps only the
    per-prompt lens check, which test_half_precision reads; the report has them all)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "The capital of France is", "target": "Paris"}]))
    folder = run_in_process(f"--OUT_DIR={tmp_path}", f"--MODEL={tiny_folders[model]}", f"--DTYPE={dtype}",
                            "--DEVICE=cpu", f"--PROMPTS_FILE={prompts}", "--TEMPERATURES=[0.5, 1.0, 2.0]")
    report = (folder / "report.md").read_text()
    checks = report[report.index("## Self-checks"):report.index("## Key layers")]
    assert checks.count("- PASS") == 5 and "FAIL" not in checks, checks


def test_statistics_carry_intervals_and_match_the_prompts(norm_and_raw_runs):
    """results.json "statistics": each a {"value", "ci95", "n"} record whose value agrees with the prompts."""
    out, _, _ = norm_and_raw_runs
    norm = next(r for r in (json.loads((f / "results.json").read_text()) for f in run_folders(out))
                if r["lens"] == "norm")
    mains = [p for p in norm["prompts"] if p["format"] == "completion" and p["variant"] == 0 and p["probe"] is None]
    right = [p["layers"][-1]["target_rank"] == 0 for p in mains]
    stats = norm["statistics"]
    accuracy = stats["main_prompts"]["accuracy"]
    assert accuracy["n"] == len(mains) and accuracy["value"] == pytest.approx(sum(right) / len(right))
    assert accuracy["ci95"][0] <= accuracy["value"] <= accuracy["ci95"][1] and accuracy["ci95"][0] < accuracy["ci95"][1]
    assert set(stats["by_format"]) == {"completion", "qa", "chat"}
    assert "accuracy_minus_completion" in stats["by_format"]["qa"]
    relations = {fact["relation"] for fact in chosen_facts()}
    assert set(stats["by_relation"]) == relations and len(relations) >= 8
    assert sum(r["accuracy"]["n"] for r in stats["by_relation"].values()) == len(mains)
    band = stats["p_target_by_layer"]
    assert len(band["value"]) == 31 and band["n"] == len(mains)
    assert all(lo <= v <= hi for v, lo, hi in zip(band["value"], *band["ci95"]))
    assert "direction_bias_final_p" in stats and stats["direction_bias_final_p"]["n"] >= 1


def test_temperature_and_paraphrase_statistics_match_the_prompts(norm_and_raw_runs):
    """The temperature means and the paraphrase statistics (each fact one unit) recomputed from the prompts."""
    out, _, _ = norm_and_raw_runs
    norm = next(r for r in (json.loads((f / "results.json").read_text()) for f in run_folders(out))
                if r["lens"] == "norm")
    mains = [p for p in norm["prompts"] if p["format"] == "completion" and p["variant"] == 0 and p["probe"] is None]
    by_temperature = norm["statistics"]["by_temperature"]
    assert len(by_temperature) >= 2 and "1" in by_temperature
    for prompt_entry in mains[0]["temperatures"]:
        record = by_temperature[f"{prompt_entry['temperature']:g}"]
        at = [next(t for t in p["temperatures"] if t["temperature"] == prompt_entry["temperature"]) for p in mains]
        assert record["final_p_target"]["value"] == pytest.approx(np.mean([t["target_prob"][-1] for t in at]))
        assert record["final_entropy"]["n"] == len(mains)
    wordings = {}
    for p in norm["prompts"]:
        if p["format"] == "completion" and p["probe"] is None:
            wordings.setdefault(p["fact_id"], []).append(p["layers"][-1]["target_rank"] == 0)
    facts = [flags for flags in wordings.values() if len(flags) > 1]
    paraphrases = norm["statistics"]["paraphrases"]
    assert paraphrases["facts"] == len(facts) >= 2
    assert paraphrases["accuracy_per_fact"]["value"] == pytest.approx(np.mean([np.mean(f) for f in facts]))
    assert paraphrases["wordings_agree"]["value"] == pytest.approx(np.mean([len(set(f)) == 1 for f in facts]))
    report = next(f / "report.md" for f in run_folders(out)
                  if json.loads((f / "results.json").read_text())["lens"] == "norm").read_text()
    assert "Paraphrases (" in report and "mean entropy (nats)" in report
