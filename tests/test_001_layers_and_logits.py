"""001 end to end on the embedded model, as the user runs it, and its bad inputs."""
import json

import pytest

from conftest import run_script

SCRIPT = "001_layers_and_logits/run.py"


def _run_folders(out_dir):
    return [p for p in out_dir.glob("*/*") if p.is_dir()]


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
            assert layer["entropy"] >= 0 and layer["kl_to_final"] >= 0
        assert layers[-1]["kl_to_final"] == 0
        assert prompt["self_check"]["passed"]


@pytest.fixture(scope="module")
def norm_and_raw_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs001")
    norm = run_script(SCRIPT, f"--OUT_DIR={out}", "--TOP_K=3")
    raw = run_script(SCRIPT, f"--OUT_DIR={out}", "--USE_NORM_LENS=False", "--TOP_K=3")
    return out, norm, raw


def test_norm_and_raw_runs_write_the_contract_files(norm_and_raw_runs):
    out, norm, raw = norm_and_raw_runs
    assert norm.returncode == 0, norm.stderr
    assert raw.returncode == 0, raw.stderr
    folders = sorted(_run_folders(out))
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
    assert "## Key layers" in report and "![target probability](target_prob_heatmap.png)" in report


def test_norm_lens_resolves_late_and_raw_differs(norm_and_raw_runs):
    """The science of the issue: under NORM the answer is top-1 only in the late layers; RAW looks different."""
    out, _, _ = norm_and_raw_runs
    runs = {json.loads((f / "results.json").read_text())["lens"]: json.loads((f / "results.json").read_text())
            for f in _run_folders(out)}
    for norm_prompt, raw_prompt in zip(runs["norm"]["prompts"], runs["raw"]["prompts"]):
        ranks = [layer["target_rank"] for layer in norm_prompt["layers"]]
        assert ranks[-1] == 0, norm_prompt["prompt"]  # the prompts are ones the model answers
        assert all(rank > 0 for rank in ranks[:15])  # not top-1 anywhere in the first half
        raw_probs = [layer["target_prob"] for layer in raw_prompt["layers"][:-1]]
        norm_probs = [layer["target_prob"] for layer in norm_prompt["layers"][:-1]]
        assert raw_probs != pytest.approx(norm_probs, abs=1e-3)


def test_prompts_file_is_used_verbatim(tmp_path):
    prompts = tmp_path / "mine.json"
    prompts.write_text(json.dumps([{"prompt": "The capital of Germany is", "target": "Berlin"}]))
    result = run_script(SCRIPT, f"--OUT_DIR={tmp_path / 'out'}", f"--PROMPTS_FILE={prompts}")
    assert result.returncode == 0, result.stderr
    [folder] = _run_folders(tmp_path / "out")
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
])
def test_bad_input_fails_with_one_line_and_no_results(tmp_path, make_args, fragment):
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--OUT_DIR={out}", *make_args(tmp_path))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not list(out.rglob("results.json"))


def _write(path, text):
    path.write_text(text)
    return path
