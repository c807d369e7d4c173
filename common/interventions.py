"""One intervention engine: activation patching and ablation are the same thing.

An intervened run is the model on one prompt with some activations overwritten. Each write is an Edit:

    (hook name, index, value):  act[row][index] = value
        act[row]  one batch row's activation at that TransformerLens bridge hook, [seq, ...]
        index     a tuple whose first entry is a position (an int, or slice(None) = every position),
                  e.g. (5,) for the residual at position 5, (slice(None), 3) for head 3's z everywhere
        value     what is written there (it may broadcast: a constant over every position)

Activation patching writes another run's activation there (value = source[name][index]); zero and mean
ablation write a constant (zeros, or the mean over the prompt's positions); ROME's causal tracing writes noisy
embeddings (clean + noise) in every row and restores clean states on top. A batch is a list of rows (a row =
the Edits of one run, applied in order) on one prompt: `run_rows` runs `batch_size` rows per forward pass and
reads them all with one readout from the last position's logits.

Shared prefix: when every row writes only what is already there before position L (a clean and a corrupt
prompt share their first L tokens, so in a causal model their activations there are the same), those L
positions are the same in every row. They run once, into a KV cache, and each batch runs positions L.. only,
with the cache repeated over its rows. `run_rows` checks the claim against the base run before relying on it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import hooks
from .attribution import metric_from_logits
from .progress import progress

Edit = tuple  # (hook name, index into one batch row's activation, value written there)
Row = list  # [Edit, ...]: one intervened run, its edits applied in order
Readout = Callable[[torch.Tensor, torch.Tensor], dict]
"""(final logits [B, vocab], lm_head output before any soft-cap [B, vocab]), at the last position -> {name: [B]}"""

ABLATIONS = ("zero", "mean")


@dataclass
class CachedRun:
    """One forward pass of a prompt (batch 1): its last position's logits and the activations asked for."""
    logits: torch.Tensor  # [vocab]: the model's final logits at the last position (after any soft-cap)
    lm_head: torch.Tensor  # [vocab]: the lm_head output there (before any soft-cap)
    acts: dict = field(default_factory=dict)  # {hook name: activation [seq, ...]}, on the model's device

    def read(self, readout: Readout) -> dict:
        """The readout of this run, as {name: float}."""
        return {key: float(value[0]) for key, value in readout(self.logits[None], self.lm_head[None]).items()}


@dataclass
class BaseRun:
    """The prompt a batch of rows intervenes on, and what every row shares."""
    ids: torch.Tensor  # [1, seq]
    acts: dict = field(default_factory=dict)  # {hook name: [seq, ...]}: this run's activations (with every_row)
    every_row: Row = field(default_factory=list)  # edits applied in every row first (e.g. causal tracing's noise)
    shared_prefix: int = 0  # positions 0..shared_prefix-1 are the same in every row: computed once (see module doc)


# ----------------------------------------------------------------------------- single runs


def _keep_last_position(store: dict, key: str):
    """A hook that stores the activation's last position [B, ...] under `key` (the logits hook's output)."""
    def hook(act, hook):
        store[key] = act[:, -1]
    return hook


def cache_run(model, input_ids: torch.Tensor, hook_names, every_row: Row = ()) -> CachedRun:
    """One forward of `input_ids` [1, seq] with `every_row`'s edits, keeping the activations of `hook_names`
    (as the edits left them) and the last position's logits."""
    store = {}

    def keep(name):
        def hook(act, hook):
            store[name] = act[0].detach().clone()
        return hook

    fwd_hooks = edit_hooks([[]], every_row) + [(name, keep(name)) for name in dict.fromkeys(hook_names)]
    fwd_hooks.append((hooks.LOGITS, _keep_last_position(store, "lm_head")))
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(input_ids.to(model.device), fwd_hooks=fwd_hooks, logits_to_keep=1)
    lm_head = store.pop("lm_head")
    return CachedRun(logits[0, -1], lm_head[0], store)


def reference_run(model, input_ids: torch.Tensor, row: Row, readout: Readout) -> dict:
    """One row the plain way: the whole prompt [1, seq], batch 1, one cloning hook per edit, no shared prefix.

    The independent reference `run_rows` is checked against (it shares no code with `edit_hooks`).
    Returns the readout {name: [1]}.
    """
    store = {}

    def overwrite(index, value):
        def hook(act, hook):
            act = act.clone()
            act[(0, *index)] = value
            return act
        return hook

    fwd_hooks = [(name, overwrite(index, value)) for name, index, value in row]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(input_ids.to(model.device),
                                             fwd_hooks=fwd_hooks + [(hooks.LOGITS, _keep_last_position(store, "l"))])
    return {key: value.cpu() for key, value in readout(logits[:, -1], store["l"]).items()}


# ----------------------------------------------------------------------------- batches of rows


def edit_hooks(rows: list[Row], every_row: Row = ()) -> list[tuple[str, Callable]]:
    """Bridge forward hooks that write, in batch row r, the edits of rows[r] after those of every_row (all rows).

    One hook per hook name; it writes in place (act[r] is a view of batch row r) and returns the activation,
    so the bridge uses it whatever view it handed over.
    """
    writes: dict[str, list[tuple]] = {}
    for name, index, value in every_row:
        writes.setdefault(name, []).append((slice(None), index, value))
    for r, row in enumerate(rows):
        for name, index, value in row:
            writes.setdefault(name, []).append((r, index, value))

    def make(name):
        def hook(act, hook):
            for r, index, value in writes[name]:
                act[(r, *index)] = value.to(act.device, act.dtype)
            return act
        return hook
    return [(name, make(name)) for name in writes]


def unchanged_rows(rows: list[Row], base_acts: dict) -> list[bool]:
    """True for rows whose every edit writes exactly the value the base run already has there.

    Such a run is the base run itself (e.g. clean states before the first differing token patched into the
    corrupt run: a causal model computes them identically in both), so it need not run.
    """
    return [all(torch.equal(value, base_acts[name][index]) for name, index, value in row) for row in rows]


def _after_prefix(edit: Edit, base: BaseRun, seq: int) -> Edit | None:
    """An edit as a forward over positions L.. sees it (L = base.shared_prefix): positions shifted by L; its
    part before L must write what the base run has there (else ValueError), and is dropped."""
    name, (position, *rest), value = edit
    prefix = base.shared_prefix
    if isinstance(position, slice) and position == slice(None):
        same = value.shape[:1] == (seq,) and torch.equal(value[:prefix], base.acts[name][(slice(0, prefix), *rest)])
        shifted = (name, (slice(None), *rest), value[prefix:])
    else:
        same = position >= prefix or torch.equal(value, base.acts[name][(position, *rest)])
        shifted = (name, (position - prefix, *rest), value) if position >= prefix else None
    if not same:
        raise ValueError(f"An edit of {name} at {(position, *rest)} changes a position before {prefix}, "
                         "which the rows were said to share: run without a shared prefix.")
    return shifted


class SharedPrefix:
    """The KV cache of the first L positions of a prompt, handed (repeated over the rows) to each batch."""

    def __init__(self, model, input_ids: torch.Tensor, length: int):
        with torch.no_grad():
            _, self.cache = model.bridge(input_ids[:, :length].to(model.device), return_type="logits_and_cache",
                                         use_cache=True)
        self.length = length

    def for_batch(self, n_rows: int):
        """A copy of the cache for a forward of n_rows rows (each forward extends its cache in place)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n_rows)
        return cache


def _forward_rows(model, base: BaseRun, rows: list[Row], readout: Readout, prefix: SharedPrefix | None) -> dict:
    """One forward pass of the rows (a batch); returns the readout {name: [len(rows)]} on the CPU."""
    ids, store, kwargs = base.ids.to(model.device), {}, {}
    every_row = base.every_row
    if prefix is not None:
        seq = ids.shape[1]
        rows = [[e for e in (_after_prefix(edit, base, seq) for edit in row) if e is not None] for row in rows]
        every_row = [e for e in (_after_prefix(edit, base, seq) for edit in every_row) if e is not None]
        ids, kwargs = ids[:, prefix.length:], {"past_key_values": prefix.for_batch(len(rows))}
    fwd_hooks = edit_hooks(rows, every_row) + [(hooks.LOGITS, _keep_last_position(store, "lm_head"))]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(ids.expand(len(rows), -1), fwd_hooks=fwd_hooks, logits_to_keep=1,
                                             **kwargs)
    return {key: value.cpu() for key, value in readout(logits[:, -1], store["lm_head"]).items()}


def run_rows(model, base: BaseRun, rows: list[Row], readout: Readout, batch_size: int,
             skip_unchanged: bool = True, description: str | None = None) -> dict:
    """Run every row (one intervened run each) on base.ids, batch_size rows per forward pass.

    skip_unchanged: rows that write only what base.acts already holds are not run and get the readout of an
    unedited row (run once, first). base.shared_prefix > 0: positions before it run once (see module doc).
    description: when given and there are more than two batches, a progress bar with this label.
    Returns the readout's entries as tensors [len(rows)], plus "ran" [len(rows)] (bool).
    """
    skip = unchanged_rows(rows, base.acts) if skip_unchanged else [False] * len(rows)
    todo = [i for i, skipped in enumerate(skip) if not skipped]
    runs = ([[]] if any(skip) else []) + [rows[i] for i in todo]  # the unedited row reads the skipped ones
    prefix = SharedPrefix(model, base.ids, base.shared_prefix) if base.shared_prefix and runs else None
    starts = range(0, len(runs), batch_size)
    if description and len(starts) > 2:
        starts = progress(starts, description, unit="batch")
    chunks = [_forward_rows(model, base, runs[start:start + batch_size], readout, prefix) for start in starts]
    out = {}
    for key in (chunks[0] if chunks else {}):
        column = torch.cat([chunk[key] for chunk in chunks])
        full = column[:1].repeat(len(rows)) if any(skip) else torch.empty(len(rows), dtype=column.dtype)
        full[todo] = column[1:] if any(skip) else column
        out[key] = full
    out["ran"] = torch.tensor([not skipped for skipped in skip], dtype=torch.bool)
    return out


# ----------------------------------------------------------------------------- ablations: patches from a constant


def ablation_values(cache, n_layers: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What an ablated head's z and an ablated MLP's output are replaced by, at every position.

    kind: "zero", or "mean" = the clean activation's mean over this prompt's positions.
    Returns (z_values [n_layers, n_heads, head_dim], mlp_values [n_layers, d_model]) in the cache's dtype.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, not {kind!r}")
    z = torch.stack([cache[hooks.block_site("head", layer)][0] for layer in range(n_layers)])  # [L, seq, H, hd]
    mlp = torch.stack([cache[hooks.block_site("mlp", layer)][0] for layer in range(n_layers)])  # [L, seq, d]
    if kind == "zero":
        return torch.zeros_like(z[:, 0]), torch.zeros_like(mlp[:, 0])
    return z.mean(dim=1), mlp.mean(dim=1)


def ablation_masks(n_layers: int, n_heads: int, sets: list[tuple[list, list]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for `run_ablations`, one row per ablated set.

    sets: [(heads [(layer, head), ...], mlps [layer, ...])]; ([], []) is the clean run.
    Returns (head_mask [n_sets, n_layers, n_heads], mlp_mask [n_sets, n_layers]) bool.
    """
    head_mask = torch.zeros(len(sets), n_layers, n_heads, dtype=torch.bool)
    mlp_mask = torch.zeros(len(sets), n_layers, dtype=torch.bool)
    for row, (heads, mlps) in enumerate(sets):
        for layer, head in heads:
            head_mask[row, layer, head] = True
        for layer in mlps:
            mlp_mask[row, layer] = True
    return head_mask, mlp_mask


def ablation_rows(head_mask: torch.Tensor, mlp_mask: torch.Tensor, z_values: torch.Tensor,
                  mlp_values: torch.Tensor) -> list[Row]:
    """One row per ablated set: each masked head's z (hook_z, every position) and each masked MLP's output
    (hook_mlp_out, every position) written with its constant. Masks and values: see `ablation_hooks`."""
    rows = []
    for heads, mlps in zip(head_mask, mlp_mask):
        row = [(hooks.block_site("head", layer), (slice(None), head), z_values[layer, head])
               for layer, head in heads.nonzero().tolist()]
        row += [(hooks.block_site("mlp", layer), (slice(None),), mlp_values[layer])
                for layer in mlps.nonzero()[:, 0].tolist()]
        rows.append(row)
    return rows


def ablation_hooks(head_mask: torch.Tensor, mlp_mask: torch.Tensor, z_values: torch.Tensor,
                   mlp_values: torch.Tensor) -> list[tuple[str, object]]:
    """Bridge forward hooks that ablate, in batch row b, the heads with head_mask[b] and the MLPs with mlp_mask[b].

    head_mask: [batch, n_layers, n_heads] bool; mlp_mask: [batch, n_layers] bool;
    z_values: [n_layers, n_heads, head_dim]; mlp_values: [n_layers, d_model] (see `ablation_values`).
    Returns [(hook name, fn)] for `bridge.run_with_hooks`: the engine's hooks for the rows of `ablation_rows`.
    """
    return edit_hooks(ablation_rows(head_mask, mlp_mask, z_values, mlp_values))


def metric_readout(target_id: int, counter_id: int | None = None) -> Readout:
    """Ablations' readout: "metric" [B] from the lm_head output (before any soft-cap; `metric_from_logits`)
    and "target_prob" [B] from the final logits (after it), both float32."""
    def readout(logits: torch.Tensor, lm_head: torch.Tensor) -> dict:
        return {"metric": metric_from_logits(lm_head.float(), target_id, counter_id),
                "target_prob": torch.softmax(logits.float(), dim=-1)[:, target_id]}
    return readout


def run_ablations(model, input_ids: torch.Tensor, head_mask: torch.Tensor, mlp_mask: torch.Tensor,
                  z_values: torch.Tensor, mlp_values: torch.Tensor, target_id: int, counter_id: int | None = None,
                  batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The metric and the target's probability at the last position, for each ablated set.

    input_ids: [1, seq]; head_mask [n_sets, n_layers, n_heads] and mlp_mask [n_sets, n_layers] bool (a row with
    nothing set is the clean run). Runs `batch_size` sets per forward pass (the prompt repeated, no padding).
    Returns (metric [n_sets], target_prob [n_sets]), float32 on the CPU. The metric is read from the lm_head
    output (before any soft-cap); the probability from the model's final logits (after it).
    """
    rows = ablation_rows(head_mask, mlp_mask, z_values, mlp_values)
    out = run_rows(model, BaseRun(input_ids), rows, metric_readout(target_id, counter_id), batch_size,
                   skip_unchanged=False, description=f"ablations, {len(rows)} sets")
    return out["metric"], out["target_prob"]
