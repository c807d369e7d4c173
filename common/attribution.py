"""Direct logit attribution (DLA): the answer's logit split into embeddings, heads, MLPs and biases; ablations.

At the last position, the residual stream that enters the final norm is an exact sum of pieces:

    x_final    = embed + sum_l (attn_out_l + mlp_out_l)
    attn_out_l = sum_h z_lh @ W_O[:, h]^T + b_O                  (Llama, Qwen3, Mistral)
    attn_out_l = (sum_h z_lh @ W_O[:, h]^T + b_O) * w_post / rms_post    (Gemma-2/3: a post-attention norm)

`z_lh` is head h's attention-weighted value vector (`hook_z`) and `W_O[:, h]` its slice of the o_proj weight.
The final RMSNorm, with its scale rms(x_final) frozen from the actual run, is linear, so each piece p adds

    (p / rms(x_final)) * w_final @ (W_U[target] - W_U[counterfactual])

to the metric, and the pieces plus the unembedding bias add up to the metric the model itself computes from
its logits before any soft-cap (Gemma-2's 30 * tanh(x / 30) is not linear, so it is left out of the metric).
Gemma's post-attention norm is handled the same way: its scale rms_post is frozen from the run, which makes
the attention output linear in the heads, so the per-head pieces still add up exactly.

Why partly by hand: the activations come from the TransformerLens bridge cache (`hook_z`, `hook_attn_out`,
`hook_mlp_out`, the norms' `hook_scale`), but TransformerLens' own `cache.logit_attrs` / `apply_ln_to_stack`
divide by the cached scale without multiplying by the norm weight, which is only right when the weights are
folded (DESIGN.md: 7.52 vs 13.67 measured), and its per-head results skip Gemma's post-attention norm. So the
weight side (W_O, norm weights, W_U) is read from the Hugging Face modules here.

Ablations (a head's `hook_z` or an MLP's `hook_mlp_out` replaced by zero or by its mean over the prompt's
positions) are run by the lab's one intervention engine, common/interventions.py.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import align_module_device

from . import hooks
from .checks import check, tolerance

# ----------------------------------------------------------------------------- reading the model


def has_post_attention_norm(model) -> bool:
    """True for Gemma-2/3, whose blocks normalize the attention output before adding it to the residual."""
    return hasattr(model.bridge.blocks[0], "ln1_post")


def cache_hook_names(model) -> list[str]:
    """The bridge hooks a decomposition needs (pass to run_with_cache's names_filter to keep memory small)."""
    names = [hooks.resid(0), hooks.FINAL_NORM_INPUT, hooks.FINAL_NORM_SCALE, hooks.LOGITS]
    post = has_post_attention_norm(model)
    for layer in range(model.n_layers):
        names += [hooks.block_site(site, layer) for site in ("head", "attn", "mlp", "pattern")]
        if post:
            names.append(hooks.post_attention_norm_scale(layer))
    return names


def unwrapped(module):
    """The Hugging Face module under a TransformerLens bridge wrapper (the module itself when it is not one)."""
    return module.original_component if hasattr(module, "original_component") else module


@contextmanager
def materialized(module):
    """The module's Hugging Face module, its weights readable on the execution device for the context.

    With MAX_MEMORY_GB, accelerate keeps an offloaded layer's weights on the "meta" device (no data) except
    during that layer's own forward pass. Reading W_O or a norm weight of such a layer therefore goes through
    accelerate's `align_module_device`, which puts them in (from CPU memory or the disk) and takes them out at
    the end. Read inside the context and do not run the module there: its forward takes them out early.
    Without offloading this changes nothing.
    """
    inner = unwrapped(module)
    with align_module_device(inner):
        yield inner


def _probe_norm(norm) -> tuple[str, torch.Tensor]:
    """(convention, effective weight float32 [d_model]) of an RMSNorm module, read by running it on ones."""
    with materialized(norm) as module:
        weight = getattr(module, "weight", None)
        if weight is None:
            raise ValueError(f"{type(module).__name__} has no weight: the attribution supports RMSNorm-style norms.")
        weight = weight.detach().float().clone()
        probe_module = remove_hook_from_module(copy.deepcopy(module))  # a plain copy, not tied to the offload
    # Probed in float32: in bfloat16, Gemma-3's final-norm weights (up to ~280) round by more than the 1 that
    # tells "1 + w" from "w" (measured: the wrong convention was picked, and DLA missed the logit by 15%).
    with torch.no_grad():
        probe = probe_module.float()(torch.ones(1, 1, weight.shape[-1], device=weight.device))[0, 0].float()
    candidates = {"w": weight, "1 + w": 1.0 + weight}
    distance = {name: (probe - w).abs().max().item() for name, w in candidates.items()}
    best = min(distance, key=distance.get)
    if distance[best] > 1e-2 * max(1.0, candidates[best].abs().max().item()):
        raise ValueError(f"{type(norm).__name__} multiplies by neither its weight nor 1 + weight "
                         f"(distances {distance}): the attribution does not know this norm.")
    return best, candidates[best]


def effective_norm_weight(norm) -> torch.Tensor:
    """The elementwise weight an RMSNorm module really multiplies by, float32 [d_model].

    Llama, Qwen3 and Mistral multiply by `weight`; Gemma by `1 + weight`. Rather than assume it from the
    architecture's name, the module is run on a vector of ones (RMSNorm(1) = w_eff / sqrt(1 + eps), eps ~1e-6)
    and the convention whose float32 weight matches that output is used. A module matching neither raises.
    """
    return _probe_norm(norm)[1]


def norm_weight_convention(norm) -> str:
    """"w" or "1 + w": how the module applies its weight (see `effective_norm_weight`)."""
    return _probe_norm(norm)[0]


def head_outputs(z: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """What each head writes into the residual stream, before any o_proj bias.

    z: [..., n_heads, head_dim] (hook_z); W_O: the o_proj weight [d_model, n_heads * head_dim].
    Returns [..., n_heads, d_model]; the sum over heads equals o_proj(z) without its bias.
    """
    n_heads, head_dim = z.shape[-2:]
    return torch.einsum("...hd,mhd->...hm", z, W_O.reshape(W_O.shape[0], n_heads, head_dim))


# ----------------------------------------------------------------------------- the decomposition


@dataclass
class Decomposition:
    """The last position's residual stream entering the final norm, as pieces (all float32).

    Invariant: embed + heads.sum((0, 1)) + attn_bias.sum(0) + mlps.sum(0) == resid_final.
    """
    embed: torch.Tensor  # [d_model]: the embeddings (after any embedding scaling), = hook_resid_pre of block 0
    heads: torch.Tensor  # [n_layers, n_heads, d_model]: each head, after the frozen post-norm if any
    attn_bias: torch.Tensor  # [n_layers, d_model]: o_proj bias (zeros when absent), after the frozen post-norm
    mlps: torch.Tensor  # [n_layers, d_model]: hook_mlp_out (after Gemma's post-feedforward norm)
    attn_out: torch.Tensor  # [n_layers, d_model]: the model's own hook_attn_out, for the checks
    resid_final: torch.Tensor  # [d_model]: the model's own residual entering the final norm
    rms_final: torch.Tensor  # scalar: the final norm's scale sqrt(mean(x^2) + eps), frozen from the run

    def blocks_in_model_order(self) -> torch.Tensor:
        """[d_model]: embed + attn_out_0 + mlp_out_0 + attn_out_1 + ..., added in the order the model adds them
        (so in float32 it reproduces the model's residual bit for bit; another order differs by rounding)."""
        x = self.embed
        for attn, mlp in zip(self.attn_out, self.mlps):
            x = (x + attn) + mlp
        return x


def post_attention_scales(model, cache, position: int = -1) -> torch.Tensor | None:
    """Gemma's post-attention norm at one position as a frozen elementwise map: w_eff / rms, [n_layers, d_model].

    None for models without that norm. rms is the norm's own `hook_scale` from the run (sqrt(mean(o^2) + eps)).
    """
    if not has_post_attention_norm(model):
        return None
    return torch.stack([effective_norm_weight(model.bridge.blocks[layer].ln1_post)
                        / cache[hooks.post_attention_norm_scale(layer)][0, position].float()
                        for layer in range(model.n_layers)])


def attention_pieces(model, z: torch.Tensor, post_scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What every head and every o_proj bias adds to the residual stream, float32.

    z: [n_layers, n_heads, head_dim] (hook_z at one position, or replacement values); post_scales: from
    `post_attention_scales` (None = no post-attention norm). Returns (heads [n_layers, n_heads, d_model],
    biases [n_layers, d_model], zeros where o_proj has no bias).
    """
    heads, biases = [], []
    for layer, block in enumerate(model.hf_model.model.layers):
        with materialized(block.self_attn.o_proj) as o_proj:  # (offloaded layers too)
            head = head_outputs(z[layer].float(), o_proj.weight.detach().float())  # [n_heads, d_model]
            bias = (o_proj.bias.detach().float().clone() if getattr(o_proj, "bias", None) is not None
                    else torch.zeros_like(head[0]))
        if post_scales is not None:  # the frozen norm is a fixed elementwise linear map
            head, bias = head * post_scales[layer], bias * post_scales[layer]
        heads.append(head)
        biases.append(bias)
    return torch.stack(heads), torch.stack(biases)


def decompose_last_position(model, cache) -> Decomposition:
    """Split the last position's final residual stream into pieces, from a bridge cache of one prompt.

    cache: from `model.bridge.run_with_cache(input_ids [1, seq], names_filter=cache_hook_names(model))`.
    """
    def last(name):
        return cache[name][0, -1].float()

    z = torch.stack([last(hooks.block_site("head", layer)) for layer in range(model.n_layers)])  # [L, H, hd]
    heads, biases = attention_pieces(model, z, post_attention_scales(model, cache))
    return Decomposition(embed=last(hooks.resid(0)), heads=heads, attn_bias=biases,
                         mlps=torch.stack([last(hooks.block_site("mlp", layer)) for layer in range(model.n_layers)]),
                         attn_out=torch.stack([last(hooks.block_site("attn", layer))
                                               for layer in range(model.n_layers)]),
                         resid_final=last(hooks.FINAL_NORM_INPUT), rms_final=last(hooks.FINAL_NORM_SCALE).reshape(()))


# ----------------------------------------------------------------------------- the metric and its attribution


def metric_direction(model, target_id: int, counter_id: int | None = None) -> tuple[torch.Tensor, float]:
    """The unembedding direction of the metric and its bias term.

    Returns (direction [d_model] float32, bias): metric = final_norm(x) @ direction + bias, where the metric is
    the target's logit (counter_id None) or logit(target) - logit(counter_id), both before any soft-cap.
    """
    with materialized(model.unembedding) as unembedding:
        W_U = unembedding.weight.detach()  # [vocab, d_model]
        b_U = unembedding.bias.detach() if getattr(unembedding, "bias", None) is not None else None
        direction = W_U[target_id].float().clone()
        bias = float(b_U[target_id]) if b_U is not None else 0.0
        if counter_id is not None:
            direction = direction - W_U[counter_id].float()
            bias -= float(b_U[counter_id]) if b_U is not None else 0.0
    return direction, bias


def metric_from_logits(logits: torch.Tensor, target_id: int, counter_id: int | None = None) -> torch.Tensor:
    """logits: [..., vocab] (before any soft-cap) -> the metric [...], float32."""
    logits = logits.float()
    metric = logits[..., target_id]
    return metric - logits[..., counter_id] if counter_id is not None else metric


def direct_logit_attribution(pieces: torch.Tensor, rms_final: torch.Tensor, final_norm_weight: torch.Tensor,
                             direction: torch.Tensor) -> torch.Tensor:
    """The metric each residual-stream piece writes, through the final norm with its scale frozen.

    pieces: [..., d_model]; rms_final: scalar; final_norm_weight, direction: [d_model]. Returns [...].
    Linear in the pieces, so the attributions of pieces add up to the attribution of their sum.
    """
    return (pieces.float() / rms_final) @ (final_norm_weight * direction)


@dataclass
class Attribution:
    """The metric at the last position, split into parts that add up to it (floats / float32 tensors)."""
    embed: float
    heads: torch.Tensor  # [n_layers, n_heads]
    attn_bias: torch.Tensor  # [n_layers]: each layer's o_proj bias (zero for the lab's four architectures)
    mlps: torch.Tensor  # [n_layers]
    unembed_bias: float  # the lm_head bias term (0.0 when there is none)

    @property
    def bias(self) -> float:
        """All bias terms together: o_proj biases of every layer and the unembedding bias."""
        return float(self.attn_bias.sum()) + self.unembed_bias

    @property
    def attn_per_layer(self) -> torch.Tensor:
        """[n_layers]: the sum of each layer's heads (its o_proj bias is counted in `bias`)."""
        return self.heads.sum(dim=-1)

    def total(self) -> float:
        """The sum of all parts: what the attribution says the metric is (checked against the model's own)."""
        return self.embed + float(self.heads.sum()) + float(self.mlps.sum()) + self.bias

    def attention_share(self) -> float | None:
        """What the heads write directly as a share of what heads and MLPs write: a / (|a| + |m|), a and m the
        sums over all heads and all MLPs. In [-1, 1]; a / (a + m) when both push the metric up; a negative share
        means the heads together push it down. None when both sums are 0."""
        heads, mlps = float(self.heads.sum()), float(self.mlps.sum())
        size = abs(heads) + abs(mlps)
        return heads / size if size else None

    def as_record(self) -> dict:
        """The results.json "attribution" record."""
        return {"embed": self.embed, "heads": self.heads.tolist(), "mlps": self.mlps.tolist(),
                "attn_per_layer": self.attn_per_layer.tolist(), "attn_bias": self.attn_bias.tolist(),
                "unembed_bias": self.unembed_bias, "bias": self.bias, "total": self.total()}


def direct_attributor(model, rms_final: torch.Tensor, target_id: int, counter_id: int | None = None):
    """A function pieces [..., d_model] -> their direct attribution [...] to the metric (final-norm scale frozen)."""
    direction, _ = metric_direction(model, target_id, counter_id)
    weight = effective_norm_weight(model.final_norm)
    return lambda pieces: direct_logit_attribution(pieces, rms_final, weight, direction)


def attribute(model, decomposition: Decomposition, target_id: int, counter_id: int | None = None) -> Attribution:
    """Direct logit attribution of the metric to every piece of a Decomposition."""
    dla = direct_attributor(model, decomposition.rms_final, target_id, counter_id)
    return Attribution(embed=float(dla(decomposition.embed)), heads=dla(decomposition.heads),
                       attn_bias=dla(decomposition.attn_bias), mlps=dla(decomposition.mlps),
                       unembed_bias=metric_direction(model, target_id, counter_id)[1])


def direct_effects_of_ablation(model, cache, decomposition: Decomposition, z_values: torch.Tensor,
                               mlp_values: torch.Tensor, target_id: int, counter_id: int | None = None):
    """How much each single ablation changes the metric through the direct path alone (metric clean - ablated).

    It is the attribution of what the ablation takes away at the last position, the clean piece minus its
    replacement, with the final-norm (and Gemma's post-attention norm) scales frozen: for zero ablation, exactly
    the DLA. Comparing it with the measured total effect shows what flows through later layers instead.
    z_values [n_layers, n_heads, head_dim], mlp_values [n_layers, d_model]: see `ablation_values`.
    Returns (heads [n_layers, n_heads], mlps [n_layers]) float32.
    """
    dla = direct_attributor(model, decomposition.rms_final, target_id, counter_id)
    replaced_heads, _ = attention_pieces(model, z_values, post_attention_scales(model, cache))
    return dla(decomposition.heads) - dla(replaced_heads), dla(decomposition.mlps) - dla(mlp_values.float())


def frozen_norm(model, scale_hook: str, norm, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The model's own norm module on x [..., d_model], its scale frozen to `scale` [..., 1] (then it is linear).

    norm: the norm's bridge component; scale_hook: its hook_scale's name (e.g. hooks.FINAL_NORM_SCALE).
    TransformerLens rebuilds a norm's output from an edited hook_scale with the module's own weight and
    convention; it warns that this leaves HF's kernel, which is what is asked for here. Returns the model's dtype.
    """
    def freeze(value, hook):
        return scale.to(value.device, value.dtype).expand_as(value).clone()

    with materialized(norm) as module, model.bridge.hooks(fwd_hooks=[(scale_hook, freeze)]), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return norm(x.to(module.weight.device, model.dtype))  # (the norm's own device: several GPUs)


def removed_at_last_position(model, cache, z_values: torch.Tensor, mlp_values: torch.Tensor,
                             head_mask: torch.Tensor, mlp_mask: torch.Tensor) -> torch.Tensor:
    """What each ablated set takes from the residual stream at the last position, by the model's own modules.

    A layer's attention output is recomputed by its own o_proj on hook_z with the set's heads replaced (then
    Gemma's post-attention norm, its scale frozen), against the same on the clean hook_z; an MLP loses its
    output minus its replacement. head_mask [n_sets, L, H], mlp_mask [n_sets, L], z_values [L, H, head_dim],
    mlp_values [L, d_model]: as for `run_ablations`. Returns [n_sets, d_model] float32 on the CPU.
    """
    removed = torch.zeros(head_mask.shape[0], model.d_model)
    for layer, block in enumerate(model.hf_model.model.layers):
        rows = head_mask[:, layer].any(dim=-1)  # [n_sets]
        if rows.any():
            z = cache[hooks.block_site("head", layer)][0, -1]  # [n_heads, head_dim]
            ablated = torch.where(head_mask[rows, layer, :, None].to(z.device), z_values[layer].to(z), z)
            outputs = unwrapped(block.self_attn.o_proj)(torch.cat([z[None], ablated]).flatten(-2))  # clean first
            if has_post_attention_norm(model):
                scale = cache[hooks.post_attention_norm_scale(layer)][0, -1]
                outputs = frozen_norm(model, hooks.post_attention_norm_scale(layer),
                                      model.bridge.blocks[layer].ln1_post, outputs[:, None], scale)[:, 0]
            removed[rows] += (outputs[0] - outputs[1:]).float().cpu()
        if mlp_mask[:, layer].any():
            clean = cache[hooks.block_site("mlp", layer)][0, -1]
            removed[mlp_mask[:, layer]] += (clean.float() - mlp_values[layer].float()).cpu()
    return removed


def direct_effects_by_the_model(model, cache, z_values: torch.Tensor, mlp_values: torch.Tensor,
                                head_mask: torch.Tensor, mlp_mask: torch.Tensor, target_id: int,
                                counter_id: int | None = None) -> torch.Tensor:
    """Each ablated set's direct effect computed apart from the attribution: a reference for its self-check.

    The residual stream entering the final norm at the last position loses what the set writes there
    (`removed_at_last_position`); the model's own final norm (scale frozen from the run) and unembedding then
    give the metric. Nothing of W_O, the norm weights or W_U is read by hand. Returns [n_sets] float32:
    metric(clean) - metric(without what the set writes), the same quantity as `direct_effects_of_ablation`.
    """
    removed = removed_at_last_position(model, cache, z_values, mlp_values, head_mask, mlp_mask)
    resid = cache[hooks.FINAL_NORM_INPUT][0, -1].float().cpu()  # [d_model]
    residuals = torch.cat([resid[None], resid - removed])  # [1 + n_sets, d_model]: clean first
    normed = frozen_norm(model, hooks.FINAL_NORM_SCALE, model.bridge.ln_final, residuals[:, None],
                         cache[hooks.FINAL_NORM_SCALE][0, -1])[:, 0]
    metric = torch.cat([metric_from_logits(model.unembedding(rows), target_id, counter_id).cpu()
                        for rows in normed.split(64)])  # in slices: [64, vocab] logits at a time
    return metric[0] - metric[1:]


def direct_effect_check(model, reference: torch.Tensor, direct_effects: torch.Tensor,
                        logits_pre_softcap: torch.Tensor) -> dict:
    """The direct effects a run reports against `direct_effects_by_the_model`, both [n_sets]."""
    return check("direct effect of each ablation == the metric it takes away at the final norm's input "
                 "(model's own o_proj, norms and unembedding)",
                 (direct_effects.float().cpu() - reference.float().cpu()).abs().max().item(),
                 tolerance(model.dtype, logits_pre_softcap, 1e-4))


def decomposition_checks(model, decomposition: Decomposition, attribution: Attribution,
                         model_metric: float, logits_pre_softcap: torch.Tensor, logits: torch.Tensor) -> list[dict]:
    """The invariants of one prompt's attribution, as check dicts for common.report.check_lines.

    logits_pre_softcap, logits: [vocab] at the last position (the lm_head output, and the model's output).
    The metric must match within 1e-4 in float32. The two residual-stream identities are compared with a
    tolerance relative to the activations' scale (1e-5 of it in float32): residual streams reach hundreds
    (SmolLM2: ~580), and summing pieces in another order than the model's changes the last float32 bits.
    """
    def relative(values):
        return tolerance(model.dtype, values, 1e-5 * max(1.0, values.abs().max().item()))

    heads_sum = decomposition.heads.sum(dim=1) + decomposition.attn_bias  # [n_layers, d_model]
    checks = [
        check("embed + attention + MLP outputs (hooks) == residual entering the final norm",
              (decomposition.blocks_in_model_order() - decomposition.resid_final).abs().max().item(),
              relative(decomposition.resid_final)),
        check("heads + o_proj bias == each layer's attention output (hook_attn_out)",
              (heads_sum - decomposition.attn_out).abs().max().item(), relative(decomposition.attn_out)),
        check("DLA pieces add up to the model's metric (logits before soft-cap)",
              abs(attribution.total() - model_metric), tolerance(model.dtype, logits_pre_softcap, 1e-4)),
    ]
    if model.softcap:
        capped = model.softcap * torch.tanh(logits_pre_softcap.float() / model.softcap)
        checks.append(check(f"soft-cap {model.softcap:g} * tanh(lm_head / {model.softcap:g}) == model logits",
                            (capped - logits.float()).abs().max().item(), tolerance(model.dtype, logits, 1e-4)))
    return checks


# ----------------------------------------------------------------------------- ablations


def position0_share(cache, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How much position 0 dominates each component's output: its norm over the median norm of the others.

    Position 0 is the attention sink and often holds massive activations; where this ratio is large, a mean
    over the prompt's positions is mostly position 0's value. Returns (heads [n_layers, n_heads] from hook_z,
    mlps [n_layers] from hook_mlp_out), float32; 1.0 everywhere for one-token prompts.
    """
    z = torch.stack([cache[hooks.block_site("head", layer)][0] for layer in range(n_layers)]).float()  # [L, seq, H, hd]
    mlp = torch.stack([cache[hooks.block_site("mlp", layer)][0] for layer in range(n_layers)]).float()  # [L, seq, d]
    if z.shape[1] < 2:
        return torch.ones(z.shape[0], z.shape[2]), torch.ones(mlp.shape[0])

    def ratio(norms):  # [L, seq, ...] -> [L, ...]
        return norms[:, 0] / norms[:, 1:].median(dim=1).values.clamp_min(1e-12)

    return ratio(z.norm(dim=-1)).cpu(), ratio(mlp.norm(dim=-1)).cpu()


# ----------------------------------------------------------------------------- rankings


def top_indices(values: torch.Tensor, k: int, by: str = "abs") -> list[int]:
    """Indices of the k largest entries of a flat tensor: by "abs" (size, either sign) or "signed" (most positive)."""
    key = values.abs() if by == "abs" else values
    return torch.topk(key, min(k, values.numel())).indices.tolist()


def ranks(values: torch.Tensor) -> torch.Tensor:
    """values [n] -> the rank of each (0 = largest), ties broken by position."""
    order = torch.argsort(values, descending=True, stable=True)
    result = torch.empty_like(order)
    result[order] = torch.arange(len(values))
    return result


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two [n] tensors (the Pearson correlation of their ranks); nan when n < 2."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = ranks(a.float()).float(), ranks(b.float()).float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator else float("nan")
