"""Activation patching on the RAW stream: copy activations from one run into another and watch the answer.

Terms used throughout:
  clean run / corrupt run: the same model on two prompts of equal token count that differ in a few tokens
      ("The capital of France is" / "The capital of Italy is") and so have different answers.
  site: where in the model a patch writes, named by its TransformerLens bridge hook:
      resid  the residual stream at layer l (lab convention: layer 0 = the embeddings entering block 0,
             layer l = the output of block l - 1; n_layers + 1 layers, as in the logit lens);
      attn   the attention output of block l (`blocks.l.hook_attn_out`);
      mlp    the MLP output of block l (`blocks.l.hook_mlp_out`);
      head   one head's output before the output projection (`blocks.l.attn.hook_z`, [pos, head, d_head]).
  patch: (hook name, index) - write the source run's activation at `index` of one batch row.
  cell: a list of patches applied together in one patched run (one cell of a heatmap).

Batched: many cells share one forward pass. The base prompt is stacked B times and batch row r gets the
patches of cell r, through one hook per hook name that indexes the batch dimension. The metric is read from
the model's own final logits at the last position (after Gemma-2's soft-cap, where there is one).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import hooks
from .checks import tolerance
from .progress import progress
from .errors import LabError

SITES = ("resid", "attn", "mlp", "head")

Patch = tuple  # (hook name, index into one batch row's activation, e.g. (position,) or (slice(None), head))
Cell = list  # [Patch, ...], applied together

# ----------------------------------------------------------------------------- sites and cells


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


# ----------------------------------------------------------------------------- pairs and positions

PAIR_FIELDS = ("clean", "corrupt", "clean_answer", "corrupt_answer")


def load_pairs(path) -> list[dict]:
    """Read a pairs file: a JSON list of {"clean": str, "corrupt": str, "clean_answer": str,
    "corrupt_answer": str}, every field non-empty text (other keys are kept)."""
    from pathlib import Path

    from .prompts import read_json_list  # the lab's one reader of JSON lists, with its error sentences
    path = Path(path).expanduser()
    pairs = read_json_list(path, "PAIRS_FILE")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) and pair[k].strip()
                                                 for k in PAIR_FIELDS):
            raise LabError(f"PAIRS_FILE '{path}' entry {i} must be an object with non-empty text fields "
                           f"{', '.join(repr(k) for k in PAIR_FIELDS)}.")
    return pairs


def encode_pair(model, pair: dict, label: str) -> dict:
    """Tokens and answer tokens of one pair, refusing pairs that cannot be patched position by position.

    Returns {"clean_ids", "corrupt_ids": [1, seq], "clean_target", "corrupt_target": common.prompts.Target}.
    """
    from .prompts import encode, target_token, token_strings
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
    return {"clean_ids": clean_ids, "corrupt_ids": corrupt_ids, "clean_target": clean_target,
            "corrupt_target": corrupt_target}



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


# ----------------------------------------------------------------------------- reading the answer


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is widened; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

Readout = Callable[[torch.Tensor], dict]


def answer_readout(clean_id: int, corrupt_id: int) -> Readout:
    """What a patched run is scored by, from final logits [B, vocab] at the last position:

    logit_diff [B]: logit(clean answer) - logit(corrupt answer);
    p_clean [B]: probability of the clean answer (ROME's causal-tracing metric);
    clean_is_top1 [B]: 1.0 where the clean answer is the top-1 token (ties count for it), else 0.0.
    """
    def readout(logits: torch.Tensor) -> dict:
        logits = _wide(logits)
        clean = logits[:, clean_id]
        return {"logit_diff": clean - logits[:, corrupt_id],
                "p_clean": torch.softmax(logits, dim=-1)[:, clean_id],
                "clean_is_top1": (logits.max(dim=-1).values <= clean).float()}
    return readout


# ----------------------------------------------------------------------------- runs


def cache_activations(model, input_ids: torch.Tensor, hook_names: list[str],
                      edits: dict | None = None) -> tuple[torch.Tensor, dict]:
    """One forward; returns (final logits at the last position [vocab], {hook name: activation [seq, ...]}).

    edits: {hook name: fn(activation [B, seq, ...]) -> activation} applied during the run (e.g. noise).
    """
    wanted, acts = set(hook_names), {}

    def keep(name):
        def hook(act, hook):
            acts[name] = act[0].detach().clone()
        return hook

    hooks = [(name, _edit_hook(fn)) for name, fn in (edits or {}).items()]
    hooks += [(name, keep(name)) for name in wanted]  # after the edits, so they see the edited value
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(input_ids.to(model.device), fwd_hooks=hooks, logits_to_keep=1)
    return logits[0, -1], acts


def _edit_hook(fn):
    return lambda act, hook: fn(act)


def _cell_hooks(cells: list[Cell], source: dict, edits: dict | None) -> list[tuple]:
    """Hooks that write, for each batch row r, the source activations named by cells[r] (after any edits)."""
    rows_by_name: dict[str, list[tuple[int, tuple]]] = {}
    for row, cell in enumerate(cells):
        for name, index in cell:
            rows_by_name.setdefault(name, []).append((row, index))
    names = list(dict.fromkeys(list(edits or {}) + list(rows_by_name)))

    def make(name):
        edit, rows, src = (edits or {}).get(name), rows_by_name.get(name, []), source.get(name)

        def hook(act, hook):
            if edit is not None:
                act = edit(act)
            for row, index in rows:
                act[row][index] = src[index]  # in place: act[row] is a view of this batch row
            return act  # returned, so the bridge uses it whatever view it handed us
        return hook
    return [(name, make(name)) for name in names]


def unchanged_cells(cells: list[Cell], source: dict, base: dict) -> list[bool]:
    """True for cells whose every patch writes the value the base run already has there (exactly).

    Such a patched run is the base run itself, e.g. clean tokens before the first differing position: a
    causal model computes them identically in both runs, so patching them cannot change anything.
    """
    return [all(torch.equal(source[name][index], base[name][index]) for name, index in cell) for cell in cells]


def patch_batched(model, input_ids: torch.Tensor, cells: list[Cell], source: dict, readout: Readout,
                  batch_size: int, edits: dict | None = None, base: dict | None = None,
                  description: str | None = None) -> dict:
    """Run the model on `input_ids` once per cell with that cell's patches, batch_size cells per forward.

    input_ids: [1, seq], the base prompt. source: {hook name: activation [seq, ...]} to copy from.
    edits: {hook name: fn(activation [B, seq, ...]) -> activation} applied to every row before the patches.
    base: the base run's activations ({hook name: [seq, ...]}, with the same edits); when given, cells
        that would write what is already there are not run and get the base run's readout.
    description: when given, a progress bar with this label counts the patched runs.
    Returns the readout's entries as tensors [len(cells)], plus "ran" [len(cells)] (bool).
    """
    skip = unchanged_cells(cells, source, base) if base is not None else [False] * len(cells)
    todo = [i for i, s in enumerate(skip) if not s]
    runs = [[]] if any(skip) else []  # one unpatched row gives the readout of the skipped cells
    runs += [cells[i] for i in todo]
    ids = input_ids.to(model.device)
    chunks = []
    starts = range(0, len(runs), batch_size)
    with torch.no_grad():
        for start in progress(starts, description, unit="batch") if description else starts:
            chunk = runs[start:start + batch_size]
            logits = model.bridge.run_with_hooks(ids.expand(len(chunk), -1),
                                                 fwd_hooks=_cell_hooks(chunk, source, edits), logits_to_keep=1)
            chunks.append({k: v.cpu() for k, v in readout(logits[:, -1]).items()})
    values = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    out = {}
    for key, column in values.items():
        full = column[:1].repeat(len(cells)) if any(skip) else torch.empty(len(cells), dtype=column.dtype)
        full[todo] = column[1:] if any(skip) else column
        out[key] = full
    out["ran"] = torch.tensor([not s for s in skip])
    return out


# ----------------------------------------------------------------------------- attribution patching


def attribution_products(model, corrupt_ids: torch.Tensor, hook_names: list[str], clean_acts: dict,
                         metric: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict, float]:
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


def strongest_cells(estimate: torch.Tensor, changed: torch.Tensor, k: int) -> list[int]:
    """The cells exact patching confirms under EXACT="top": the k largest |estimate| among changed cells.

    estimate: [n_cells] attribution-patching estimates; changed: [n_cells] bool (cells that write something
    new: the others are exactly 0 and need no run). Returns flat cell indices in ascending order.
    """
    candidates = torch.nonzero(changed).flatten()
    order = estimate[candidates].abs().argsort(descending=True, stable=True)
    return sorted(candidates[order[:k]].tolist())


def fill_grid(values: torch.Tensor, cells: list[int], shape: tuple[int, int]) -> list[list[float | None]]:
    """A [rows][cols] grid holding `values` [len(cells)] at the flat `cells`, and None (not run) elsewhere."""
    full = torch.full((shape[0] * shape[1],), float("nan"), dtype=torch.float64)
    full[cells] = values.double()
    return [[None if v != v else v for v in row] for row in full.reshape(shape).tolist()]


def grid_values(grid: list[list[float | None]]) -> torch.Tensor:
    """A results.json grid as a float64 tensor [rows, cols], with nan for the cells that were not run."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in grid], dtype=torch.float64)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two equal-length vectors over the entries where both are finite (None when
    fewer than 3 values or one is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    finite = a.isfinite() & b.isfinite()
    a, b = a[finite], b[finite]
    if a.numel() < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# ----------------------------------------------------------------------------- causal tracing (ROME)


def embedding_std(model, prompts_ids: list[torch.Tensor]) -> float:
    """Standard deviation of the layer-0 residual (token embeddings after any embedding scaling), over every
    entry of every token of the given prompts: ROME's noise unit, measured on the run's own text."""
    name = hooks.resid(0)
    values = [cache_activations(model, ids, [name])[1][name].float().flatten() for ids in prompts_ids]
    return float(torch.cat(values).std())


def gaussian_noise(n_samples: int, n_positions: int, d_model: int, scale: float, seed: int) -> torch.Tensor:
    """Seeded Gaussian noise [n_samples, n_positions, d_model] with standard deviation `scale` (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, n_positions, d_model, generator=generator) * scale


def add_noise_edit(positions: list[int], noise: torch.Tensor):
    """An edit (for `patch_batched`) adding noise [len(positions), d_model] at `positions` of every batch row."""
    def edit(act):
        act = act.clone()
        act[:, positions] += noise.to(act.device, act.dtype)
        return act
    return edit


def causal_trace(model, clean_ids: torch.Tensor, clean_acts: dict, cells: list[Cell], readout: Readout,
                 noise: torch.Tensor, positions: list[int], batch_size: int) -> dict:
    """ROME's causal tracing: noise the embeddings at `positions`, restore single clean states or windows.

    clean_acts: the clean run's activations for every hook the cells name ({name: [seq, ...]}).
    noise: [n_samples, len(positions), d_model]; each sample is one noised run, every cell is restored
    under every sample. Returns {"p_noised": float, "restored": [len(cells)], "ran": [len(cells)]}:
    the readout's "p_clean" averaged over the samples, without and with each cell's restoration.
    """
    if not positions:
        raise LabError("Causal tracing needs at least one noised position; the clean and corrupt prompts are "
                       "identical, so there is nothing to trace.")
    embed = hooks.resid(0)
    names = sorted({name for cell in cells for name, _ in cell} | {embed})
    restored, noised = torch.zeros(len(cells)), []
    ran = torch.zeros(len(cells), dtype=torch.bool)
    for sample in progress(noise, f"causal tracing, {len(cells)} cells", unit="sample"):
        edits = {embed: add_noise_edit(positions, sample)}
        logits, base = cache_activations(model, clean_ids, names, edits)
        noised.append(float(readout(logits[None])["p_clean"][0]))
        result = patch_batched(model, clean_ids, cells, clean_acts, readout, batch_size, edits, base)
        restored += result["p_clean"]
        ran |= result["ran"]
    return {"p_noised": sum(noised) / len(noised), "restored": restored / len(noise), "ran": ran}
