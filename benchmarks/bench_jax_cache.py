"""JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) on a training run, side by side.

The workload is the JAX resume test's (tests/test_recipe_jax.py): `SD_adapting.py`'s tiny enc stage on
digits run through once, then killed after its first checkpoint and run again, all in one process, so
the same train step is compiled three times. Each round runs it in a fresh process three ways:

    off    no cache: every compile is XLA's
    cold   an empty cache: the first compile fills it, the next two load it
    warm   the cache that `cold` filled: a later process (the next stage, a rerun) loads every step

and checks that the resumed run still ends bit for bit where the uninterrupted one does.

    python benchmarks/bench_jax_cache.py --rounds 2     # runs its workload under KERAS_BACKEND=jax itself
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.test_recipe_jax import JAX_RESUME as WORKLOAD  # noqa: E402  the test's own run, one copy
from Utils.cli import positive_int  # noqa: E402


def run_once(cache_dir, work_dir):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WORKLOAD, str(work_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        sys.exit(f"error: the workload failed: {last}")
    differences = json.loads(done.stdout.split("DIFFERENCES")[1].strip().splitlines()[0])
    return wall, differences


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=2)
    args = parser.parse_args()
    walls = {"off": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            cache = Path(scratch) / f"cache_{round_}"
            for mode, cache_dir in (("off", None), ("cold", cache), ("warm", cache)):
                wall, differences = run_once(cache_dir, Path(scratch) / f"{mode}_{round_}")
                exact = all(v == 0.0 for v in differences.values())
                walls[mode].append(wall)
                print(f"round {round_ + 1} {mode}: {wall:.1f} s, resumed run bit for bit: {exact}", flush=True)
                if not exact:
                    sys.exit(f"error: the resumed run differs with the cache {mode}: {differences}")
    off = statistics.median(walls["off"])
    for mode in ("off", "cold", "warm"):
        median = statistics.median(walls[mode])
        print(f"{mode}: median {median:.1f} s wall ({off / median:.2f}x against off)")


if __name__ == "__main__":
    main()
