"""Self-checks: how close two computations of the same numbers must be, and the record every report shows.

One tolerance rule for the whole lab, by dtype. float32 keeps ~7 significant digits, so each check states its
own float32 tolerance (1e-4 for logits, 1e-5 for probabilities, ...). Half precision keeps ~3 (float16) or ~2
(bfloat16) significant digits, and errors add up over the layers, so there the tolerance is a share of the
values' scale: 1% in float16 and 4% in bfloat16 (measured on SmolLM2: a batched and a single forward pass
in bfloat16 differ by 0.19 in a logit difference of 4 with logits near 20, i.e. ~1% of the scale; 4% leaves
room for deeper models while a real fault — a wrong norm, a missing soft-cap — moves logits by far more).
"""
from __future__ import annotations

import torch

HALF_PRECISION_SHARE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


def tolerance(dtype, values: torch.Tensor | float, float32_tolerance: float) -> float:
    """The largest difference allowed between two computations of `values` in `dtype`.

    float32 (and float64): `float32_tolerance`. float16 / bfloat16: 1% / 4% of max(1, max |values|).
    """
    share = HALF_PRECISION_SHARE.get(dtype)
    if share is None:
        return float(float32_tolerance)
    scale = values.float().abs().max().item() if isinstance(values, torch.Tensor) else abs(float(values))
    return max(float(float32_tolerance), share * max(1.0, scale))


def check(name: str, max_abs_diff: float, allowed: float) -> dict:
    """One self-check as reports and results.json record it: passed when the difference is within tolerance."""
    diff = float(max_abs_diff)
    return {"name": name, "max_abs_diff": diff, "tolerance": float(allowed), "passed": bool(diff <= allowed)}


def worst_over_prompts(checks_per_prompt: list[list[dict]]) -> list[dict]:
    """Each self-check once, as its worst prompt measured it: the prompt nearest to failing (largest difference
    minus tolerance; where tolerances scale with a prompt's logits, another prompt may have a larger raw difference
    under a larger tolerance).

    checks_per_prompt: per prompt, its list of `check` records (the same names in each). A check passes
    only if it passed on every prompt; its name then says over how many prompts and how many failed.
    """
    by_name: dict[str, list[dict]] = {}
    for checks in checks_per_prompt:
        for record in checks:
            by_name.setdefault(record["name"], []).append(record)
    summary = []
    for name, records in by_name.items():
        worst = max(records, key=lambda r: r["max_abs_diff"] - r["tolerance"])
        failed = sum(not r["passed"] for r in records)
        summary.append(dict(worst, passed=failed == 0,
                            name=f"{name} (worst of {len(records)} prompts: nearest its tolerance; {failed} failed)"))
    return summary
