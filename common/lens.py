"""The logit lens: read every layer's residual stream through the unembedding.

Layer index (contract): 0 = the residual entering block 0 (embeddings, after any embedding scaling);
layer i = the residual after block i, for i = 1..n_layers. A sweep has n_layers + 1 entries.

NORM lens: the model's final norm, then the unembedding. RAW lens: the unembedding alone.
Gemma-2's final logit soft-cap (cap * tanh(x / cap)) is part of the unembedding in both.
The NORM lens at the last layer is exactly the model's own output: `check_lens_matches_logits`.
"""
from __future__ import annotations

import torch

from .checks import check, tolerance


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
    """
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)  # [layers, vocab]; finite for finite logits
    p = logp.exp()  # may underflow to 0, and 0 * finite log p = 0, so no NaN below
    top = torch.topk(p, top_k, dim=-1)
    target_logit = logits[:, target_id : target_id + 1]  # [layers, 1]
    final_p, final_logp = p[-1], logp[-1]  # [vocab]
    # KL(final || layer) = sum_v p_f (log p_f - log p_layer), as two matrix-vector products; the final
    # layer against itself is 0 by definition, not up to rounding.
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


def key_layers(n_layers: int) -> list[int]:
    """The lab's sampled layers: 0, n/6, n/3, n/2, 2n/3, 5n/6 and the last (n), without repeats."""
    picks = [0, n_layers // 6, n_layers // 3, n_layers // 2, 2 * n_layers // 3, 5 * n_layers // 6, n_layers]
    return sorted(set(picks))


def check_lens_matches_logits(model, resid_last: torch.Tensor, model_logits: torch.Tensor) -> dict:
    """The lens invariant: the NORM lens of the last layer must reproduce the model's own logits.

    resid_last: [d_model]; model_logits: [vocab]. Tolerance: 1e-4 in float32, common.checks' share of the
    logits' scale in half precision.
    """
    lens = unembed(model, resid_last, use_norm=True)
    diff = (lens - model_logits.float()).abs().max().item()
    return check("NORM lens at the last layer == model logits", diff, tolerance(model.dtype, model_logits, 1e-4))


# ----------------------------------------------------------------------------- one prompt, every layer


class LensSweep:
    """Every lens statistic of one prompt, layer by layer (n_layers + 1 entries), plus the self-check.

    Built by `sweep`; `layer_records` gives the results.json "layers" list of the contract.
    """

    def __init__(self, model, metrics: dict, check: dict, use_norm: bool, temperature: float = 1.0):
        self.n_layers = model.n_layers
        self.use_norm = use_norm
        self.temperature = temperature
        self.check = check
        self.target_prob = metrics["target_prob"].tolist()
        self.target_rank = metrics["target_rank"].tolist()
        self.entropy = metrics["entropy"].tolist()
        self.kl_to_final = metrics["kl_to_final"].tolist()
        decode = model.tokenizer.decode
        self.top_tokens = [[(decode([int(i)]), float(p)) for i, p in zip(ids, probs)]
                           for ids, probs in zip(metrics["ids_top"].tolist(), metrics["probs_top"].tolist())]

    @property
    def depth(self) -> list[float]:
        return [layer / self.n_layers for layer in range(self.n_layers + 1)]

    def layer_records(self) -> list[dict]:
        return [{"layer": layer, "depth": self.depth[layer], "top_tokens": [list(t) for t in self.top_tokens[layer]],
                 "target_prob": self.target_prob[layer], "target_rank": self.target_rank[layer],
                 "entropy": self.entropy[layer], "kl_to_final": self.kl_to_final[layer]}
                for layer in range(self.n_layers + 1)]


def sweep(model, input_ids: torch.Tensor, target_id: int, use_norm: bool = True, top_k: int = 5,
          temperatures: tuple[float, ...] = (1.0,)) -> dict[float, LensSweep]:
    """The logit lens over all layers at the last position of one prompt: one forward pass, one unembedding.

    input_ids: [1, seq]. Returns {temperature: LensSweep}; every sweep carries the NORM-lens self-check
    (computed whatever `use_norm` is, since it checks the model and the lens code, not the mode).
    """
    resid, model_logits = residual_stream(model, input_ids)  # [n_layers + 1, d_model], [vocab]
    lens_logits = unembed(model, resid, use_norm)  # [n_layers + 1, vocab]
    check = check_lens_matches_logits(model, resid[-1], model_logits)
    return {t: LensSweep(model, lens_metrics(lens_logits, target_id, top_k, t), check, use_norm, t)
            for t in temperatures}


def resolution_depth(target_rank: list[int], target_prob: list[float], entropy: list[float]) -> dict:
    """Where along the depth a prediction resolves. All lists have n_layers + 1 entries (layer 0..n).

    Returns layers (None when it never happens) and depths (layer / n_layers):
      first_top1_layer: the first layer from which the target is top-1 and stays top-1 to the end;
      first_p50_layer: the first layer where the target's probability passes 0.5;
      entropy_drop_layer: the layer whose block lowers the entropy most (entropy[l-1] - entropy[l] largest).
    """
    n = len(target_rank) - 1
    first_top1 = None
    for layer in range(n, -1, -1):
        if target_rank[layer] != 0:
            break
        first_top1 = layer
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
           temperatures: tuple[float, ...] = (1.0,), batch_size="auto") -> list[dict[float, LensSweep]]:
    """`sweep` of every prompt ([1, seq_i] each, with its target id), in the order of `prompts`.

    Forward passes run in padded batches; the unembedding of all layers of many prompts runs as one matrix
    product (the unembedding's weights are read once per group instead of once per prompt), in groups whose
    logits stay under UNEMBED_BYTES; the lens metrics and the self-check are then per prompt, as in `sweep`.
    """
    results = [None] * len(prompts)
    vocab_bytes = 4 * model.unembedding.weight.shape[0]
    per_group = max(1, UNEMBED_BYTES // (vocab_bytes * (model.n_layers + 1)))
    for batch in length_sorted_batches(prompts, resolve_batch_size(model, prompts, batch_size)):
        streams = padded_forward(model, [prompts[i] for i in batch])
        for start in range(0, len(batch), per_group):
            group, group_streams = batch[start: start + per_group], streams[start: start + per_group]
            resid = torch.stack([r for r, _ in group_streams])  # [group, n_layers + 1, d_model]
            lens_logits = unembed(model, resid.flatten(0, 1), use_norm).view(*resid.shape[:2], -1)
            for i, logits, (r, model_logits) in zip(group, lens_logits, group_streams):
                check = check_lens_matches_logits(model, r[-1], model_logits)
                results[i] = {t: LensSweep(model, lens_metrics(logits, target_ids[i], top_k, t), check, use_norm, t)
                              for t in temperatures}
    return results
