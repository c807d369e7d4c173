"""`make bench`: speed and memory of the lab, as ratios against plain Hugging Face measured in the same run.

Prints one line per measure, `RATIO <name> <value>`, then the goal. Ratios, not seconds, so the numbers
mean the same on a laptop and on CI. Each measure lives in a bench/measures_*.py module; run one with
`python bench/bench.py lens_sweep_vs_forward`.
"""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent
# Each bench/measures_*.py lists its MEASURES = [(name, goal text, function returning the ratio)].
MEASURES = [measure for path in sorted(HERE.glob("measures_*.py"))
            for measure in importlib.import_module(path.stem).MEASURES]


def main(selected: list[str]):
    unknown = set(selected) - {name for name, _, _ in MEASURES}
    if unknown:
        sys.exit(f"Unknown measure(s) {', '.join(sorted(unknown))}: choose from "
                 f"{', '.join(name for name, _, _ in MEASURES)}.")
    for name, goal, measure in MEASURES:
        if selected and name not in selected:
            continue
        ratio = measure()
        print(f"RATIO {name} {ratio:.3f}    (goal {goal})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
