"""Activation patching on the RAW stream: copy activations from one run into another and watch the answer.

Terms used throughout:
  clean run / corrupt run: the same model on two prompts of equal token count that differ in a few tokens
      ("The capital of France is" / "The capital of Italy is") and so have different answers.
  site: where in the model a patch writes, named by its TransformerLens bridge hook (common/hooks.py):
      resid  the residual stream at layer l (lab convention: layer 0 = the embeddings entering block 0,
             layer l = the output of block l - 1; n_layers + 1 layers, as in the logit lens);
      attn   the attention output of block l (`blocks.l.hook_attn_out`);
      mlp    the MLP output of block l (`blocks.l.hook_mlp_out`);
      head   one head's output before the output projection (`blocks.l.attn.hook_z`, [pos, head, d_head]).
  location: (hook name, index) - an index into one batch row's activation, position first.
  cell: a list of locations patched together in one patched run (one cell of a heatmap). With a source
      run it becomes a row of edits for common/interventions.py, the engine that runs them batched.
  grid: the cells of one heatmap, row-major: resid/attn/mlp x position, or head x block (head_all: the
      head at every position; head_final: at the last position only).

The metric is the logit difference of the two answers at the last position, read from the model's own final
logits (after Gemma-2's soft-cap, where there is one), normalized so that 1 = the clean run, 0 = the corrupt.
A pair is studied by `study_pair`, which returns a PairStudy (grids, the link to 001's lens, causal tracing,
self-checks); its `as_record()` is the pair's entry in results.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from . import hooks, lens
from .checks import check, tolerance
from .errors import LabError
from .interventions import BaseRun, CachedRun, Readout, cache_run, reference_run, run_rows, unchanged_rows
from .progress import progress
from .stats import band, interval, paired_difference, proportion, share
from .prompts import Target, encode, read_json_list, target_token, token_strings

PATCH_SITES = ("resid", "attn", "mlp", "head")
GRID_SITES = {"resid": "resid", "attn": "attn", "mlp": "mlp", "head_all": "head", "head_final": "head"}
TRACE_KINDS = ("resid", "mlp", "attn")  # causal tracing restores single states, windows of MLPs, of attention
PAIR_FIELDS = ("clean", "corrupt", "clean_answer", "corrupt_answer")
METRIC = "normalized logit difference (1 = clean run, 0 = corrupt run)"
# Patched runs compute the positions before the first differing token once per batch (a KV cache shared by
# every row); False = every patched run computes the whole prompt (the bench measures what sharing saves).
SHARE_PREFIX = True

Location = tuple  # (hook name, index into one batch row's activation, e.g. (position,) or (slice(None), head))
Cell = list  # [Location, ...], patched together


# ----------------------------------------------------------------------------- cells and grids


def position_cells(hook_names: list[str], n_positions: int) -> list[Cell]:
    """One cell per (row, position), row-major: cell r * n_positions + p patches hook_names[r] at position p."""
    return [[(name, (position,))] for name in hook_names for position in range(n_positions)]


def head_cells(hook_names: list[str], n_heads: int, position: int | None = None) -> list[Cell]:
    """One cell per (block, head), row-major: the head's output at every position (None) or at one position.

    hook_names: the blocks' `attn.hook_z` names, whose activation per batch row is [pos, head, d_head].
    """
    where = slice(None) if position is None else position
    return [[(name, (where, head))] for name in hook_names for head in range(n_heads)]


def trace_window(n_layers: int) -> int:
    """ROME's restoration window (10 layers of GPT-2 XL's 48) scaled to the model's depth, at least 1."""
    return max(1, round(n_layers * 10 / 48))


def window_blocks(block: int, window: int, n_layers: int) -> range:
    """The blocks of a window centred on `block` (ROME: block - window // 2 .. block + window - window // 2)."""
    return range(max(0, block - window // 2), min(n_layers, block - window // 2 + window))


def window_cells(hook_names: list[str], n_positions: int, window: int) -> list[Cell]:
    """One cell per (block, position), row-major, patching `window` consecutive blocks at that position."""
    n = len(hook_names)
    return [[(hook_names[b], (position,)) for b in window_blocks(block, window, n)]
            for block in range(n) for position in range(n_positions)]


def patch_rows(cells: list[Cell], source: dict) -> list[list]:
    """The engine's rows for `cells`: each location written with the source run's activation there.
    source: {hook name: activation [seq, ...]}."""
    return [[(name, index, source[name][index]) for name, index in cell] for cell in cells]


@dataclass
class GridLayout:
    """The cells of one heatmap and its shape: rows are residual layers or blocks, columns positions or heads."""
    name: str  # "resid", "attn", "mlp", "head_all" or "head_final"
    cells: list[Cell]  # row-major: cell r * shape[1] + c
    shape: tuple[int, int]
    hook_names: list[str]  # one per row


def grid_layout(grid: str, n_layers: int, n_heads: int, seq: int) -> GridLayout:
    """The layout of one grid (see the module doc) for a prompt of `seq` tokens."""
    names = hooks.site_names(GRID_SITES[grid], n_layers)
    if grid == "head_all":
        cells, cols = head_cells(names, n_heads), n_heads
    elif grid == "head_final":
        cells, cols = head_cells(names, n_heads, position=seq - 1), n_heads
    else:
        cells, cols = position_cells(names, seq), seq
    return GridLayout(grid, cells, (len(names), cols), names)


def grids_for_sites(sites: list[str]) -> list[str]:
    """The grids that patch the given sites, in the lab's order."""
    return [grid for grid, site in GRID_SITES.items() if site in sites]


# ----------------------------------------------------------------------------- pairs


@dataclass
class EncodedPair:
    """A pair's token ids ([1, seq] each, same seq) and answer tokens."""
    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    clean_target: Target
    corrupt_target: Target


def load_pairs(path) -> list[dict]:
    """Read a pairs file: a JSON list of {"clean": str, "corrupt": str, "clean_answer": str,
    "corrupt_answer": str}, every field non-empty text (other keys are kept)."""
    path = Path(path).expanduser()
    pairs = read_json_list(path, "PAIRS_FILE")  # the lab's one reader of JSON lists, with its error sentences
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) and pair[k].strip()
                                                 for k in PAIR_FIELDS):
            raise LabError(f"PAIRS_FILE '{path}' entry {i} must be an object with non-empty text fields "
                           f"{', '.join(repr(k) for k in PAIR_FIELDS)}.")
    return pairs


def encode_pair(model, pair: dict, label: str) -> EncodedPair:
    """Tokens and answer tokens of one pair, refusing pairs that cannot be patched position by position."""
    clean_ids, corrupt_ids = encode(model, pair["clean"]), encode(model, pair["corrupt"])
    if clean_ids.shape[1] != corrupt_ids.shape[1]:
        raise LabError(f"{label}: the clean and corrupt prompts must have the same number of tokens, but clean "
                       f"has {clean_ids.shape[1]} {token_strings(model.tokenizer, clean_ids[0])} and corrupt has "
                       f"{corrupt_ids.shape[1]} {token_strings(model.tokenizer, corrupt_ids[0])}: reword one.")
    if torch.equal(clean_ids, corrupt_ids):
        raise LabError(f"{label}: the clean and corrupt prompts are the same tokens: change a word of the corrupt one.")
    clean_target = target_token(model.tokenizer, pair["clean"], pair["clean_answer"])
    corrupt_target = target_token(model.tokenizer, pair["corrupt"], pair["corrupt_answer"])
    if clean_target.token_id == corrupt_target.token_id:
        raise LabError(f"{label}: both answers start with the token {clean_target.token!r}, so their logit "
                       "difference is always 0: pick answers whose first tokens differ.")
    return EncodedPair(clean_ids, corrupt_ids, clean_target, corrupt_target)


def differing_positions(clean_ids: torch.Tensor, corrupt_ids: torch.Tensor) -> list[int]:
    """Positions where two prompts of equal length have different tokens. ids: [1, seq] each."""
    return torch.nonzero(clean_ids[0] != corrupt_ids[0]).flatten().tolist()


def logit_tolerance(dtype, logits: torch.Tensor) -> float:
    """How far two logits that should be equal may differ: float32 rounding, or half precision's ~3 digits,
    relative to the logits' scale (logits: any shape), by common.checks' rule."""
    return tolerance(dtype, logits, 1e-4 * max(1.0, float(logits.float().abs().max())))


def normalize(values: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
    """(values - corrupt) / (clean - corrupt): 1 = the clean run's metric, 0 = the corrupt run's."""
    return (values - corrupt) / (clean - corrupt)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is widened; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def answer_readout(clean_id: int, corrupt_id: int) -> Readout:
    """What a patched run is scored by, from the final logits [B, vocab] at the last position:

    logit_diff [B]: logit(clean answer) - logit(corrupt answer);
    p_clean [B]: probability of the clean answer (ROME's causal-tracing metric);
    clean_is_top1 [B]: 1.0 where the clean answer is the top-1 token (ties count for it), else 0.0.
    """
    def readout(logits: torch.Tensor, lm_head: torch.Tensor | None = None) -> dict:
        logits = _wide(logits)
        clean = logits[:, clean_id]
        return {"logit_diff": clean - logits[:, corrupt_id],
                "p_clean": torch.softmax(logits, dim=-1)[:, clean_id],
                "clean_is_top1": (logits.max(dim=-1).values <= clean).float()}
    return readout


@dataclass
class PairBaseline:
    """A pair's two unpatched runs (clean and corrupt, with every activation a patch may copy): what every
    patched run of the pair starts from and is compared with."""
    pair: EncodedPair
    clean: CachedRun
    corrupt: CachedRun
    readout: Readout
    logit_tolerance: float  # how far two logits that should be equal may differ (`logit_tolerance`)

    @cached_property
    def logit_diff_clean(self) -> float:
        return self.clean.read(self.readout)["logit_diff"]

    @cached_property
    def logit_diff_corrupt(self) -> float:
        return self.corrupt.read(self.readout)["logit_diff"]

    @property
    def tolerance(self) -> float:
        """`logit_tolerance` in normalized units."""
        return self.logit_tolerance / abs(self.logit_diff_clean - self.logit_diff_corrupt)

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return normalize(values, self.logit_diff_clean, self.logit_diff_corrupt)

    def base(self, which: str) -> BaseRun:
        """The clean or the corrupt run as the base of a batch: both share the tokens before the first
        difference, which the engine then runs once (a KV cache) for every batch."""
        ids, run = (self.pair.clean_ids, self.clean) if which == "clean" else (self.pair.corrupt_ids, self.corrupt)
        first_difference = differing_positions(self.pair.clean_ids, self.pair.corrupt_ids)[0]
        return BaseRun(ids, run.acts, shared_prefix=first_difference if SHARE_PREFIX else 0)


def pair_baseline(model, pair: EncodedPair, hook_names: list[str], label: str) -> PairBaseline:
    """Run the clean and the corrupt prompt once each, keeping the activations of `hook_names`."""
    readout = answer_readout(pair.clean_target.token_id, pair.corrupt_target.token_id)
    clean, corrupt = cache_run(model, pair.clean_ids, hook_names), cache_run(model, pair.corrupt_ids, hook_names)
    baseline = PairBaseline(pair, clean, corrupt, readout, logit_tolerance(model.dtype, clean.logits))
    if abs(baseline.logit_diff_clean - baseline.logit_diff_corrupt) <= baseline.logit_tolerance:
        raise LabError(f"{label}: the logit difference of the answers is the same in both runs "
                       f"({baseline.logit_diff_clean:.4f}), so there is nothing to restore: pick a pair the model "
                       "answers differently.")
    return baseline


# ----------------------------------------------------------------------------- exact and attribution patching


@dataclass
class PatchingGrid:
    """One heatmap of a pair, exact and estimated: rows are residual layers or blocks, columns positions or heads."""
    layout: GridLayout
    changed: torch.Tensor  # [n_cells] bool: cells that write something new (the others are exactly 0)
    row_labels: list[str]  # "0".."n" (layers) or "0".."n-1" (blocks)
    col_labels: list[str]  # "p: clean / corrupt token" per position, or "0".."n_heads-1"
    exact: torch.Tensor | None = None  # [rows, cols] float64 normalized logit diff; nan = not run (EXACT="top")
    exact_cells: list[int] = field(default_factory=list)  # flat indices of the cells run exactly
    attribution: torch.Tensor | None = None  # [rows, cols] float64: attribution patching's estimate

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def row_axis(self) -> str:
        return "layer" if self.name == "resid" else "block"

    @property
    def col_axis(self) -> str:
        return "head" if self.name.startswith("head") else "position: clean / corrupt token"

    def correlation(self) -> float | None:
        """Pearson r of exact vs attribution over the changed cells that ran exactly (None: not both, or < 3)."""
        if self.exact is None or self.attribution is None:
            return None
        return pearson(self.exact.flatten()[self.changed], self.attribution.flatten()[self.changed])


def grid_record(values: torch.Tensor) -> list[list[float | None]]:
    """A grid [rows, cols] as results.json holds it: nested lists, None for cells not run."""
    return [[None if v != v else v for v in row] for row in values.tolist()]


def new_grid(layout: GridLayout, baseline: PairBaseline, tokens: tuple[list[str], list[str]]) -> PatchingGrid:
    """An empty grid of a pair, with the cells that write something new and the axis labels."""
    rows = patch_rows(layout.cells, baseline.clean.acts)
    changed = ~torch.tensor(unchanged_rows(rows, baseline.corrupt.acts), dtype=torch.bool)
    n_rows, n_cols = layout.shape
    cols = [str(head) for head in range(n_cols)] if layout.name.startswith("head") else position_labels(*tokens)
    return PatchingGrid(layout, changed, [str(row) for row in range(n_rows)], cols)


def position_labels(clean_tokens: list[str], corrupt_tokens: list[str]) -> list[str]:
    """One label per position: "p: token", or "p: clean / corrupt" where the tokens differ."""
    return [f"{p}: {c}" + (f" / {k}" if c != k else "") for p, (c, k) in enumerate(zip(clean_tokens, corrupt_tokens))]


def attribution_products(model, corrupt_ids: torch.Tensor, hook_names: list[str], clean_acts: dict,
                         metric) -> tuple[dict, float]:
    """Attribution patching (the first-order Taylor estimate of every patch at once).

    One forward of the corrupt prompt with gradients and one backward of `metric` (final logits [vocab] at
    the last position -> scalar); with a clean forward done before (clean_acts: {name: [seq, ...]}), that is
    the method's two forwards and one backward. Returns ({name: (clean - corrupt) * d metric / d act,
    elementwise, [seq, ...]}, the corrupt run's metric). A cell's estimate is the sum of these products over
    the entries it patches (`attribution_for_cells`).
    """
    acts = {}

    def keep(name):
        def hook(act, hook):
            acts[name] = act
            return act  # returned, so the graph runs through the very tensor we differentiate against
        return hook

    with torch.enable_grad():
        logits = model.bridge.run_with_hooks(corrupt_ids.to(model.device),
                                             fwd_hooks=[(name, keep(name)) for name in hook_names],
                                             logits_to_keep=1)
        value = metric(_wide(logits[0, -1]))
        grads = torch.autograd.grad(value, [acts[name] for name in hook_names])
    products = {name: ((_wide(clean_acts[name]) - _wide(acts[name][0].detach())) * _wide(grad[0])).cpu()
                for name, grad in zip(hook_names, grads)}
    return products, float(value.detach())


def attribution_for_cells(products: dict, cells: list[Cell]) -> torch.Tensor:
    """Estimated metric change of each cell: the sum of its patched entries' products. Returns [len(cells)]."""
    return torch.tensor([sum(float(products[name][index].sum()) for name, index in cell) for cell in cells],
                        dtype=torch.float64)


def attribution_patching(model, baseline: PairBaseline, grids: dict[str, PatchingGrid], hook_names: list[str]) -> dict:
    """Fill every grid's `attribution` (normalized like the exact values); returns the self-check that the
    gradient's corrupt forward is the corrupt run."""
    ids = baseline.pair.clean_target.token_id, baseline.pair.corrupt_target.token_id

    def logit_diff(logits):
        return logits[ids[0]] - logits[ids[1]]
    products, logit_diff_grad_run = attribution_products(model, baseline.pair.corrupt_ids, hook_names,
                                                         baseline.clean.acts, logit_diff)
    gap = baseline.logit_diff_clean - baseline.logit_diff_corrupt
    for grid in grids.values():
        grid.attribution = (attribution_for_cells(products, grid.layout.cells) / gap).reshape(grid.layout.shape)
    return check("attribution's corrupt forward == the corrupt run (logit difference)",
                 abs(logit_diff_grad_run - baseline.logit_diff_corrupt), baseline.logit_tolerance)


def strongest_cells(estimate: torch.Tensor, changed: torch.Tensor, k: int) -> list[int]:
    """The cells exact patching confirms under EXACT="top": the k largest |estimate| among changed cells.

    estimate: [n_cells] attribution-patching estimates; changed: [n_cells] bool (cells that write something
    new: the others are exactly 0 and need no run). Returns flat cell indices in ascending order.
    """
    candidates = torch.nonzero(changed).flatten()
    order = estimate[candidates].abs().argsort(descending=True, stable=True)
    return sorted(candidates[order[:k]].tolist())


def choose_exact_cells(grids: dict[str, PatchingGrid], exact: str, top_k: int) -> None:
    """Which cells of each grid run exactly: all (EXACT="all", and always the resid grid), or the top_k changed
    cells with the largest |attribution| estimate (EXACT="top")."""
    for name, grid in grids.items():
        n_cells = len(grid.layout.cells)
        grid.exact_cells = list(range(n_cells)) if exact == "all" or name == "resid" else \
            strongest_cells(grid.attribution.flatten(), grid.changed, top_k)


def exact_patching(model, baseline: PairBaseline, grids: dict[str, PatchingGrid], batch_size: int) -> tuple[list, dict]:
    """Patch each grid's chosen cells clean into corrupt, batched (one engine call for all grids); fill
    `exact`. Cells that would write what is already there are not run (they get the corrupt run's value, 0).

    Returns (the rows run, the engine's output {"logit_diff", "clean_is_top1", ...: [n_rows]}).
    """
    rows = [row for grid in grids.values()
            for row in patch_rows([grid.layout.cells[i] for i in grid.exact_cells], baseline.clean.acts)]
    out = run_rows(model, baseline.base("corrupt"), rows, baseline.readout, batch_size,
                   description=f"exact patching, {len(rows)} cells")
    start = 0
    for grid in grids.values():
        count = len(grid.exact_cells)
        full = torch.full((len(grid.layout.cells),), float("nan"), dtype=torch.float64)
        full[grid.exact_cells] = baseline.normalize(out["logit_diff"][start:start + count]).double()
        grid.exact = full.reshape(grid.layout.shape)
        start += count
    return rows, out


def final_position_top1(model, baseline: PairBaseline, grids: dict[str, PatchingGrid], exact_out: dict | None,
                        batch_size: int) -> list[float]:
    """Per residual layer: 1.0 where patching the clean residual at the last position alone into the corrupt
    run makes the clean answer top-1. Read from the exact resid grid when it ran (its rows come first, every
    cell), else patched here."""
    seq, n = baseline.pair.clean_ids.shape[1], model.n_layers
    if exact_out is not None and "resid" in grids:
        return exact_out["clean_is_top1"][:(n + 1) * seq].reshape(n + 1, seq)[:, -1].tolist()
    cells = [[(name, (seq - 1,))] for name in hooks.site_names("resid", n)]
    out = run_rows(model, baseline.base("corrupt"), patch_rows(cells, baseline.clean.acts), baseline.readout,
                   batch_size)
    return out["clean_is_top1"].tolist()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two equal-length vectors over the entries where both are finite (None when
    fewer than 3 values or one is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    finite = a.isfinite() & b.isfinite()
    a, b = a[finite], b[finite]
    if a.numel() < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# ----------------------------------------------------------------------------- self-checks of the engine


def identity_checks(model, baseline: PairBaseline, batch_size: int) -> list[dict]:
    """Patching against the separate clean and corrupt runs: 0 when it writes nothing, 1 when it writes the
    whole clean residual, 1 clean into clean and 0 corrupt into corrupt (every layer's last position)."""
    n, seq = model.n_layers, baseline.pair.clean_ids.shape[1]
    resid = hooks.site_names("resid", n)
    whole = [[], [(resid[-1], (slice(None),))], [(resid[0], (slice(None),))]]
    final = [[(name, (seq - 1,))] for name in resid]
    clean, corrupt = baseline.clean.acts, baseline.corrupt.acts

    def patched(which, cells, source):
        rows = patch_rows(cells, source)
        out = run_rows(model, baseline.base(which), rows, baseline.readout, batch_size, skip_unchanged=False)
        return baseline.normalize(out["logit_diff"])
    into_corrupt = patched("corrupt", whole, clean)
    clean_into_clean, corrupt_into_corrupt = patched("clean", final, clean), patched("corrupt", final, corrupt)
    tol = baseline.tolerance
    return [check("corrupt run in a batch, nothing patched == 0 (the separate corrupt run)",
                  abs(float(into_corrupt[0])), tol),
            check("whole residual at the last layer, all positions == 1 (the separate clean run)",
                  abs(float(into_corrupt[1]) - 1), tol),
            check("whole residual at layer 0 (embeddings), all positions == 1", abs(float(into_corrupt[2]) - 1), tol),
            check("clean into clean (final-position residual, every layer) == 1",
                  float((clean_into_clean - 1).abs().max()), tol),
            check("corrupt into corrupt (final-position residual, every layer) == 0",
                  float(corrupt_into_corrupt.abs().max()), tol)]


def loop_check(model, baseline: PairBaseline, rows: list, batched: dict, n_checks: int, seed: int) -> dict:
    """Re-run a few seeded exact cells the plain way (whole prompt, batch 1, own hooks, no shared prefix):
    the batched, prefix-cached engine must give the same value."""
    ran = torch.nonzero(batched["ran"]).flatten()
    picks = ran[torch.randperm(len(ran), generator=torch.Generator().manual_seed(seed))[:n_checks]].tolist()
    diff = 0.0
    for i in picks:
        alone = reference_run(model, baseline.pair.corrupt_ids, rows[i], baseline.readout)["logit_diff"]
        batched_value = baseline.normalize(batched["logit_diff"][i:i + 1])
        diff = max(diff, abs(float(baseline.normalize(alone)[0] - batched_value[0])))
    return check(f"batched == one plain forward per cell ({len(picks)} cells re-run alone, whole prompt)",
                 diff, baseline.tolerance)


# ----------------------------------------------------------------------------- causal tracing (ROME)


def embedding_std(model, prompts_ids: list[torch.Tensor]) -> float:
    """Standard deviation of the layer-0 residual (token embeddings after any embedding scaling), over every
    entry of every token of the given prompts: ROME's noise unit, measured on the run's own text."""
    name = hooks.resid(0)
    values = [cache_run(model, ids, [name]).acts[name].float().flatten() for ids in prompts_ids]
    return float(torch.cat(values).std())


def gaussian_noise(n_samples: int, n_positions: int, d_model: int, scale: float, seed: int) -> torch.Tensor:
    """Seeded Gaussian noise [n_samples, n_positions, d_model] with standard deviation `scale` (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, n_positions, d_model, generator=generator) * scale


def noise_edits(clean_embeddings: torch.Tensor, positions: list[int], noise: torch.Tensor) -> list:
    """Edits writing the noisy embeddings at `positions`: clean [seq, d_model] + noise [len(positions), d_model]."""
    name = hooks.resid(0)
    return [(name, (p,), clean_embeddings[p] + noise[i].to(clean_embeddings.device, clean_embeddings.dtype))
            for i, p in enumerate(positions)]


def causal_trace(model, clean_ids: torch.Tensor, clean_acts: dict, cells: list[Cell], readout: Readout,
                 noise: torch.Tensor, positions: list[int], batch_size: int) -> dict:
    """ROME's causal tracing: noise the embeddings at `positions`, restore single clean states or windows.

    clean_acts: the clean run's activations for every hook the cells name and the embeddings ({name: [seq, ...]}).
    noise: [n_samples, len(positions), d_model]; each sample is one noised run, every cell is restored
    under every sample. Returns {"p_noised": float, "restored": [len(cells)], "restored_logit_diff":
    [len(cells)], "ran": [len(cells)]}: the readout's "p_clean" (and "logit_diff") averaged over the samples,
    without and with each cell's restoration.
    """
    if not positions:
        raise LabError("Causal tracing needs at least one noised position; the clean and corrupt prompts are "
                       "identical, so there is nothing to trace.")
    names = sorted({name for cell in cells for name, _ in cell} | {hooks.resid(0)})
    rows = patch_rows(cells, clean_acts)
    restored, logit_diff, noised = torch.zeros(len(cells)), torch.zeros(len(cells)), []
    ran = torch.zeros(len(cells), dtype=torch.bool)
    for sample in progress(noise, f"causal tracing, {len(cells)} cells", unit="sample"):
        edits = noise_edits(clean_acts[hooks.resid(0)], positions, sample)
        base = cache_run(model, clean_ids, names, edits)  # the noised run
        noised.append(base.read(readout)["p_clean"])
        shared = min(positions) if SHARE_PREFIX else 0  # before the first noised position: the clean run
        result = run_rows(model, BaseRun(clean_ids, base.acts, edits, shared), rows, readout, batch_size)
        restored, logit_diff = restored + result["p_clean"], logit_diff + result["logit_diff"]
        ran |= result["ran"]
    return {"p_noised": sum(noised) / len(noised), "restored": restored / len(noise),
            "restored_logit_diff": logit_diff / len(noise), "ran": ran}


@dataclass
class CausalTrace:
    """ROME's causal tracing of one pair: p(clean answer) with the subject noised and one state restored."""
    subject_positions: list[int]
    embedding_std: float  # the embeddings' standard deviation over the run's prompts (the noise unit)
    noise_level: float  # noise standard deviation in units of embedding_std
    samples: int
    window: int  # blocks restored together in the MLP and attention traces
    p_clean: float
    p_noised: float
    restored: dict  # {"resid": [n_layers + 1, seq], "mlp": [n_layers, seq], "attn": [n_layers, seq]} float32
    check: dict

    def as_record(self) -> dict:
        return {"subject_positions": self.subject_positions, "noise_std": self.embedding_std * self.noise_level,
                "embedding_std": self.embedding_std, "noise_level": self.noise_level, "samples": self.samples,
                "window": self.window, "metric": "p(clean answer)", "p_clean": self.p_clean,
                "p_noised": self.p_noised} | {kind: self.restored[kind].tolist() for kind in TRACE_KINDS}


def trace_pair(model, baseline: PairBaseline, noise_std: float, settings: "StudySettings", seed: int) -> CausalTrace:
    """Causal tracing of one pair: noise on the differing positions (the subject), restore clean states."""
    n, seq = model.n_layers, baseline.pair.clean_ids.shape[1]
    window = trace_window(n)
    kinds = {"resid": position_cells(hooks.site_names("resid", n), seq),
             "mlp": window_cells(hooks.site_names("mlp", n), seq, window),
             "attn": window_cells(hooks.site_names("attn", n), seq, window)}
    restore_all = [[(hooks.resid(0), (slice(None),))]]  # the check: it removes all the noise
    cells = [cell for kind in TRACE_KINDS for cell in kinds[kind]] + restore_all
    names = sorted({name for cell in cells for name, _ in cell})
    missing = [name for name in names if name not in baseline.clean.acts]
    acts = baseline.clean.acts | (cache_run(model, baseline.pair.clean_ids, missing).acts if missing else {})
    subject = differing_positions(baseline.pair.clean_ids, baseline.pair.corrupt_ids)
    noise = gaussian_noise(settings.noise_samples, len(subject), model.d_model, settings.noise_level * noise_std, seed)
    out = causal_trace(model, baseline.pair.clean_ids, acts, cells, baseline.readout, noise, subject,
                       settings.batch_size)
    restored, start = {}, 0
    for kind in TRACE_KINDS:
        rows = len(kinds[kind]) // seq
        restored[kind], start = out["restored"][start:start + rows * seq].reshape(rows, seq), start + rows * seq
    p_clean = baseline.clean.read(baseline.readout)["p_clean"]
    trace_check = check("causal trace: restoring every clean embedding removes the noise (logit diff == the "
                        "clean run's)", abs(float(out["restored_logit_diff"][-1]) - baseline.logit_diff_clean),
                        baseline.logit_tolerance)
    return CausalTrace(subject, noise_std, settings.noise_level, settings.noise_samples, window, p_clean,
                       out["p_noised"], restored, trace_check)


# ----------------------------------------------------------------------------- one pair, start to end


@dataclass
class StudySettings:
    """What `study_pair` does (004's toggles)."""
    method: str  # "exact", "attribution" or "both"
    exact: str  # "top" or "all" (see choose_exact_cells)
    exact_top_k: int
    batch_size: int
    noise_tracing: bool
    noise_samples: int
    noise_level: float
    loop_checks: int = 3  # exact cells re-run the plain way, one forward each


@dataclass
class SwitchLink:
    """Where patching the final position's clean residual switches the answer, vs where 001's lens resolves it."""
    n_layers: int
    switch_layer: int | None
    resolution_layer: int | None
    final_position_clean_is_top1: list[float]  # per residual layer: 1.0 = the patched run answers clean
    lens_target_rank: list[int]  # per layer: 001's NORM lens rank of the clean answer on the clean prompt

    def as_record(self) -> dict:
        def depth(layer):
            return None if layer is None else layer / self.n_layers
        return {"switch_layer": self.switch_layer, "switch_depth": depth(self.switch_layer),
                "resolution_layer": self.resolution_layer, "resolution_depth": depth(self.resolution_layer),
                "final_position_clean_is_top1": self.final_position_clean_is_top1,
                "lens_target_rank": self.lens_target_rank}


def switch_link(model, baseline: PairBaseline, final_top1: list[float]) -> SwitchLink:
    """The switch layer from the final position's residual patches, and 001's NORM-lens resolution layer."""
    sweep = lens.sweep(model, baseline.pair.clean_ids, baseline.pair.clean_target.token_id, use_norm=True)[1.0]
    resolution = lens.resolution_depth(sweep.target_rank, sweep.target_prob, sweep.entropy)["first_top1_layer"]
    return SwitchLink(model.n_layers, lens.first_layer_staying_true([bool(x) for x in final_top1]), resolution,
                      final_top1, sweep.target_rank)


@dataclass
class PairStudy:
    """Everything 004 found about one pair; `as_record()` is its entry in results.json."""
    pair: dict  # the pairs file's entry
    baseline: PairBaseline
    tokens: tuple[list[str], list[str]]  # (clean, corrupt) token strings
    grids: dict[str, PatchingGrid]
    exact_ran: bool  # METHOD ran exact patching
    link: SwitchLink
    trace: CausalTrace | None
    checks: list[dict]

    @property
    def differing_positions(self) -> list[int]:
        return differing_positions(self.baseline.pair.clean_ids, self.baseline.pair.corrupt_ids)

    @property
    def answers(self) -> tuple[Target, Target]:
        """(clean answer, corrupt answer) tokens."""
        return self.baseline.pair.clean_target, self.baseline.pair.corrupt_target

    @property
    def clean_is_top1_in_clean_run(self) -> bool:
        return bool(self.baseline.clean.read(self.baseline.readout)["clean_is_top1"])

    @property
    def clean_is_top1_in_corrupt_run(self) -> bool:
        return bool(self.baseline.corrupt.read(self.baseline.readout)["clean_is_top1"])

    @property
    def can_switch(self) -> bool:
        """The clean run answers clean and the corrupt run does not: only then can a patch switch the answer."""
        return self.clean_is_top1_in_clean_run and not self.clean_is_top1_in_corrupt_run

    def p_clean_answer(self) -> dict:
        return {which: run.read(self.baseline.readout)["p_clean"]
                for which, run in (("clean", self.baseline.clean), ("corrupt", self.baseline.corrupt))}

    def as_record(self) -> dict:
        b, targets = self.baseline, self.answers
        exact = {g: grid for g, grid in self.grids.items() if grid.exact is not None}
        attribution = {g: grid for g, grid in self.grids.items() if grid.attribution is not None}
        record = {key: self.pair[key] for key in PAIR_FIELDS} | {
            "id": self.pair.get("id", ""),
            "clean_answer_token": targets[0].token, "clean_answer_id": targets[0].token_id,
            "corrupt_answer_token": targets[1].token, "corrupt_answer_id": targets[1].token_id,
            "clean_tokens": self.tokens[0], "corrupt_tokens": self.tokens[1],
            "differing_positions": self.differing_positions,
            "logit_diff_clean": b.logit_diff_clean, "logit_diff_corrupt": b.logit_diff_corrupt,
            "p_clean_answer": self.p_clean_answer(),
            "clean_answer_top1_in_clean_run": self.clean_is_top1_in_clean_run,
            "clean_answer_top1_in_corrupt_run": self.clean_is_top1_in_corrupt_run,
            "exact": {g: grid_record(grid.exact) for g, grid in exact.items()},
            "attribution": {g: grid.attribution.tolist() for g, grid in attribution.items()},
            "correlation": {g: grid.correlation() for g, grid in exact.items() if g in attribution},
            "changed_cells": {g: int(grid.changed.sum()) for g, grid in self.grids.items()}}
        if self.exact_ran:
            record["exact_cells"] = {g: {"run": len(grid.exact_cells), "of": len(grid.layout.cells)}
                                     for g, grid in self.grids.items()}
        record["link_to_001"] = self.link.as_record()
        if self.trace is not None:
            record["causal_trace"] = self.trace.as_record()
        return record | {"self_checks": self.checks}


def study_pair(model, pair: dict, encoded: EncodedPair, grid_names: list[str], settings: StudySettings,
               noise_std: float | None, seed: int, label: str) -> PairStudy:
    """Everything about one pair: baselines, attribution and exact patching, the self-checks, the link to
    001's lens, causal tracing."""
    seq = encoded.clean_ids.shape[1]
    layouts = [grid_layout(g, model.n_layers, model.n_heads, seq) for g in grid_names]
    names = sorted({name for layout in layouts for name in layout.hook_names}
                   | set(hooks.site_names("resid", model.n_layers)))
    baseline = pair_baseline(model, encoded, names, label)
    tokens = tuple(token_strings(model.tokenizer, ids[0]) for ids in (encoded.clean_ids, encoded.corrupt_ids))
    grids = {layout.name: new_grid(layout, baseline, tokens) for layout in layouts}
    checks, exact_out = [], None

    if settings.method in ("attribution", "both") or settings.exact == "top":
        checks.append(attribution_patching(model, baseline, grids, names))
    if settings.method in ("exact", "both"):
        choose_exact_cells(grids, settings.exact, settings.exact_top_k)
        rows, exact_out = exact_patching(model, baseline, grids, settings.batch_size)
        checks.append(loop_check(model, baseline, rows, exact_out, settings.loop_checks, seed))
    final_top1 = final_position_top1(model, baseline, grids, exact_out, settings.batch_size)
    checks += identity_checks(model, baseline, settings.batch_size)
    if settings.method == "exact":
        for grid in grids.values():
            grid.attribution = None  # computed only to choose the exact cells
    trace = trace_pair(model, baseline, noise_std, settings, seed) if settings.noise_tracing else None
    if trace is not None:
        checks.append(trace.check)
    return PairStudy(pair, baseline, tokens, grids, settings.method in ("exact", "both"),
                     switch_link(model, baseline, final_top1), trace, checks)


# ----------------------------------------------------------------------------- statistics across pairs

RESTORED = 0.5  # a patch "restores" the clean answer when it moves the normalized logit diff at least half-way
TOP_HEADS = 5  # a pair's strongest heads: the 5 largest |effect| of its final-position head grid


def subject_and_last(study: PairStudy) -> tuple[list[float], list[float]] | None:
    """Exact patching of one residual position per layer: ([n_layers + 1] at the subject's last token (the
    last differing position), [n_layers + 1] at the last position), or None without an exact resid grid."""
    grid = study.grids.get("resid")
    if grid is None or grid.exact is None:
        return None
    subject = study.differing_positions[-1]
    return grid.exact[:, subject].tolist(), grid.exact[:, -1].tolist()


def handoff(subject: list[float], last: list[float]) -> tuple[int | None, int | None]:
    """(the last layer whose subject-position patch restores the answer, the first layer from which the
    last-position patch restores it to the end), each None when there is none (`RESTORED`)."""
    carried = [layer for layer, value in enumerate(subject) if value >= RESTORED]
    return (carried[-1] if carried else None), lens.first_layer_staying_true([v >= RESTORED for v in last])


def strongest_heads(study: PairStudy, k: int = TOP_HEADS) -> list[str] | None:
    """The pair's k heads ("L23H4") of largest |effect| at the final position (head_final, else head_all;
    exact where it ran, else the attribution estimate; cells not run are left out), or None without a grid."""
    grid = study.grids.get("head_final") or study.grids.get("head_all")
    if grid is None:
        return None
    values = (grid.exact if grid.exact is not None else grid.attribution).flatten().double()
    finite = torch.nonzero(values.isfinite()).flatten()
    order = finite[values[finite].abs().argsort(descending=True, stable=True)[:k]].tolist()
    n_heads = grid.layout.shape[1]
    return [f"L{i // n_heads}H{i % n_heads}" for i in order]


def head_frequency(per_pair: list[list[str] | None], seed: int) -> list[dict]:
    """How often each head is among a pair's strongest, over the pairs that have a head grid, most often first:
    [{"head", "share": {"value", "ci95", "n"}}] for every head in at least one pair's list."""
    lists = [heads for heads in per_pair if heads is not None]
    names = sorted({h for heads in lists for h in heads}, key=lambda h: -sum(h in heads for heads in lists))
    return [{"head": h, "share": proportion([h in heads for heads in lists], seed=seed)} for h in names]


def depth(layer: int | None, n_layers: int) -> float | None:
    """A layer as a fraction of the model's depth (None stays None)."""
    return None if layer is None else layer / n_layers


@dataclass
class AcrossPairs:
    """004's statistics over its pairs, each {"value", "ci95", "n"} (common/stats.py); depths are layer /
    n_layers. `switchable` is over every pair, all that follow over the pairs that can switch (`across_pairs`).
    `as_record()` is results.json's "across_pairs"."""
    n_pairs: int
    switchable: dict  # share of pairs that can switch (`PairStudy.can_switch`)
    switch_share: dict  # of the switchable pairs: share with a switch layer
    switch_depth: dict  # of the switchable pairs with a switch: median switch depth
    resolution_depth: dict  # median depth at which 001's lens resolves the clean prompt
    lens_lag: dict  # median over pairs of resolution depth - switch depth (> 0: the lens reads it later)
    subject_until: dict  # median last depth at which the subject's residual restores the answer (>= RESTORED)
    last_from: dict  # median first depth from which the last position's residual restores it
    restoration: dict  # {"subject"|"last": {"value", "lo", "hi"}}: mean exact resid patch per layer with a 95% band
    heads: list  # head_frequency
    correlation: dict  # {grid: median Pearson r of exact vs attribution over pairs}
    by_relation: dict  # {relation: {"n", "switchable", "switch_share", "switch_depth"}}

    def as_record(self) -> dict:
        return dict(self.__dict__) | {"restored_threshold": RESTORED, "top_heads": TOP_HEADS}


def restoration_bands(curves: list[tuple[list, list]], seed: int) -> dict:
    """Mean over pairs of the per-layer subject and last-position curves (`subject_and_last`) with 95% bands."""
    out = {}
    for which, index in (("subject", 0), ("last", 1)):
        value, lo, hi = band([curve[index] for curve in curves], "mean", seed=seed) if curves else ([], [], [])
        out[which] = {"value": list(map(float, value)), "lo": [None if v != v else float(v) for v in lo],
                      "hi": [None if v != v else float(v) for v in hi], "n": len(curves)}
    return out


def switch_statistics(studies: list[PairStudy], seed: int) -> dict:
    """Share of pairs with a switch and their median switch depth, over the pairs that can switch (the clean
    run answers clean, the corrupt run does not: a pair whose corrupt run already answers clean would
    "switch" at layer 0, one whose clean run does not never)."""
    depths = [depth(s.link.switch_layer, s.link.n_layers) for s in studies if s.can_switch]
    return {"switch_share": share(depths, seed=seed), "switch_depth": interval(depths, "median", seed=seed)}


def across_pairs(studies: list[PairStudy], seed: int) -> AcrossPairs:
    """The statistics of `AcrossPairs` (seeded bootstrap intervals): the share that can switch over every studied
    pair; everything else over the pairs that can switch. A pair the model gets wrong (its clean run does not answer
    clean, or its corrupt run already does) has a normalized effect with no meaning: its clean - corrupt logit
    difference can be near 0 or negative, and it would "switch" never or at layer 0."""
    n, valid = studies[0].link.n_layers, [s for s in studies if s.can_switch]
    switch = [depth(s.link.switch_layer, n) for s in valid]
    resolution = [depth(s.link.resolution_layer, n) for s in valid]
    curves = [c for c in map(subject_and_last, valid) if c is not None]
    handoffs = [handoff(*c) for c in curves]
    grids = sorted({g for s in valid for g, grid in s.grids.items() if grid.correlation() is not None})
    relations: dict[str, list[PairStudy]] = {}
    for study in studies:
        relations.setdefault(study.pair.get("relation", "-"), []).append(study)
    return AcrossPairs(
        len(studies), proportion([s.can_switch for s in studies], seed=seed),
        **switch_statistics(studies, seed), resolution_depth=interval(resolution, "median", seed=seed),
        lens_lag=paired_difference(resolution, switch, "median", seed=seed),
        subject_until=interval([depth(h[0], n) for h in handoffs], "median", seed=seed),
        last_from=interval([depth(h[1], n) for h in handoffs], "median", seed=seed),
        restoration=restoration_bands(curves, seed), heads=head_frequency(list(map(strongest_heads, valid)), seed),
        correlation={g: interval([s.grids[g].correlation() for s in valid if g in s.grids], "median", seed=seed)
                     for g in grids},
        by_relation={r: {"n": len(group), "switchable": sum(s.can_switch for s in group)} | switch_statistics(group, seed)
                     for r, group in relations.items()})
