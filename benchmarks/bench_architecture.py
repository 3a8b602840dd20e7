"""Size and speed of the diffusion UNets: parameter counts, peak RSS of building, forward time.

Each measurement runs in its own process so peak RSS is that of one model alone. The
forward time of our sd1 UNet is measured side by side with keras-cv's DiffusionModel
(same inputs, `predict_on_batch` as keras-cv's sampler uses it, median of --repeats
after one warm-up call), so the ratio is comparable across machines.

    nice -n 10 .venv/bin/python benchmarks/bench_architecture.py            # everything, prints markdown
    .venv/bin/python benchmarks/bench_architecture.py --only tiny           # one model
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(which, image_size, batch, repeats, forward):
    """Builds one model, prints {params, build_s, peak_rss_gb, forward_s} as JSON."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    from Models.diffusion.presets import get_preset
    from Models.diffusion.unet import build_unet, timestep_embedding

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    if which == "keras_cv_sd1":
        from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel

        preset = get_preset("sd1")
        model = DiffusionModel(image_size, image_size, preset.context_length, download_weights=False)
    else:
        preset = get_preset(which)
        model = build_unet(preset, image_size)
    build_s = time.perf_counter() - start
    result = dict(model=which, params=model.count_params(), build_s=round(build_s, 1),
                  build_peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    if forward:
        rng = np.random.default_rng(0)
        s = image_size // preset.downsample
        inputs = [
            rng.standard_normal((batch, s, s, preset.latent_channels)).astype("float32"),
            keras.ops.convert_to_numpy(timestep_embedding(np.arange(batch) * 100, preset.timestep_embedding_dim)),
            rng.standard_normal((batch, preset.context_length, preset.context_dim)).astype("float32"),
        ]
        model.predict_on_batch(inputs)  # warm-up: traces the graph
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict_on_batch(inputs)
            times.append(time.perf_counter() - start)
        result.update(forward_s=round(statistics.median(times), 2), forward_runs=[round(t, 2) for t in times],
                      image_size=image_size, batch=batch,
                      peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    print("RESULT " + json.dumps(result), flush=True)


def run_child(which, image_size, batch, repeats, forward):
    command = [sys.executable, __file__, "--child", which, "--image_size", str(image_size),
               "--batch", str(batch), "--repeats", str(repeats)] + (["--forward"] if forward else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "sd1", "sd2", "keras_cv_sd1"])
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.image_size, args.batch, args.repeats, args.forward)
        return
    plan = [(args.only, True)] if args.only else [
        ("tiny", True), ("sd1", True), ("keras_cv_sd1", True), ("sd2", False)]
    rows = []
    for which, forward in plan:
        size = 28 if which == "tiny" else args.image_size
        rows.append(run_child(which, size, args.batch, args.repeats, forward))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | parameters | build (s) | peak RSS after build (GiB) | forward (s) | image px, batch |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        forward = f"{r['forward_s']} (runs {r['forward_runs']})" if "forward_s" in r else "-"
        shape = f"{r['image_size']}, {r['batch']}" if "forward_s" in r else "-"
        print(f"| {r['model']} | {r['params']:,} | {r['build_s']} | {r['build_peak_rss_gb']} | {forward} | {shape} |")


if __name__ == "__main__":
    main()
