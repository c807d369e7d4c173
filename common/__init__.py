"""The lab's shared package: toggles, model loading, the logit lens, prompts and reports.

Every experiment's run.py imports from here and from nowhere else in the repo.
"""
