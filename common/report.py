"""Run folders, results.json / config.json / report.md, markdown tables and PNG figures.

Every run writes a new folder `<OUT_DIR>/<model-slug>/<YYYY-MM-DD_HHMMSS>/` (with a suffix when that name
exists). It is written as a hidden temporary folder and renamed at the very end, so an interrupted or
failed run leaves no folder behind, and no run ever overwrites another.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import warnings

import matplotlib

warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # CJK tokens in labels: shown as boxes
matplotlib.use("Agg")  # figures are written to files; no window, works with no screen
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


class RunFolder:
    """A run's folder while it is being written; `path` is temporary until the run succeeds."""

    def __init__(self, path: Path):
        self.path = path
        self.final_path: Path | None = None

    def write_json(self, name: str, data) -> Path:
        path = self.path / name
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False, default=_jsonable))
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def save_figure(self, name: str, fig) -> str:
        """Save a matplotlib figure as PNG in the run folder, close it, return its file name for links."""
        fig.savefig(self.path / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return name


def _jsonable(value):
    """Turn tensors and numpy numbers into plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _free_name(parent: Path, stem: str) -> Path:
    candidate, n = parent / stem, 2
    while candidate.exists():
        candidate, n = parent / f"{stem}_{n}", n + 1
    return candidate


@contextmanager
def new_run_folder(out_dir: str | Path, model_slug: str):
    """Yield a RunFolder; on success rename it to <out_dir>/<model_slug>/<timestamp>, on failure delete it."""
    parent = Path(out_dir).expanduser() / model_slug
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    tmp = parent / f".incomplete-{stamp}-{os.getpid()}"
    tmp.mkdir()
    run = RunFolder(tmp)
    try:
        yield run
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _ in range(100):  # another run may take the same name between the check and the rename
        final = _free_name(parent, stamp)
        try:
            os.rename(tmp, final)  # fails rather than overwrite when `final` appeared meanwhile (non-empty)
            break
        except OSError:
            continue
    run.final_path = run.path = final
    point_latest_at(final)
    print(f"Wrote {display_path(final)}", file=sys.stderr, flush=True)


def point_latest_at(folder: Path):
    """Make `<model folder>/latest` a link to the newest run (relative, so it survives moving the repo)."""
    link = folder.parent / "latest"
    tmp = folder.parent / f".latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name, target_is_directory=True)
        os.replace(tmp, link)  # atomic: a reader never sees a missing link
    except OSError:  # a file system without links: the newest folder is still the last by name
        tmp.unlink(missing_ok=True)


def display_path(path: Path) -> str:
    """`path` relative to the current folder when inside it (shorter to read and to paste), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def finish_run(folder: Path, findings: list[str], failed_checks: list[str] = ()):
    """The last thing a run prints: its folder, the report to open, and what it found in plain words."""
    folder = Path(folder)
    lines = ["", f"Done. Run folder: {display_path(folder)}"]
    for name, what in (("report.html", "to explore in a browser"), ("report.md", "tables, figures and self-checks")):
        if (folder / name).exists():
            lines.append(f"  open {display_path(folder / name)}  ({what})")
    if findings:
        lines += ["What it found:"] + [f"  - {finding}" for finding in findings]
    if failed_checks:
        lines.append(f"WARNING: {len(failed_checks)} self-check(s) failed ({failed_checks[0]}"
                     f"{', ...' if len(failed_checks) > 1 else ''}): read the Self-checks section of report.md "
                     "before trusting these numbers.")
    print("\n".join(lines), flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "transformer-lens", "huggingface-hub", "numpy", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run_config(cfg, model=None, experiment: str = "") -> dict:
    """What config.json records: the toggles, the model, device, dtype, versions, git commit, command."""
    record = {"experiment": experiment, "toggles": cfg.as_dict(), "command": [sys.executable] + sys.argv,
              "git_commit": git_commit(), "versions": library_versions(), "platform": platform.platform(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if model is not None:
        record.update({"model": model.name, "model_source": model.source.kind, "weights": model.folder,
                       "device": model.device, "dtype": str(model.dtype).replace("torch.", ""),
                       "n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads,
                       "d_model": model.d_model, "notes": model.notes})
    return record


# ----------------------------------------------------------------------------- markdown


def fmt(value, decimals: int = 6) -> str:
    """Numbers for tables: floats with 6 decimals (probabilities), ints as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{decimals}f}"
    return str(value)


def md_escape(text: str) -> str:
    """Token text safe inside a markdown table cell (newlines, pipes, spaces shown)."""
    shown = repr(str(text))[1:-1]  # '\n' -> '\\n', keeps leading spaces visible inside backticks
    return "`" + shown.replace("|", "\\|").replace("`", "'") + "`"


VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}  # ␣ ↵ ⇥ ␍


def visible_token(text: str, spaces: bool = True) -> str:
    """Token text with its whitespace shown: ' Paris' -> '␣Paris', '\\n' -> '↵', '' -> '∅'; other control
    characters as escapes. For figure labels and report.html, where a bare space would be invisible.
    spaces=False keeps spaces as they are (for whole prompts, which read better that way)."""
    if text == "":
        return "\u2205"
    return "".join((ch if ch == " " and not spaces else VISIBLE.get(ch))
                   or (repr(ch)[1:-1] if not ch.isprintable() else ch) for ch in str(text))


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def check_lines(checks: list[dict]) -> str:
    """A markdown list of self-checks: PASS/FAIL, the measured value and the tolerance."""
    lines = []
    for check in checks:
        verdict = "PASS" if check["passed"] else "**FAIL**"
        lines.append(f"- {verdict}: {check['name']} (max |difference| {check['max_abs_diff']:.3g}, "
                     f"tolerance {check['tolerance']:.3g})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def heatmap(matrix, row_labels: list[str], col_labels: list[str], title: str, colorbar_label: str = "",
            cell_text: list[list[str]] | None = None, cmap: str = "viridis", vmin=None, vmax=None,
            xlabel: str = "", ylabel: str = ""):
    """A labelled heatmap figure. matrix: [rows, cols]; cell_text (optional): a string per cell, written in
    full and horizontally (the columns widen to the longest; pass visible_token(...) strings)."""
    import numpy as np
    data = np.asarray(matrix, dtype=float)
    rows, cols = data.shape
    column = 0.45 if cell_text is None else max(0.45, 0.062 * max(len(t) for r in cell_text for t in r) + 0.12)
    lines = max(str(r).count("\n") + 1 for r in row_labels) if rows else 1
    fig, ax = plt.subplots(figsize=(min(2 + column * cols, 45), min(1.5 + (0.25 + 0.15 * lines) * rows, 30)))
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=90 if cols > 12 and cell_text is None else 0,
                  fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in row_labels], fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.03 if cell_text is None else 0.015, pad=0.01)
    if cell_text is not None:
        low, high = np.nanmin(data), np.nanmax(data)
        middle = (low + high) / 2
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, cell_text[r][c], ha="center", va="center", fontsize=7,
                        color="black" if data[r, c] > middle else "white")
    return fig


def curves(panels: list[dict], title: str, xlabel: str):
    """Line plots side by side, one per panel.

    panels: [{"ylabel": str, "series": [(label, xs, ys) or (label, xs, ys, (lows, highs)), ...],
              "ylim": (low, high) or None}]; a series with (lows, highs) is drawn with that band shaded.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys, *band in panel["series"]:
            line, = ax.plot(xs, ys, marker=".", label=label)
            if band:  # None where there is no interval (one prompt): nothing drawn there
                lows, highs = ([float("nan") if v is None else v for v in edge] for edge in band[0])
                ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel["ylabel"])
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
