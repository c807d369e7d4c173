"""How many sequences run in one forward pass (`BATCH_SIZE = "auto"` in 003 and 004).

"auto" sizes the batch from the memory still free after loading and the model's shapes: each extra
sequence costs its activations (residual streams, MLP hidden states, eager attention scores, logits and
what the hooks keep), and the batch's share is kept to a fraction of the free memory and of the weights,
so a batch never needs more than a small part of what the model itself takes.
"""
from __future__ import annotations

import torch

from . import models

MAX_TOKENS_PER_FORWARD = 1024  # past this, a bigger batch is no faster on a CPU
FREE_SHARE = 0.25  # the batch may use at most this share of the free memory ...
WEIGHTS_SHARE = 0.10  # ... and of the weights' bytes (so 7-9B models stay near their weight size)
MIN_BUDGET = 512 * 1024 ** 2  # ... but always at least this much (small models: a 135M model batches ~24 short prompts)


def bytes_per_sequence(config, seq_len: int, itemsize: int) -> int:
    """Estimated activation bytes one sequence of `seq_len` tokens adds to a hooked forward pass.

    Per layer and token: residual, attention and MLP outputs and a cached site (4 x d_model), the MLP's
    hidden states (3 x d_ff), the eager attention scores (2 x n_heads x seq); plus the last position's
    logits in float32 (twice: logits and their softmax). Doubled for the allocator's slack.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_token_layer = 4 * text.hidden_size + 3 * text.intermediate_size + 2 * text.num_attention_heads * seq_len
    activations = text.num_hidden_layers * seq_len * per_token_layer * itemsize
    return 2 * (activations + 2 * 4 * text.vocab_size)


def auto_batch_size(config, dtype, seq_len: int, free_bytes: int, weight_bytes: int) -> int:
    """Sequences per forward: as many as fit the budget (see the module doc), at least 1."""
    budget = max(MIN_BUDGET, min(FREE_SHARE * free_bytes, WEIGHTS_SHARE * weight_bytes))
    per_sequence = bytes_per_sequence(config, seq_len, torch.finfo(dtype).bits // 8)
    fit = int(budget // per_sequence)
    return max(1, min(fit, MAX_TOKENS_PER_FORWARD // max(1, seq_len)))


def batch_size(setting, model, seq_len: int) -> int:
    """BATCH_SIZE for `model`: a number as given, or "auto" sized from free memory and the model's shapes."""
    if setting != "auto":
        return int(setting)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    free_bytes = models.available_memory_bytes(model.device)
    return auto_batch_size(model.config, model.dtype, seq_len, free_bytes, weight_bytes)
