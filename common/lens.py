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
