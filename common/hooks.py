"""The TransformerLens bridge's hook point names, in one place.

TransformerLens' own `get_act_name` spells the per-block names ("blocks.3.attn.hook_z"); this module adds
the lab's layer convention for the residual stream and the few names it does not cover (the final norm,
Gemma's post-attention norm, the logits).

Residual layer convention (as the lens): layer 0 = the residual entering block 0 (the embeddings),
layer l = the residual after block l - 1, for l = 1..n_layers.
"""
from __future__ import annotations

from transformer_lens.utilities import get_act_name

FINAL_NORM_INPUT = "ln_final.hook_in"  # [batch, pos, d_model]: the residual entering the final norm
FINAL_NORM_SCALE = "ln_final.hook_scale"  # [batch, pos, 1]: the final norm's sqrt(mean(x^2) + eps)
LOGITS = "unembed.hook_out"  # [batch, pos, vocab]

# A patching or ablation site -> the name TransformerLens gives its activation in one block.
SITE_ACTIVATIONS = {"attn": "attn_out", "mlp": "mlp_out", "head": "z", "pattern": "pattern"}


def resid(layer: int) -> str:
    """Residual layer `layer` (0 = embeddings entering block 0, l = the output of block l - 1)."""
    return get_act_name("resid_pre", 0) if layer == 0 else get_act_name("resid_post", layer - 1)


def block_site(site: str, block: int) -> str:
    """The hook of `site` ("attn": attention output [b, pos, d_model], "mlp": MLP output [b, pos, d_model],
    "head": per-head z [b, pos, head, d_head], "pattern": [b, head, query, key]) in `block`."""
    return get_act_name(SITE_ACTIVATIONS[site], block)


def site_names(site: str, n_layers: int) -> list[str]:
    """One hook name per layer row: n_layers + 1 for "resid", one per block (n_layers) otherwise."""
    if site == "resid":
        return [resid(layer) for layer in range(n_layers + 1)]
    return [block_site(site, block) for block in range(n_layers)]


def post_attention_norm_scale(block: int) -> str:
    """Gemma-2/3's norm on the attention output of `block`: its sqrt(mean(x^2) + eps), [b, pos, 1]."""
    return f"blocks.{block}.ln1_post.hook_scale"
