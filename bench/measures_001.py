"""Measures of the foundation and 001: the lens sweep, cached model start, peak memory."""
import tempfile

from timing import REPO, alternating_medians, run_python

PROMPT = "The capital of France is"


def lens_sweep_vs_forward() -> float:
    """001's whole per-prompt work (forward with the cache + all-layer lens) / one plain HF forward.

    Both sides compute logits for the last position only (the lens reads that position), timed in turns.
    Also prints the floor that no lens implementation can go under: the plain forward plus the one step the
    lens cannot skip, unembedding every layer's residual (n_layers + 1 rows of [vocab, d_model]), over the
    forward. With SmolLM2's 49k-token vocabulary and 576-wide residual that step alone is ~0.4 forwards on
    2 CPU cores; at an 8B model's shapes it is a few percent of a forward (4096 x 128k per layer against
    ~218M weights per layer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from common import lens
    from common.models import load_model
    from common.prompts import encode, target_token
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", "cpu", "float32")
    plain = AutoModelForCausalLM.from_pretrained(model.folder, dtype=torch.float32).eval()  # HF defaults
    ids = encode(model, PROMPT)
    target = target_token(model.tokenizer, PROMPT, "Paris").token_id
    resid, _ = lens.residual_stream(model, ids)  # [n_layers + 1, d_model]
    times = alternating_medians({"forward": lambda: plain(ids, logits_to_keep=1),
                                 "sweep": lambda: lens.sweep(model, ids, target, use_norm=True, top_k=5),
                                 "floor": lambda: (plain(ids, logits_to_keep=1), lens.unembed(model, resid, True))})
    print(f"  floor (plain forward + unembedding the {model.n_layers + 1} layers, nothing else) / forward: "
          f"{times['floor'] / times['forward']:.3f}; medians " + ", ".join(
              f"{name} {seconds * 1000:.1f} ms" for name, seconds in times.items()), flush=True)
    return times["sweep"] / times["forward"]


def lens_batched_vs_sequential() -> float:
    """001's per-prompt lens work (residual stream, NORM unembedding of every layer, lens metrics and the
    self-check) for 100 fact prompts: in padded batches (`lens.sweeps`) / one prompt at a time (`lens.sweep`).

    Both sides run after a warm-up, timed in turns; each call is ~10-30 s, so 3 repeats."""
    import torch

    from common import lens
    from common.facts import load_fact_set
    from common.models import load_model
    from common.prompts import encode, render_fact, target_token
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", "cpu", "float32")
    texts = [render_fact(model.tokenizer, fact, "completion") for fact in
             load_fact_set(REPO / "001_layers_and_logits" / "prompts.json")[:100]]
    prompts = [encode(model, p.text) for p in texts]
    targets = [target_token(model.tokenizer, p.text, p.target).token_id for p in texts]
    times = alternating_medians({
        "sequential": lambda: [lens.sweep(model, ids, t, use_norm=True, top_k=5) for ids, t in zip(prompts, targets)],
        "batched": lambda: lens.sweeps(model, prompts, targets, use_norm=True, top_k=5, batch_size="auto")},
        repeats=3, warmup=1)
    return times["batched"] / times["sequential"]


def cached_start_vs_first() -> float:
    """Model start from the dequantized cache / the first start that dequantizes the GGUF (fresh processes)."""
    code = "from common.models import load_model; load_model('smollm2-135m', 'cpu', 'float32')"
    with tempfile.TemporaryDirectory() as cache:
        first, _ = run_python(code, {"LAB_CACHE_DIR": cache})
        cached, _ = run_python(code, {"LAB_CACHE_DIR": cache})
    return cached / first


def peak_rss_vs_weights() -> float:
    """Peak resident memory of a 001 run / (fp32 weight bytes + a bare `import torch, transformers` process)."""
    from common.models import load_model, parameter_count
    weights = parameter_count(load_model("smollm2-135m", "cpu", "float32").config) * 4
    _, bare = run_python("import torch, transformers")
    with tempfile.TemporaryDirectory() as out:
        _, peak = run_python(f"import runpy, sys; sys.argv = ['run.py', '--OUT_DIR={out}']; "
                             f"runpy.run_path('{REPO / '001_layers_and_logits' / 'run.py'}', run_name='__main__')")
    return peak / (weights + bare)


MEASURES = [
    ("lens_sweep_vs_forward", "<= 1.3", lens_sweep_vs_forward),
    ("lens_batched_vs_sequential", "<= 0.4", lens_batched_vs_sequential),
    ("cached_start_vs_first", "<= 0.25", cached_start_vs_first),
    ("peak_rss_vs_weights", "<= 1.5", peak_rss_vs_weights),
]
