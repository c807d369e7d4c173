"""report.html: one self-contained, interactive page per run folder (no server, no network).

Each experiment's run.py passes its results dict to `write_page(run, results)`; this module picks the numbers
the page needs, and writes one HTML file with the charting library, the glue scripts, the styles and the data
inlined. Nothing is fetched: the page opens by double-click (Safari 16.4+, Chrome, Firefox) with no network.

The charting library: plotly.js, the official "cartesian" partial bundle (common/vendor/, version and sha256
in its README). Why plotly: it is one well-kept library (MIT, Plotly Inc., actively maintained) that does
everything the pages need out of the box - heatmaps with text in the cells and a custom hover per cell,
line and bar charts, click events to link charts - and it works from a single inlined file. The full bundle
(plotly.min.js, ~4.6 MB, what `plotly` from pip inlines) would double the size of a run folder, and the lab
keeps many; the cartesian bundle is 1.5 MB, and gzip (the page unzips it with the browser's own
DecompressionStream) brings it to 0.5 MB, ~0.66 MB as base64 text. The data is packed the same way.
circuitsvis was not used for 002's attention: its pages load React from a CDN unless built locally, and a
bar chart of one query position's attention over the tokens, coloured by token type, is what 002 asks.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import math
from functools import lru_cache
from pathlib import Path

from common.report import visible_token

HERE = Path(__file__).resolve().parent
PLOTLY_FILE = HERE / "vendor" / "plotly-cartesian.min.js"
PLOTLY_VERSION = "4.1.1"
ASSETS = HERE / "html"


def pack(text: str) -> str:
    """gzip (fixed mtime, so the same input gives the same page) then base64: what the page unpacks."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


@lru_cache(maxsize=1)
def _packed_plotly() -> str:
    return pack(PLOTLY_FILE.read_text(encoding="utf-8"))


def rounded(value, decimals: int = 6):
    """Floats rounded to `decimals` (the reports' precision), recursively; NaN/inf become None (JSON null)."""
    if isinstance(value, float):
        return round(value, decimals) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, decimals) for v in value]
    return value


def page(title: str, script: str, data: dict) -> str:
    """The whole HTML text: styles, the packed library and data, the common glue and the experiment's script."""
    glue = (ASSETS / "common.js").read_text() + "\n" + (ASSETS / f"{script}.js").read_text()
    payload = json.dumps(rounded(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:">
<title>{html.escape(title)}</title>
<style>{(ASSETS / "page.css").read_text()}</style></head>
<body><h1>{html.escape(title)}</h1>
<p id="status">Loading the charts... (this page needs JavaScript and a browser from 2023 or later: Safari 16.4+, Chrome, Firefox)</p>
<div id="app"></div>
<script id="plotly-gz" type="application/octet-stream" data-version="{PLOTLY_VERSION}">{_packed_plotly()}</script>
<script id="data-gz" type="application/octet-stream">{pack(payload)}</script>
<script>{glue}</script>
</body></html>
"""


def write_page(run, results: dict) -> Path:
    """Write report.html into the run folder for 001-004's results (001's comparison too); return its path."""
    builders = {"001_layers_and_logits": data_001, "002_attention_patterns": data_002,
                "003_circuit_analysis": data_003, "004_activation_patching": data_004}
    experiment = results["experiment"]
    if experiment == "001_layers_and_logits" and results.get("comparison"):
        script, data, title = "001_comparison", data_001_comparison(results), "001 models compared by depth %"
    else:
        script, data = experiment[:3], builders[experiment](results)
        title = f"{experiment.replace('_', ' ', 1).replace('_', ' ')}: {results['model']}"
    run.write_text("report.html", page(title, script, data))
    return run.path / "report.html"


# ----------------------------------------------------------------------------- per experiment: what the page needs


def _lens_view(layers: list[dict]) -> dict:
    """Per-layer series of one lens over one prompt, tokens made visible (' Paris' -> '␣Paris')."""
    return {"top": [[[visible_token(t), p] for t, p in layer["top_tokens"]] for layer in layers],
            "p": [layer["target_prob"] for layer in layers], "rank": [layer["target_rank"] for layer in layers],
            "entropy": [layer["entropy"] for layer in layers], "kl": [layer["kl_to_final"] for layer in layers]}


def _group_001(record: dict) -> str:
    """Which prompt set a 001 prompt belongs to (the page's set selector)."""
    if record.get("probe"):
        return f"probe: {record['probe'].replace('_', ' ')}"
    if record.get("variant"):
        return "paraphrases"
    return {"completion": "main (completion)", "verbatim": "main (completion)"}.get(record.get("format"),
                                                                                     record.get("format") or "main")


def data_001(results: dict) -> dict:
    """001: every prompt with each lens it has: `layers` (NORM or RAW), `<lens>_layers` (e.g. tuned_layers)."""
    lens = results["lens"]
    names = [lens] + sorted({k[:-len("_layers")] for r in results["prompts"] for k in r
                             if k.endswith("_layers") and k[:-len("_layers")] != lens})
    prompts = []
    for r in results["prompts"]:
        views = {lens: _lens_view(r["layers"])}
        views |= {name: _lens_view(r[f"{name}_layers"]) for name in names[1:] if r.get(f"{name}_layers")}
        prompts.append({"prompt": visible_token(r["prompt"], spaces=False), "target": visible_token(r["target_token"]),
                        "group": _group_001(r), "tokens": [visible_token(t) for t in r["tokens"]],
                        "lenses": views})
    return {"model": results["model"], "n_layers": results["n_layers"], "lens_names": names, "prompts": prompts}


def data_001_comparison(comparison: dict) -> dict:
    models = [{"model": m["model"], "n_layers": m["n_layers"],
               "prompts": [{"fact": p["fact_id"], "prompt": visible_token(p["prompt"], spaces=False),
                            "target": visible_token(p["target"], spaces=False), "depth": p["depth"],
                            "p": p["target_prob"], "entropy": p["entropy"]} for p in m["prompts"]]}
              for m in comparison["models"]]
    return {"lens": comparison["lens"], "models": models}


def data_002(results: dict) -> dict:
    """002: per prompt, layer (of the band) and head, the final position's attention over the tokens."""
    prompts = [{"prompt": visible_token(p["prompt"], spaces=False), "target": visible_token(p["target_token"]),
                "tokens": [visible_token(t) for t in p["tokens"]], "types": p["buckets"],
                "subject_positions": p["subject_positions"],
                "rows": [[head["final_row"] for head in layer["heads"]] for layer in p["layers"]],
                "subject": [[head["subject"] for head in layer["heads"]] for layer in p["layers"]]}
               for p in results["prompts"]]
    return {"model": results["model"], "n_layers": results["n_layers"], "n_heads": results["n_heads"],
            "kv_head_of_head": results["kv_head_of_head"], "layers": results["layers"],
            "buckets": results["buckets"], "ranking": results["head_ranking"], "prompts": prompts}


def data_003(results: dict) -> dict:
    """003: per prompt the head and layer attributions and the ablations; the means over prompts."""
    keep = ("kind", "components", "direct_effect", "total_effect", "metric", "target_prob", "prob_change",
            "layer", "head", "dla", "direct_rank", "total_rank")
    prompts = [{"prompt": visible_token(p["prompt"], spaces=False), "target": visible_token(p["target_token"]),
                "metric": p["metric"], "target_prob": p["target_prob"],
                "heads": p["attribution"]["heads"], "attn": p["attribution"]["attn_per_layer"],
                "mlps": p["attribution"]["mlps"], "embed": p["attribution"]["embed"],
                "ablations": [{k: a[k] for k in keep if k in a} for a in p["ablations"]]}
               for p in results["prompts"]]
    across = results["across_prompts"]
    return {"model": results["model"], "n_layers": results["n_layers"], "n_heads": results["n_heads"],
            "metric": results["metric"], "ablation": results["ablation"],
            "mean": {"heads": across["mean_heads"], "attn": across["mean_attn_per_layer"],
                     "mlps": across["mean_mlps"]}, "prompts": prompts}


def data_004(results: dict) -> dict:
    """004: per pair every grid (exact and attribution) and the causal traces, with the tokens."""
    pairs = []
    for p in results["pairs"]:
        trace = p.get("causal_trace") or {}
        pairs.append({"clean": visible_token(p["clean"], spaces=False), "corrupt": visible_token(p["corrupt"], spaces=False),
                      "clean_answer": visible_token(p["clean_answer_token"]),
                      "corrupt_answer": visible_token(p["corrupt_answer_token"]),
                      "clean_tokens": [visible_token(t) for t in p["clean_tokens"]],
                      "corrupt_tokens": [visible_token(t) for t in p["corrupt_tokens"]],
                      "exact": p["exact"], "attribution": p["attribution"],
                      "trace": {k: trace[k] for k in ("resid", "mlp", "attn", "window", "p_noised", "p_clean")
                                if k in trace}})
    return {"model": results["model"], "n_layers": results["n_layers"], "n_heads": results["n_heads"],
            "grids": results["grids"], "metric": results["metric"], "pairs": pairs}
