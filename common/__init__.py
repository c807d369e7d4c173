"""The lab's shared package: toggles, model loading, the logit lens, prompts and reports.

Every experiment's run.py imports from here and from nowhere else in the repo.
"""
import os

# On a Mac, a few operations have no MPS kernel yet; with this set (before torch is imported) torch runs them
# on the CPU instead of stopping. Loading on MPS says so. Set it to 0 yourself to see what is missing.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
