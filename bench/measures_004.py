"""Measures of 004: batched activation patching against one forward per cell."""
from timing import median_seconds

CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"
BATCH_SIZE = 32  # 004's default BATCH_SIZE


def patching_batched_vs_loop() -> float:
    """Residual patching over all layers x positions: batched (BATCH_SIZE cells per forward) / one forward
    per cell. Both run every cell (no skipping of unchanged cells), with the same hooks and readout."""
    import torch

    from common import patching as P
    from common.models import load_model
    from common.prompts import encode, target_token
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", "cpu", "float32")
    clean, corrupt = encode(model, CLEAN), encode(model, CORRUPT)
    readout = P.answer_readout(target_token(model.tokenizer, CLEAN, "Paris").token_id,
                               target_token(model.tokenizer, CORRUPT, "Rome").token_id)
    names = P.site_hook_names("resid", model.n_layers)
    _, clean_acts = P.cache_activations(model, clean, names)
    cells = P.position_cells(names, clean.shape[1])  # 31 layers x 5 positions = 155 cells

    def run(batch_size):
        return lambda: P.patch_batched(model, corrupt, cells, clean_acts, readout, batch_size)
    batched = median_seconds(run(BATCH_SIZE), repeats=3, warmup=1)
    loop = median_seconds(run(1), repeats=3, warmup=0)  # the batched runs warmed the model up
    return batched / loop


MEASURES = [
    ("patching_batched_vs_loop", "<= 0.2", patching_batched_vs_loop),
]
