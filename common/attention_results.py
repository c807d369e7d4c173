"""Reading 002's results: its heads ranked by attention on the subject, for 003 to show beside its attribution;
and `interval_text`, how 002's and 003's reports show the interval records of common.stats.

The one place that knows 002's results.json from the outside. The fields read, and nothing else:

    {"layers": [int, ...],                      the blocks 002 looked at (its depth band)
     "depth_range": [float, float],             optional: the band as fractions of the depth
     "prompts": [...],                          optional: only its length is used
     "head_ranking": [{"layer": int, "head": int, "mean": float, "top_rate": float}, ...]}   best first

`mean` is the head's mean attention mass from the last position on the subject's tokens over 002's prompts;
`top_rate` the share of those prompts on which it is among the top heads. A run whose results.json lacks one
of these fields, or has them of another type, is passed over with a note (002's format may move on); so is
a run that cannot be read. Reading never fails: with no usable run, the answer is None and the notes say why.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RankedHead:
    """One head of 002's ranking."""
    rank: int  # 0 = the head that attends most to the subject
    layer: int
    head: int
    mean: float  # mean attention mass on the subject over 002's prompts
    top_rate: float  # share of 002's prompts on which it is among the top heads


@dataclass(frozen=True)
class HeadRanking:
    """002's heads ranked by attention on the subject, as one run folder holds them."""
    folder: Path  # the 002 run folder it was read from
    layers: list[int]  # the blocks 002 covered; heads outside them are not ranked
    depth_range: list | None
    n_prompts: int
    heads: list[RankedHead]  # best first

    def rank_of(self, layer: int, head: int) -> RankedHead | None:
        """The head's entry in the ranking, or None when 002 did not rank it (outside its band)."""
        return next((h for h in self.heads if (h.layer, h.head) == (layer, head)), None)

    def as_record(self, root: Path) -> dict:
        """The results.json record of 003 (`run_002`), the folder written relative to `root` (the repository)."""
        return {"folder": os.path.relpath(self.folder, root), "layers": list(self.layers),
                "depth_range": self.depth_range, "n_prompts": self.n_prompts,
                "ranking": [{"rank": h.rank, "layer": h.layer, "head": h.head, "mean": h.mean, "top_rate": h.top_rate}
                            for h in self.heads]}


def interval_text(record: dict | None, decimals: int = 3, percent: bool = False) -> str:
    """A common.stats record {"value", "ci95", "n"} as report text: "0.412 [0.351, 0.470]" ("-" without a value).

    percent: show the numbers as percentages ("41% [35%, 47%]"), for shares. The interval is left out when the
    record has none (n = 1).
    """
    if not record or record.get("value") is None:
        return "-"
    def number(x):
        return f"{100 * x:.{max(0, decimals - 2)}f}%" if percent else f"{x:.{decimals}f}"
    lo, hi = record["ci95"]
    return number(record["value"]) + ("" if lo is None else f" [{number(lo)}, {number(hi)}]")


def _integer(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")
    return value


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def parse_head_ranking(data, folder: Path) -> HeadRanking:
    """The ranking in one parsed results.json (the schema in the module doc); TypeError/KeyError when it is not."""
    if not isinstance(data, dict) or not isinstance(data["head_ranking"], list) or not isinstance(data["layers"], list):
        raise TypeError("\"head_ranking\" and \"layers\" must be lists")
    heads = [RankedHead(rank, _integer(h["layer"]), _integer(h["head"]), _number(h["mean"]), _number(h["top_rate"]))
             for rank, h in enumerate(data["head_ranking"])]
    prompts = data.get("prompts", [])
    return HeadRanking(folder=folder, layers=[_integer(layer) for layer in data["layers"]],
                       depth_range=data.get("depth_range"), n_prompts=len(prompts) if isinstance(prompts, list) else 0,
                       heads=heads)


def read_head_ranking(results_dir: str | Path, model_slug: str) -> tuple[HeadRanking | None, list[str]]:
    """The newest readable 002 run of this model under `results_dir` (002's OUT_DIR), and notes on what was not.

    Looks at results_dir/<model_slug>/<time>/results.json, newest first (not through the `latest` link, whose
    target moves); a run that cannot be read or does not have the fields of the module doc is passed over with
    a note. Returns (None, notes) when no run is usable.
    """
    notes = []
    for path in sorted(Path(results_dir).glob(f"{model_slug}/*/results.json"), reverse=True):
        if path.parent.is_symlink():  # the `latest` link: the run it points at is read under its own name
            continue
        try:
            return parse_head_ranking(json.loads(path.read_text()), path.parent), notes
        except (OSError, ValueError) as exc:
            notes.append(f"002 run {path.parent.name} could not be read ({exc}).")
        except (KeyError, TypeError, AttributeError) as exc:
            notes.append(f"002 run {path.parent.name} was passed over: its results.json is not in the form 003 "
                         f"reads ({type(exc).__name__}: {exc}).")
    return None, notes
