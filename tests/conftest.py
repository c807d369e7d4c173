"""Shared fixtures: the embedded model and tiny random models of four architectures, all offline."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # `make test` runs one worker per core: each (and the runs it starts) gets its share of the cores, set
    # before torch is imported, instead of every worker starting a thread per core.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ARCHITECTURES = ["llama", "qwen3", "mistral", "gemma2"]


@pytest.fixture(scope="session")
def embedded_folder():
    """The dequantized SmolLM2 folder (made on first use, then cached)."""
    from common.models import EMBEDDED_MODELS, dequantized_folder, embedded_gguf_path
    return dequantized_folder(embedded_gguf_path("smollm2-135m"), EMBEDDED_MODELS["smollm2-135m"].architecture)


@pytest.fixture(scope="session")
def embedded(embedded_folder):
    """SmolLM2-135M-Instruct loaded the way every run.py loads it (CPU, float32)."""
    from common.models import load_model
    return load_model("smollm2-135m", "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, embedded_folder):
    """{architecture: folder} of tiny random models saved like real checkpoints."""
    from tiny_models import build_tiny_model
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_model(name, root / name, embedded_folder) for name in ARCHITECTURES}


_loaded = {}


@pytest.fixture(params=ARCHITECTURES)
def tiny(request, tiny_folders):
    """Each tiny model, loaded through the same load_model path users use (cached per session)."""
    from common.models import load_model
    name = request.param
    if name not in _loaded:
        _loaded[name] = load_model(str(tiny_folders[name]), "cpu", "float32")
    return _loaded[name]


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an experiment's run.py as the user does, in a subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def run_in_process(script: str, *args: str) -> Path:
    """Run an experiment's main() in this process (one torch import for all of them; the tiny models load in
    well under a second). Grad mode, which 003 switches off globally, is restored afterwards."""
    import torch

    from common.config import parse_toggles
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"run_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.set_grad_enabled(True):
        return Path(module.main(parse_toggles(vars(module), list(args))))


def run_folders(out_dir) -> list:
    """The run folders an experiment wrote under OUT_DIR (<OUT_DIR>/<model>/<time>/), not the `latest` links."""
    return [p for p in out_dir.glob("*/*") if p.is_dir() and not p.is_symlink()]


def assert_fails_cleanly(result: subprocess.CompletedProcess, out_dir, fragment: str):
    """A bad input: exit code != 0, the last line names the problem, no traceback, no results written."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out_dir.exists() or not list(out_dir.rglob("results.json"))
