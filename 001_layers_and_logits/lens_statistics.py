"""001's statistics over prompts, each with a seeded bootstrap 95% interval (common/stats.py).

Every statistic is written as {"value": v, "ci95": [lo, hi], "n": n, "n_none": k}: n prompts (or facts, or
pairs of prompts) went into it; n_none were left out because the quantity does not exist for them (a fact
whose answer never becomes top-1 has no resolution depth; that share is reported beside it).
Facts the model gets wrong stay in: they count as wrong in the accuracies and as "never" in the depths.
"""
from __future__ import annotations

from common import stats
from common.prompts import PROMPT_FORMATS

PAIRED_PROBES = {"direction": ("forward", "reverse"), "answer_position": ("target_first", "target_second")}


def resolution(readings, seed: int) -> dict:
    """Accuracy (the target is the final layer's top-1) and the median depth from which it stays top-1 (over the
    prompts where it does), for a list of PromptReadings. A target stays top-1 to the end exactly when it is the
    final top-1, so the share that resolves equals the accuracy; it is kept for readers of results.json."""
    depths = [r.lens.resolution().first_top1_depth for r in readings]
    return {"accuracy": stats.proportion([r.lens.final_rank == 0 for r in readings], seed=seed),
            "first_top1_depth_median": stats.interval(depths, "median", seed=seed),
            "share_resolving": stats.share(depths, seed=seed)}


def by_format(study, seed: int) -> dict:
    """resolution() per prompt format (first wording of each fact), and each format's accuracy minus the
    completion format's, fact by fact (paired)."""
    chosen = {f: study.chosen(f) for f in PROMPT_FORMATS if study.chosen(f)}
    out = {f: resolution(readings, seed) for f, readings in chosen.items()}
    baseline = {r.prompt.fact_id: r.lens.final_rank == 0 for r in chosen.get("completion", [])}
    for f, readings in chosen.items():
        if f != "completion" and baseline:
            right = {r.prompt.fact_id: r.lens.final_rank == 0 for r in readings}
            facts = [fact for fact in right if fact in baseline]
            out[f]["accuracy_minus_completion"] = stats.paired_difference(
                [float(right[fact]) for fact in facts], [float(baseline[fact]) for fact in facts], seed=seed)
    return out


def by_relation(study, seed: int) -> dict:
    """resolution() per relation type of the facts (main prompts), sorted by relation name."""
    groups: dict[str, list] = {}
    for r in study.main_readings:
        groups.setdefault(r.prompt.extra.get("relation", "unlabelled"), []).append(r)
    return {relation: resolution(readings, seed) for relation, readings in sorted(groups.items())}


def probe_bias(study, kind: str, seed: int) -> dict | None:
    """Final p(target) of the first side minus the second side, probe by probe (paired), e.g. forward minus
    reverse; None when the run has no such probes."""
    first, second = ({r.prompt.fact_id: r.lens.final_prob for r in study.chosen("completion", kind, side)}
                     for side in PAIRED_PROBES[kind])
    ids = [i for i in first if i in second]
    if not ids:
        return None
    return stats.paired_difference([first[i] for i in ids], [second[i] for i in ids], seed=seed)


def by_temperature(study, seed: int) -> dict:
    """Per temperature (text key, e.g. "1.5"), the final layer's mean p(target) and mean entropy over the main
    prompts."""
    mains = study.main_readings
    return {f"{t:g}": {"final_p_target": stats.interval([r.by_temperature[t].target_prob[-1] for r in mains], seed=seed),
                       "final_entropy": stats.interval([r.by_temperature[t].entropy[-1] for r in mains], seed=seed)}
            for t in (mains[0].by_temperature if mains else {})}


def paraphrases(study, seed: int) -> dict | None:
    """How much the wording matters, over the facts asked in two or more wordings (completion format), each fact
    one unit (its wordings are not independent prompts): the mean share of a fact's wordings that are right;
    the share of facts whose wordings all agree (all right or all wrong); the median spread (largest minus
    smallest) of the top-1-for-good depth over the facts where two or more wordings resolve. None without
    such facts."""
    wordings: dict[str, list] = {}
    for r in study.readings:
        if r.probe is None and r.prompt.format == "completion":
            wordings.setdefault(r.prompt.fact_id, []).append(r)
    facts = [group for group in wordings.values() if len(group) > 1]
    if not facts:
        return None
    right = [[r.lens.final_rank == 0 for r in group] for group in facts]
    depths = [[d for d in (r.lens.resolution().first_top1_depth for r in group) if d is not None] for group in facts]
    return {"facts": len(facts), "wordings": sum(map(len, facts)),
            "accuracy_per_fact": stats.interval([sum(flags) / len(flags) for flags in right], seed=seed),
            "wordings_agree": stats.proportion([len(set(flags)) == 1 for flags in right], seed=seed),
            "first_top1_depth_spread": stats.interval([max(d) - min(d) for d in depths if len(d) > 1], "median",
                                                      seed=seed)}


def layer_band(readings, quantity: str, seed: int) -> dict:
    """The mean of one LensTrajectory curve (e.g. "target_prob", "entropy") per layer over `readings`, with its
    pointwise 95% band: {"value": [layers], "ci95": [[lo per layer], [hi per layer]], "n"}."""
    value, lo, hi = stats.band([getattr(r.lens, quantity) for r in readings], seed=seed)
    nan_to_none = [None if x != x else float(x) for x in lo], [None if x != x else float(x) for x in hi]
    return {"value": [float(v) for v in value], "ci95": list(nan_to_none), "n": len(readings)}


def statistics(study, seed: int) -> dict:
    """Every statistic over prompts of one model's run (results.json "statistics")."""
    mains = study.main_readings
    out = {"main_prompts": resolution(mains, seed), "by_format": by_format(study, seed),
           "by_relation": by_relation(study, seed), "p_target_by_layer": layer_band(mains, "target_prob", seed)}
    for kind in PAIRED_PROBES:
        bias = probe_bias(study, kind, seed)
        if bias is not None:
            out[f"{kind}_bias_final_p"] = bias
    out["by_temperature"] = by_temperature(study, seed)
    wording = paraphrases(study, seed)
    if wording is not None:
        out["paraphrases"] = wording
    return out


def comparison(studies, seed: int) -> dict:
    """The models compared by depth % (the comparison run's "statistics"): per model (a list in the order of
    `studies`) its accuracy, median resolution depth, and mean p(target) and entropy by depth with bands; for each
    later model, its difference from the first one fact by fact (paired, over the facts both models were asked;
    the depth difference over the facts both get right)."""
    per_model = [{"model": s.model, "depth": [layer / s.n_layers for layer in range(s.n_layers + 1)],
                  **resolution(s.main_readings, seed),
                  "p_target_by_depth": layer_band(s.main_readings, "target_prob", seed),
                  "entropy_by_depth": layer_band(s.main_readings, "entropy", seed)} for s in studies]
    first = {r.prompt.fact_id: r for r in studies[0].main_readings}
    differences = {}
    for s in studies[1:]:
        other = {r.prompt.fact_id: r for r in s.main_readings}
        facts = [fact for fact in first if fact in other]
        depth = [[m[fact].lens.resolution().first_top1_depth for fact in facts] for m in (other, first)]
        right = [[float(m[fact].lens.final_rank == 0) for fact in facts] for m in (other, first)]
        differences[f"{s.model} minus {studies[0].model}"] = {
            "accuracy": stats.paired_difference(*right, seed=seed),
            "first_top1_depth": stats.paired_difference(*depth, statistic="median", seed=seed)}
    return {"models": per_model, "paired_differences": differences}


def text(record: dict, percent: bool = False) -> str:
    """One statistic as report text: "0.62 [0.53, 0.71], n = 113" (percent: "62% [53%, 71%]")."""
    if record["value"] is None:
        return f"none (n = 0{', ' + str(record['n_none']) + ' without a value' if record.get('n_none') else ''})"
    show = (lambda x: f"{100 * x:.0f}%") if percent else (lambda x: f"{x:.3f}")
    lo, hi = record["ci95"]
    spread = f" [{show(lo)}, {show(hi)}]" if lo is not None else " [no interval: one value]"
    return f"{show(record['value'])}{spread}, n = {record['n']}"
