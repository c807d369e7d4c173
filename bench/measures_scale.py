"""Measures of issue 10 (ready for 7-9B models): peak memory on a shape-faithful stand-in.

The stand-in is Meta-Llama-3-8B's config (model-configs/) with its full width (4096), heads (32 / 8 KV),
MLP (14336) and vocabulary (128256) but 2 of its 32 layers: 1.49B parameters, 2.97 GB in bfloat16.
Two layers because this machine has 2 CPU cores and 24 GB shared by several people: building, writing a
GGUF of and running a 32-layer model would take ~16 GB and tens of minutes per run. The memory that
scales with the model (weights, their copies while loading or converting) is the same per byte at any
depth; the embedding and unembedding, the largest single tensors, are at full size.
Each figure is the peak RSS (ru_maxrss) of a fresh process, as in measures_001.
"""
import shutil
import tempfile
from pathlib import Path

from timing import REPO, run_python

STANDIN = "meta-llama-3-8b"
LAYERS = 2
_work = {}  # built once per bench run: {"root", "folder", "gguf", "bare"}


def _standin() -> dict:
    """Build the stand-in (bfloat16, with the embedded SmolLM2 tokenizer) in a temporary folder, once."""
    if not _work:
        from common.models import EMBEDDED_MODELS, dequantized_folder, embedded_gguf_path
        from common.standins import weight_bytes
        root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        tokenizer = dequantized_folder(embedded_gguf_path("smollm2-135m"), EMBEDDED_MODELS["smollm2-135m"].architecture)
        # Built in a child process, so this one stays small while the measured processes run.
        run_python(f"from common.standins import build_standin; build_standin({STANDIN!r}, {str(root / 'standin')!r}, "
                   f"'bfloat16', {LAYERS}, tokenizer_folder={str(tokenizer)!r})")
        _, bare = run_python("import torch, transformers")
        _work.update(root=root, folder=root / "standin", bare=bare, weights=weight_bytes(STANDIN, LAYERS))
        import atexit
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    return _work


def scale_load_peak_rss_vs_weights() -> float:
    """Peak RSS of load_model on the stand-in (cpu, bfloat16) and one 3-token forward / (16-bit weights + bare
    torch+transformers). The forward is included because the weights are memory-mapped: loading alone reads
    almost nothing (measured 0.18), the first forward pages every layer in."""
    work = _standin()
    _, peak = run_python(f"import torch; from common.models import load_model; "
                         f"m = load_model({str(work['folder'])!r}, 'cpu', 'bfloat16'); "
                         f"torch.set_grad_enabled(False); m.hf_model(torch.tensor([[1, 2, 3]]))",
                         {"HF_HUB_OFFLINE": "1"})
    return peak / (work["weights"] + work["bare"])


RUNS = {  # small runs: every experiment's real path, few prompts
    "001_layers_and_logits": ["--PROMPT_FORMAT=completion", "--PARAPHRASES=False", "--DIRECTION_PROBES=False",
                              "--FACTS=8"],
    "002_attention_patterns": ["--FACTS=0"],
    "003_circuit_analysis": ["--ABLATE_EVERY=False", "--FACTS=0"],
    "004_activation_patching": ["--SITES=['resid', 'head']", "--NOISE_TRACING=False"],
}


def scale_run_peak_rss_vs_weights() -> float:
    """The largest peak RSS over small runs of 001-004 on the stand-in / the same denominator."""
    work = _standin()
    peaks = {}
    for experiment, args in RUNS.items():
        argv = ["run.py", f"--MODEL={work['folder']}", "--DEVICE=cpu", "--DTYPE=bfloat16",
                f"--OUT_DIR={work['root'] / 'runs'}", *args]
        _, peaks[experiment] = run_python(f"import runpy, sys; sys.argv = {argv!r}; "
                                          f"runpy.run_path('{REPO / experiment / 'run.py'}', run_name='__main__')",
                                          {"HF_HUB_OFFLINE": "1"})
    print("  peak RSS GB: " + ", ".join(f"{e[:3]} {p / 1e9:.2f}" for e, p in peaks.items()), flush=True)
    return max(peaks.values()) / (work["weights"] + work["bare"])


def gguf_convert_peak_rss_vs_weights() -> float:
    """Peak RSS of converting a Q8_0 GGUF of the stand-in (written with the gguf package) to float16 /
    the 16-bit weight bytes."""
    work = _standin()
    if "gguf" not in work:
        work["gguf"] = work["root"] / "standin.Q8_0.gguf"
        run_python(f"from common.standins import write_llama_gguf; "
                   f"write_llama_gguf({str(work['folder'])!r}, {str(work['gguf'])!r}, 'Q8_0')")
    code = (f"from pathlib import Path; from common.models import dequantized_folder; "
            f"dequantized_folder(Path({str(work['gguf'])!r}), dtype_name='float16')")
    _, peak = run_python(code, {"HF_HUB_OFFLINE": "1", "LAB_CACHE_DIR": str(work["root"] / "cache")})
    return peak / work["weights"]


MEASURES = [
    ("scale_load_peak_rss_vs_weights", "<= 1.10", scale_load_peak_rss_vs_weights),
    ("scale_run_peak_rss_vs_weights", "<= 1.25", scale_run_peak_rss_vs_weights),
    ("gguf_convert_peak_rss_vs_weights", "<= 1.3", gguf_convert_peak_rss_vs_weights),
]
