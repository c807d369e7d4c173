"""The logit lens: read every layer's residual stream through the unembedding.

Layer index (contract): 0 = the residual entering block 0 (embeddings, after any embedding scaling);
layer i = the residual after block i, for i = 1..n_layers. A sweep has n_layers + 1 entries.

NORM lens: the model's final norm, then the unembedding. RAW lens: the unembedding alone.
Gemma-2's final logit soft-cap (cap * tanh(x / cap)) is part of the unembedding in both.
The NORM lens at the last layer is exactly the model's own output: `check_lens_matches_logits`.
`sweep` reads one prompt into a `LensTrajectory` per temperature (per-layer statistics, typed), each with
the sweep's self-checks, every one against something computed another way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .checks import check, tolerance
from .progress import progress


@torch.no_grad()
def residual_stream(model, input_ids: torch.Tensor, all_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once and keep the residual stream of every layer at the last position.

    model: a LoadedModel. input_ids: [1, seq].
    Returns (resid [n_layers + 1, d_model], logits [vocab]) at the last position, in the model's dtype;
    with all_positions, every position: (resid [n_layers + 1, seq, d_model], logits [seq, vocab]).
    Read from HF's own `output_hidden_states` rather than bridge hooks: the same numbers (tested), and
    no hook points to run. HF's last hidden state already has the final norm applied, so the residual
    entering the final norm is caught with a forward pre-hook.
    """
    captured = {}
    handle = model.final_norm.register_forward_pre_hook(lambda module, args: captured.update(resid=args[0]))
    try:
        out = model.hf_model(input_ids.to(model.device), output_hidden_states=True,
                             logits_to_keep=0 if all_positions else 1)
    finally:
        handle.remove()
    layers = list(out.hidden_states[: model.n_layers]) + [captured["resid"]]
    if all_positions:
        return torch.stack([h[0] for h in layers]), out.logits[0]
    return torch.stack([h[0, -1] for h in layers]), out.logits[0, -1]


def unembed(model, resid: torch.Tensor, use_norm: bool, grad: bool = False) -> torch.Tensor:
    """Logits that the model would give if `resid` were its last residual stream.

    resid: [..., d_model] -> logits [..., vocab], float32.
    use_norm: apply the model's final norm first (NORM lens) or not (RAW lens).
    grad: let gradients flow back to `resid` (the tuned lens trains through this; common/tuned_lens.py).
    """
    with torch.set_grad_enabled(grad):
        x = resid.to(model.device, model.dtype)
        if use_norm:
            x = model.final_norm(x)
        logits = model.unembedding(x).float()
        if model.softcap:  # Gemma-2 caps its logits after the lm_head (bridge.unembed leaves this out)
            logits = model.softcap * torch.tanh(logits / model.softcap)
    return logits


def lens_metrics(logits: torch.Tensor, target_id: int, top_k: int = 5, temperature: float = 1.0) -> dict:
    """Per-layer statistics of lens logits, computed for all layers at once.

    logits: [layers, vocab]; the last row is the final layer, the reference for KL.
    Returns a dict of tensors:
      probs_top [layers, k], ids_top [layers, k]: the top-k tokens and their probabilities;
      target_prob [layers]; target_rank [layers] (0 = top-1; ties count in the target's favour);
      entropy [layers] in nats; kl_to_final [layers] = KL(final || layer) in nats.
    The KL is clamped at 0 and its last entry set to 0 (the final layer against itself): `check_kl_to_final`
    recomputes it another way, so neither can hide a wrong number.
    """
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)  # [layers, vocab]; finite for finite logits
    p = logp.exp()  # may underflow to 0, and 0 * finite log p = 0, so no NaN below
    top = torch.topk(p, top_k, dim=-1)
    target_logit = logits[:, target_id : target_id + 1]  # [layers, 1]
    final_p, final_logp = p[-1], logp[-1]  # [vocab]
    # KL(final || layer) = sum_v p_f (log p_f - log p_layer), as two matrix-vector products (fast); rounding can
    # take a layer that matches the final one a hair below 0, hence the clamp.
    kl = (final_p @ final_logp - logp @ final_p).clamp_min(0.0)
    kl[-1] = 0.0
    return {
        "probs_top": top.values,
        "ids_top": top.indices,
        "target_prob": p[:, target_id],
        "target_rank": (logits > target_logit).sum(dim=-1),
        "entropy": -(p * logp).sum(dim=-1),
        "kl_to_final": kl,
    }


def kl_divergence(final_logits: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) in nats with torch's own kl_div, not clamped. [..., vocab] each (broadcast) -> [...]."""
    final_logp = torch.log_softmax(final_logits.float(), dim=-1)
    lens_logp = torch.log_softmax(lens_logits.float(), dim=-1)
    final_logp = final_logp.expand_as(lens_logp)
    return torch.nn.functional.kl_div(lens_logp, final_logp, log_target=True, reduction="none").sum(dim=-1)


def key_layers(n_layers: int) -> list[int]:
    """The lab's sampled layers: 0, n/6, n/3, n/2, 2n/3, 5n/6 and the last (n), without repeats."""
    picks = [0, n_layers // 6, n_layers // 3, n_layers // 2, 2 * n_layers // 3, 5 * n_layers // 6, n_layers]
    return sorted(set(picks))


# ----------------------------------------------------------------------------- self-checks of a sweep


def check_lens_matches_logits(model, resid_last: torch.Tensor, model_logits: torch.Tensor,
                              norm_lens_last: torch.Tensor | None = None) -> dict:
    """The lens invariant: the NORM lens of the last layer must reproduce the model's own logits.

    resid_last: [d_model]; model_logits: [vocab]. norm_lens_last: [vocab], the NORM lens's last row when the
    sweep already computed it (then the reported row itself is checked, and the unembedding, a memory-bound
    read of the whole [vocab, d_model] matrix for one row, is not repeated); None = unembed resid_last here.
    Tolerance: 1e-4 in float32, common.checks' share of the logits' scale in half precision.
    """
    lens = unembed(model, resid_last, use_norm=True) if norm_lens_last is None else norm_lens_last.float()
    diff = (lens - model_logits.float()).abs().max().item()
    return check("NORM lens at the last layer == model logits", diff, tolerance(model.dtype, model_logits, 1e-4))


def check_kl_to_final(label: str, lens_logits: torch.Tensor, final_logits: torch.Tensor | None,
                      reported_kl: torch.Tensor, dtype) -> dict:
    """The reported KL(final || layer) (lens_metrics: matrix products, clamped, last entry set to 0) against
    torch's kl_div, unclamped: a wrong reference row, a wrong sign or formula shows here.

    lens_logits: [layers, vocab]; reported_kl: [layers]. final_logits: [vocab], the model's own output where the
    lens's last layer should be it (NORM and tuned lens); None = the lens's last layer (RAW lens: without the
    final norm it is not the model's output). The difference is relative, |reported - kl_div| / max(1, kl_div):
    both sum over the whole vocabulary in float32 whatever the model's dtype, and the reported one loses digits
    (measured over 001's default prompts against float64: at most 1.0e-4 on SmolLM2, 1.1e-3 on Gemma-3's 262k
    tokens), so 5e-3 is allowed in float32, common.checks' share in half precision (where the model's logits
    also differ from the lens's a little).
    """
    final_name = "the model's own logits" if final_logits is not None else "its own last layer"
    recomputed = kl_divergence(lens_logits[-1] if final_logits is None else final_logits, lens_logits)  # [layers]
    relative = ((recomputed - reported_kl.float()).abs() / recomputed.abs().clamp_min(1.0)).max().item()
    return check(f"{label}: KL(final || layer) == torch's kl_div against {final_name}, every layer (difference "
                 "relative to max(1, KL))", relative, tolerance(dtype, 1.0, 5e-3))


def check_ranks_under_temperature(label: str, lens_logits: torch.Tensor, target_id: int,
                                  ranks_by_temperature: dict[float, torch.Tensor]) -> dict:
    """Dividing logits by T > 0 keeps their order, so the target's rank read from each tempered distribution
    (lens_metrics at T) must equal the rank counted here: the whole row divided by T, then the logits above the
    target's counted. A temperature applied to anything but the whole row, or a rank read wrong, shows here.
    (The count is made on the divided row, not the raw one, because float32 division can round two logits one
    ulp apart to the same value: measured on 1 of 478 of 001's prompts on SmolLM2, a rank change of 1.)
    lens_logits: [layers, vocab]; each ranks tensor: [layers]."""
    worst = 0
    for temperature, ranks in ranks_by_temperature.items():
        tempered = lens_logits.float() if temperature == 1.0 else lens_logits.float() / temperature
        reference = torch.count_nonzero(tempered > tempered[:, target_id : target_id + 1], dim=-1)  # [layers]
        worst = max(worst, (ranks.cpu() - reference.cpu()).abs().max().item())
    temperatures = ", ".join(f"{t:g}" for t in ranks_by_temperature)
    return check(f"{label}: target rank at T = {temperatures} == its rank counted in the whole row divided by T, "
                 "every layer (largest rank change)", worst, 0)


def metrics_by_temperature(lens_logits: torch.Tensor, target_id: int, top_k: int, temperatures) -> dict[float, dict]:
    """{T: lens_metrics at T} for T in `temperatures` and 1.0, in increasing order. lens_logits: [layers, vocab]."""
    return {t: lens_metrics(lens_logits, target_id, top_k, t) for t in sorted({float(t) for t in temperatures} | {1.0})}


def metric_checks(label: str, lens_logits: torch.Tensor, final_logits: torch.Tensor | None, target_id: int,
                  metrics: dict[float, dict], dtype) -> list[dict]:
    """The KL check (at T = 1) and the temperature check of one lens's `metrics_by_temperature`."""
    ranks = {t: m["target_rank"] for t, m in metrics.items()}
    return [check_kl_to_final(label, lens_logits, final_logits, metrics[1.0]["kl_to_final"], dtype),
            check_ranks_under_temperature(label, lens_logits, target_id, ranks)]


# ----------------------------------------------------------------------------- one prompt, every layer


@dataclass(frozen=True)
class Resolution:
    """Where a prediction resolves along the depth (`resolution_depth`); a layer is None when it never happens."""
    first_top1_layer: int | None  # from here on the target is top-1 to the end
    first_top1_depth: float | None
    first_p50_layer: int | None  # the target's probability first passes 0.5
    first_p50_depth: float | None
    entropy_drop_layer: int | None  # the block that lowers the entropy most
    entropy_drop_depth: float | None
    entropy_drop_nats: float | None

    def as_record(self) -> dict:
        return asdict(self)


@dataclass
class LensTrajectory:
    """One prompt read through one lens at one temperature, layer by layer, in the style of tuned-lens'
    PredictionTrajectory: every list has n_layers + 1 entries (layer 0 = the embeddings .. n = the last block).
    `checks` are the self-checks of the forward pass it was read from (`sweep`)."""
    top_tokens: list[list[tuple[str, float]]]  # per layer: the top-k (token text, probability)
    target_prob: list[float]
    target_rank: list[int]  # 0 = top-1
    entropy: list[float]  # nats
    kl_to_final: list[float]  # KL(final || layer), nats
    checks: list[dict] = field(default_factory=list)

    @classmethod
    def from_metrics(cls, metrics: dict, decode, checks: list[dict]) -> LensTrajectory:
        """From `lens_metrics`' tensors; decode: token id list -> text (the tokenizer's decode)."""
        top_tokens = [[(decode([int(i)]), float(p)) for i, p in zip(ids, probs)]
                      for ids, probs in zip(metrics["ids_top"].tolist(), metrics["probs_top"].tolist())]
        return cls(top_tokens, metrics["target_prob"].tolist(), metrics["target_rank"].tolist(),
                   metrics["entropy"].tolist(), metrics["kl_to_final"].tolist(), checks)

    @property
    def n_layers(self) -> int:
        return len(self.target_prob) - 1

    @property
    def check(self) -> dict:
        """The lens invariant (its last layer == the model's logits), the first of `checks`."""
        return self.checks[0]

    @property
    def final_rank(self) -> int:
        return self.target_rank[-1]

    @property
    def final_prob(self) -> float:
        return self.target_prob[-1]

    @property
    def top_k_mass(self) -> list[float]:
        """Per layer, the probability the top-k tokens hold together."""
        return [sum(p for _, p in top) for top in self.top_tokens]

    def resolution(self) -> Resolution:
        return Resolution(**resolution_depth(self.target_rank, self.target_prob, self.entropy))

    def layer_records(self) -> list[dict]:
        """The results.json "layers" list of the contract (DESIGN.md)."""
        return [{"layer": layer, "depth": layer / self.n_layers, "top_tokens": [list(t) for t in self.top_tokens[layer]],
                 "target_prob": self.target_prob[layer], "target_rank": self.target_rank[layer],
                 "entropy": self.entropy[layer], "kl_to_final": self.kl_to_final[layer]}
                for layer in range(self.n_layers + 1)]


def trajectories(model, metrics: dict[float, dict], checks: list[dict]) -> dict[float, LensTrajectory]:
    """{T: LensTrajectory} from `metrics_by_temperature`, each carrying the same self-checks."""
    return {t: LensTrajectory.from_metrics(m, model.tokenizer.decode, checks) for t, m in metrics.items()}


def sweep(model, input_ids: torch.Tensor, target_id: int, use_norm: bool = True, top_k: int = 5,
          temperatures: tuple[float, ...] = (1.0,)) -> dict[float, LensTrajectory]:
    """The logit lens over all layers at the last position of one prompt: one forward pass, one unembedding.

    input_ids: [1, seq]. Returns {temperature: LensTrajectory} (1.0 always), each with the sweep's checks:
    the NORM lens at the last layer == the model's logits (whatever `use_norm`: it checks the model and the
    lens code, not the mode), then `metric_checks` (the KL recomputed, the ranks at every temperature).
    """
    resid, model_logits = residual_stream(model, input_ids)  # [n_layers + 1, d_model], [vocab]
    lens_logits = unembed(model, resid, use_norm)  # [n_layers + 1, vocab]
    return read_trajectories(model, resid, model_logits, lens_logits, target_id, use_norm, top_k, temperatures)


def read_trajectories(model, resid: torch.Tensor, model_logits: torch.Tensor, lens_logits: torch.Tensor,
                      target_id: int, use_norm: bool, top_k: int, temperatures) -> dict[float, LensTrajectory]:
    """One prompt's {T: LensTrajectory} with its self-checks, from its residual stream resid [n_layers + 1,
    d_model], the model's own logits [vocab] and the lens logits [n_layers + 1, vocab] (`sweep`, `sweeps`)."""
    metrics = metrics_by_temperature(lens_logits, target_id, top_k, temperatures)
    label, final_logits = ("NORM lens", model_logits) if use_norm else ("RAW lens", None)
    checks = [check_lens_matches_logits(model, resid[-1], model_logits, lens_logits[-1] if use_norm else None)]
    checks += metric_checks(label, lens_logits, final_logits, target_id, metrics, model.dtype)
    return trajectories(model, metrics, checks)


def first_layer_staying_true(flags: list[bool]) -> int | None:
    """The first index from which every flag to the end is True (None when the last one is False)."""
    first = None
    for index in range(len(flags) - 1, -1, -1):
        if not flags[index]:
            break
        first = index
    return first


def resolution_depth(target_rank: list[int], target_prob: list[float], entropy: list[float]) -> dict:
    """Where along the depth a prediction resolves. All lists have n_layers + 1 entries (layer 0..n).

    Returns layers (None when it never happens) and depths (layer / n_layers):
      first_top1_layer: the first layer from which the target is top-1 and stays top-1 to the end;
      first_p50_layer: the first layer where the target's probability passes 0.5;
      entropy_drop_layer: the layer whose block lowers the entropy most (entropy[l-1] - entropy[l] largest).
    """
    n = len(target_rank) - 1
    first_top1 = first_layer_staying_true([rank == 0 for rank in target_rank])
    first_p50 = next((layer for layer, p in enumerate(target_prob) if p > 0.5), None)
    drops = [entropy[layer - 1] - entropy[layer] for layer in range(1, n + 1)]
    entropy_drop = 1 + max(range(n), key=drops.__getitem__) if n else None

    def depth(layer):
        return None if layer is None else layer / n

    return {"first_top1_layer": first_top1, "first_top1_depth": depth(first_top1),
            "first_p50_layer": first_p50, "first_p50_depth": depth(first_p50),
            "entropy_drop_layer": entropy_drop, "entropy_drop_depth": depth(entropy_drop),
            "entropy_drop_nats": max(drops) if n else None}


# ----------------------------------------------------------------------------- many prompts at once
# The same numbers as `residual_stream` and `sweep`, with prompts run in padded batches. RIGHT padding:
# each prompt keeps positions 0..len-1, and a causal model's real tokens never attend to the pads that come
# after them, so every architecture (sliding windows and soft-caps included) gives each row what it would
# give alone (tests/test_batched_lens.py). Each row is then read at its own last real token.

UNEMBED_BYTES = 256 * 1024 ** 2  # one unembedding call's float32 logits stay under this


def length_sorted_batches(prompts: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` ([1, seq_i] each) in batches of `batch_size`, shortest first: little padding."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].shape[1])
    return [order[start: start + batch_size] for start in range(0, len(order), max(1, int(batch_size)))]


def resolve_batch_size(model, prompts: list[torch.Tensor], setting) -> int:
    """Prompts per forward: a number as given, or "auto" (common.batching) for the longest prompt."""
    from .batching import batch_size
    return batch_size(setting, model, max((p.shape[1] for p in prompts), default=1))


@torch.no_grad()
def padded_forward(model, prompts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass over `prompts` ([1, seq_i] each), right-padded, with an attention mask.

    Returns [(resid [n_layers + 1, d_model], logits [vocab])] per prompt at its last real token, in the
    model's dtype, as `residual_stream` gives them one at a time.
    """
    lengths = [p.shape[1] for p in prompts]
    pad_id = model.tokenizer.pad_token_id or 0  # any id: pads come after the real tokens and are masked
    ids = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, length) in enumerate(zip(prompts, lengths)):
        ids[row, :length], mask[row, :length] = prompt[0], 1
    last = torch.tensor(lengths) - 1  # [batch]
    keep = torch.unique(last)  # the positions whose logits are needed (few: the batch is length-sorted)
    captured = {}
    handle = model.final_norm.register_forward_pre_hook(lambda module, args: captured.update(resid=args[0]))
    try:
        out = model.hf_model(ids.to(model.device), attention_mask=mask.to(model.device), output_hidden_states=True,
                             logits_to_keep=keep.to(model.device))
    finally:
        handle.remove()
    rows = torch.arange(len(prompts))
    layers = list(out.hidden_states[: model.n_layers]) + [captured["resid"]]
    resid = torch.stack([h[rows.to(h.device), last.to(h.device)] for h in layers], dim=1)  # [batch, layers, d_model]
    column = torch.searchsorted(keep, last)  # where each row's last position sits among `keep`
    logits = out.logits[rows.to(out.logits.device), column.to(out.logits.device)]  # [batch, vocab]
    return list(zip(resid, logits))


def residual_streams(model, prompts: list[torch.Tensor], batch_size="auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`residual_stream` of every prompt ([1, seq_i] each), run in padded batches of `batch_size` ("auto" or
    a number). Returns [(resid [n_layers + 1, d_model], logits [vocab])] in the order of `prompts`."""
    streams = [None] * len(prompts)
    for batch in length_sorted_batches(prompts, resolve_batch_size(model, prompts, batch_size)):
        for i, stream in zip(batch, padded_forward(model, [prompts[i] for i in batch])):
            streams[i] = stream
    return streams


def sweeps(model, prompts: list[torch.Tensor], target_ids: list[int], use_norm: bool = True, top_k: int = 5,
           temperatures: tuple[float, ...] = (1.0,), batch_size="auto", description: str = "") -> list[dict[float, LensTrajectory]]:
    """`sweep` of every prompt ([1, seq_i] each, with its target id), in the order of `prompts`.

    Forward passes run in padded batches; the unembedding of all layers of many prompts runs as one matrix
    product (the unembedding's weights are read once per group instead of once per prompt), in groups whose
    logits stay under UNEMBED_BYTES; the lens metrics and the self-check are then per prompt, as in `sweep`.
    """
    results = [None] * len(prompts)
    vocab_bytes = 4 * model.unembedding.weight.shape[0]
    per_group = max(1, UNEMBED_BYTES // (vocab_bytes * (model.n_layers + 1)))
    batches = length_sorted_batches(prompts, resolve_batch_size(model, prompts, batch_size))
    for batch in progress(batches, description, unit="batch") if description else batches:
        streams = padded_forward(model, [prompts[i] for i in batch])
        for start in range(0, len(batch), per_group):
            group, group_streams = batch[start: start + per_group], streams[start: start + per_group]
            resid = torch.stack([r for r, _ in group_streams])  # [group, n_layers + 1, d_model]
            lens_logits = unembed(model, resid.flatten(0, 1), use_norm).view(*resid.shape[:2], -1)
            for i, logits, (r, model_logits) in zip(group, lens_logits, group_streams):
                results[i] = read_trajectories(model, r, model_logits, logits, target_ids[i], use_norm, top_k,
                                               temperatures)
    return results
