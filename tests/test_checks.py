"""The self-check record, the tolerance rule by dtype, and the worst-over-prompts summary."""
import torch

from common.checks import check, tolerance, worst_over_prompts


def test_a_check_passes_within_its_tolerance_and_fails_beyond():
    assert check("x", 1e-5, 1e-4)["passed"] and not check("x", 2e-4, 1e-4)["passed"]


def test_half_precision_tolerance_is_a_share_of_the_scale():
    assert tolerance(torch.float32, torch.tensor([50.0]), 1e-4) == 1e-4
    assert tolerance(torch.float16, torch.tensor([50.0]), 1e-4) == 0.5
    assert tolerance(torch.bfloat16, 0.5, 1e-4) == 0.04  # scale at least 1


def test_worst_over_prompts_keeps_the_worst_and_fails_if_any_failed():
    first = [check("x", 0.1, 1.0), check("y", 0.0, 1.0)]
    second = [check("x", 2.0, 1.0), check("y", 0.5, 1.0)]
    summary = {record["name"].split(" (")[0]: record for record in worst_over_prompts([first, second])}
    assert summary["x"]["max_abs_diff"] == 2.0 and not summary["x"]["passed"]
    assert "worst of 2 prompts: nearest its tolerance; 1 failed" in summary["x"]["name"]
    assert summary["y"]["passed"] and summary["y"]["max_abs_diff"] == 0.5
