"""The Mac's dtypes, end to end: 001-004 in float16 and bfloat16 on the CPU, every self-check passing.

On the Mac, DTYPE="auto" means float16 (bfloat16 for Gemma). The self-checks then use common.checks'
half-precision tolerance rule; these runs show the rule holds on real runs, not only on the float32 runs
the other tests make.
"""
import json

import pytest

from conftest import run_folders, run_script

FACTS = [{"prompt": "The capital of France is", "target": "Paris", "counterfactual": "Rome"},
         {"prompt": "The Eiffel Tower is in the city of", "target": "Paris", "counterfactual": "Rome"}]
PAIRS = [{"clean": "The capital of France is", "corrupt": "The capital of Italy is",
          "clean_answer": "Paris", "corrupt_answer": "Rome"}]
# (experiment, small toggles) — each also gets MODEL, DTYPE, DEVICE=cpu and OUT_DIR.
EXPERIMENTS = [
    ("001_layers_and_logits/run.py", ["--TEMPERATURES=[1.0]", "--DIRECTION_PROBES=False", "--PARAPHRASES=False",
                                      "--FACTS=8"]),
    ("002_attention_patterns/run.py", ["--TOP_HEADS=2"]),
    ("003_circuit_analysis/run.py", ["--TOP_K=2", "--ABLATE_EVERY=False"]),
    ("004_activation_patching/run.py", ["--NOISE_SAMPLES=2"]),
]
MODELS = [("llama", "float16"), ("gemma2", "bfloat16"), ("gemma3-270m", "bfloat16")]
# The embedded Gemma-3 (18 layers, vocab 262k) is ~10x slower than a tiny model: one prompt, fewer sites.
GEMMA3_TOGGLES = {"004": ["--SITES=['head']", "--NOISE_TRACING=False"]}


def self_checks(node) -> list[dict]:
    """Every self-check record anywhere in a results.json."""
    if isinstance(node, dict):
        if {"name", "max_abs_diff", "tolerance", "passed"} <= node.keys():
            return [node]
        return [c for value in node.values() for c in self_checks(value)]
    if isinstance(node, list):
        return [c for value in node for c in self_checks(value)]
    return []


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    (root / "facts.json").write_text(json.dumps(FACTS))
    (root / "fact.json").write_text(json.dumps(FACTS[:1]))
    (root / "pairs.json").write_text(json.dumps(PAIRS))
    return root


@pytest.mark.parametrize("model, dtype", MODELS, ids=[f"{m}-{d}" for m, d in MODELS])
@pytest.mark.parametrize("script, toggles", EXPERIMENTS, ids=[s.split("_")[0] for s, _ in EXPERIMENTS])
def test_runs_in_half_precision_with_passing_self_checks(script, toggles, model, dtype, tiny_folders, data_files,
                                                          tmp_path):
    embedded = model == "gemma3-270m"
    spec = model if embedded else str(tiny_folders[model])
    data = f"--PAIRS_FILE={data_files / 'pairs.json'}" if script.startswith("004") else \
        f"--PROMPTS_FILE={data_files / ('fact.json' if embedded else 'facts.json')}"
    if embedded:
        toggles = toggles + GEMMA3_TOGGLES.get(script[:3], [])
    result = run_script(script, f"--MODEL={spec}", f"--DTYPE={dtype}", "--DEVICE=cpu", f"--OUT_DIR={tmp_path}",
                        data, *toggles)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = [f for f in run_folders(tmp_path) if f.parent.name != "comparison"]
    assert len(folders) == 1
    results = json.loads((folders[0] / "results.json").read_text())
    config = json.loads((folders[0] / "config.json").read_text())
    assert dtype in json.dumps(config)
    checks = self_checks(results)
    assert checks, "no self-check recorded"
    failed = [c for c in checks if not c["passed"]]
    assert not failed, failed[:3]


def test_norm_convention_is_read_right_in_bfloat16():
    """Gemma multiplies by 1 + weight; in bfloat16 its large final-norm weights (~280) round by more than that 1,
    so the probe must run in float32 (it picked "w" before, and DLA missed the logit by 15%)."""
    from common.attribution import norm_weight_convention
    from common.models import load_model
    gemma = load_model("gemma3-270m", "cpu", "bfloat16")
    assert gemma.final_norm.weight.detach().float().abs().max() > 256  # the case that rounds
    assert norm_weight_convention(gemma.final_norm) == "1 + w"
