"""Small timing helpers shared by the bench measures."""
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def interleaved_times(functions: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Wall times of each function over `repeats` calls, timed in turns (a, b, a, b, ...) after `warmup`
    turns: a busy machine then slows every side alike. Returns {name: [seconds, ...]}."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def alternating_medians(functions: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Median wall time of each function, timed in turns (interleaved_times): one interruption does not
    decide. Returns {name: seconds}."""
    return {name: sorted(ts)[len(ts) // 2] for name, ts in interleaved_times(functions, repeats, warmup).items()}


def run_python(code: str, env: dict | None = None) -> tuple[float, int]:
    """Run `code` in a fresh Python process; return (wall seconds, peak resident bytes of that process)."""
    # Linux: VmHWM of this process's own memory. ru_maxrss is not used there: Linux carries the parent's
    # RSS high-water mark across fork + exec, so a big bench process would inflate every child's figure.
    report_peak = ("import atexit, resource, sys\n"
                   "def _peak():\n"
                   "    try:\n"
                   "        return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                   "    except OSError:\n"
                   "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                   "atexit.register(lambda: print('PEAK_RSS', _peak(), file=sys.stderr))\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", report_peak + code], cwd=REPO, env={**os.environ, **(env or {})},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed:\n{done.stderr[-2000:]}")
    peak = int([line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS")][-1].split()[1])
    return seconds, peak * (1 if sys.platform == "darwin" else 1024)  # ru_maxrss: bytes on macOS, KiB on Linux
