"""The quality metrics on real RetinaMNIST: the floor, the false-alarm rate, run time and memory.

1. The floor: the real TRAIN split (1,080 images) scored as if it were a
   synthetic set, against the real TEST split (400), with the ResNet20
   extractor (`Metrics.features`, default fast config, seed 0), overall and per
   class. A synthetic set of the same size cannot be expected to score better.
   Also the val split (120 images, unseen by the extractor like synthetic
   images are) against test.
2. Memorisation's false alarms: held-out real TEST images checked against the
   train split; their share under the threshold is the rule's false-alarm rate.
3. Cost: wall time per step and peak resident memory for 1,000 and 10,000
   images per set, each size in a fresh process. RetinaMNIST has 1,600 images
   in all, so the image sets are drawn WITH REPLACEMENT from all of them
   (seeded): the timings are real, the metric values of these sets are not
   meaningful. A second block times the metrics alone on random Gaussian
   feature matrices of InceptionV3's width (2048), which no offline machine
   can embed.

    nice -n 10 .venv/bin/python benchmarks/bench_metrics.py --data_dir ../shared/data

Writes benchmarks/results/metrics.md (atomically). The extractor is cached
where `Utils.paths` puts it ($SDDG_OUTPUT_ROOT, else the current folder).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from Utils.cli import ArgumentParser, run_cli  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "metrics.md"
SIZES = (1000, 10000)
FEATURE_WIDTH_INCEPTION = 2048

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data_dir", default=None, help="folder holding retinamnist.npz")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="images per set for the cost rows")
parser.add_argument("--skip_inception_width", action="store_true", help="skip the 2048-d feature-matrix rows")
parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one cost row in a child process
parser.add_argument("--out", default=None, help=argparse.SUPPRESS)


def peak_rss_mib():
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed_metrics(reference, ref_labels, synthetic, syn_labels, train_features, seed):
    """Each metric once, overall, timed separately."""
    from Metrics.distribution import frechet_distance_from_features, gaussian_mmd2, kernel_inception_distance
    from Metrics.inception_score import inception_score
    from Metrics.memorization import memorization
    from Metrics.prdc import precision_recall_density_coverage

    steps = {
        "FID": lambda: frechet_distance_from_features(reference.features, synthetic.features),
        "KID (100 x 1000)": lambda: kernel_inception_distance(reference.features, synthetic.features, seed=seed),
        "Gaussian MMD²": lambda: gaussian_mmd2(reference.features, synthetic.features, seed=seed),
        "PRDC (k=5)": lambda: precision_recall_density_coverage(reference.features, synthetic.features, k=5),
        "IS": lambda: inception_score(synthetic.probabilities) if synthetic.probabilities is not None else None,
        "memorisation": lambda: memorization(train_features, synthetic.features),
    }
    times = {}
    for name, step in steps.items():
        started = time.perf_counter()
        step()
        times[name] = time.perf_counter() - started
    return times


def run_case(args):
    """One cost row, in this (fresh) process; prints a JSON line."""
    from Metrics.features import Embeddings

    kind, size = args.case.split(":")
    size = int(size)
    rng = np.random.default_rng(args.seed)
    out = {"kind": kind, "size": size}
    if kind == "resnet20":
        from Data.loaders import load_dataset
        from Metrics.features import build_extractor

        splits = load_dataset("retinamnist", args.data_dir)
        pool = np.concatenate([splits.x_train, splits.x_val, splits.x_test])
        pool_labels = np.concatenate([splits.y_train, splits.y_val, splits.y_test])
        extractor = build_extractor("resnet20", "retinamnist", data_dir=args.data_dir, seed=args.seed, splits=splits)
        syn_idx, ref_idx = rng.integers(0, len(pool), size), rng.integers(0, len(pool), size)
        out["rss_before_mib"] = peak_rss_mib()
        started = time.perf_counter()
        synthetic = extractor.embed(pool[syn_idx])
        reference = extractor.embed(pool[ref_idx])
        train = extractor.embed(splits.x_train)
        out["embed_s"] = time.perf_counter() - started
        syn_labels, ref_labels = pool_labels[syn_idx], pool_labels[ref_idx]
    else:
        d = FEATURE_WIDTH_INCEPTION
        out["rss_before_mib"] = peak_rss_mib()
        probs = rng.dirichlet(np.full(1000, 0.05), size=size).astype(np.float32)
        synthetic = Embeddings(rng.normal(size=(size, d)).astype(np.float32), probs)
        reference = Embeddings(rng.normal(0.05, 1.0, size=(size, d)).astype(np.float32), probs)
        train = Embeddings(rng.normal(size=(max(size, 1080), d)).astype(np.float32))
        syn_labels = ref_labels = None
        out["embed_s"] = None
    out["dim"] = int(synthetic.features.shape[1])
    out["metric_s"] = timed_metrics(reference, ref_labels, synthetic, syn_labels, train.features, args.seed)
    out["peak_rss_mib"] = peak_rss_mib()
    print("CASE " + json.dumps(out), flush=True)


def floor(args):
    """The floor and the memorisation false alarms with the ResNet20 extractor."""
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Metrics.features import ResNet20Features
    from Metrics.memorization import memorization
    from Metrics.quality import evaluate_images

    spec = get_spec("retinamnist")
    splits = load_dataset("retinamnist", args.data_dir)
    started = time.perf_counter()
    extractor = ResNet20Features.for_dataset("retinamnist", data_dir=args.data_dir, seed=args.seed, splits=splits)
    extractor_s = time.perf_counter() - started
    train_vs_test, _, timings = evaluate_images(spec, splits.x_train, splits.y_train, splits.x_test, splits.y_test,
                                                splits.x_train, extractor, seed=args.seed)
    val_vs_test, _, _ = evaluate_images(spec, splits.x_val, splits.y_val, splits.x_test, splits.y_test,
                                        splits.x_train, extractor, seed=args.seed)
    train_features = extractor.embed(splits.x_train).features
    false_alarms = memorization(train_features, extractor.embed(splits.x_test).features)
    pixel_alarms = memorization(splits.x_train.reshape(len(splits.x_train), -1).astype(np.float64),
                                splits.x_test.reshape(len(splits.x_test), -1).astype(np.float64))
    return {"extractor": extractor.describe(), "extractor_s": extractor_s, "train_vs_test": train_vs_test,
            "val_vs_test": val_vs_test, "floor_timings": timings,
            "false_alarms": {k: v for k, v in false_alarms.items() if k not in ("ratios", "nearest_train")},
            "pixel_false_alarms": {k: v for k, v in pixel_alarms.items() if k not in ("ratios", "nearest_train")}}


def child(args, case):
    command = [sys.executable, __file__, "--case", case, "--seed", str(args.seed)]
    if args.data_dir:
        command += ["--data_dir", args.data_dir]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CASE ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


NOTES = """## Reading these numbers

- The extractor was trained on the train images, so train-vs-test distances include its
  overfitting (train features sit more confidently in their classes); the val split (120 images,
  unseen like synthetic images) scores a lower FID against test despite its smaller size. For a
  synthetic x1 set (1,080 images) the train row is the like-for-like floor; keep this in mind.
- KID with ResNet20 features: the cubic kernel (x.y/d + 1)^3 on unnormalised 64-d ReLU features
  gives large, noisy values (kid_std is about kid_mean; with 400 test images every round uses all
  of them, so the spread comes from the other set's subsets). Differences of a few units are noise;
  the Gaussian-kernel MMD² (median bandwidth) is steadier. KID values are only comparable within
  one extractor.
- Per-class rows rest on 20 to 174 test images: FID is strongly biased upwards at such sizes
  (class 4: 66 vs 20 images), so compare classes of a synthetic set with these rows, not with
  each other.
- Cost: the metrics are matrix products (multi-threaded BLAS) plus, for FID, one scipy `sqrtm`
  of a d x d matrix (about 1 to 3 min at d = 2048 on this CPU, once overall and once per class).
  The machine was shared with other jobs (load average above), so the times are upper bounds and
  noisy (e.g. KID at 1,000 slower than at 10,000: same work per round, 100 rounds each).
"""


def _f(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def report(args, result, cases, command, elapsed):
    from Metrics.memorization import MEMORIZATION_THRESHOLD

    ex = result["extractor"]
    columns = ("fid", "kid_mean", "kid_std", "mmd2_gaussian", "precision", "recall", "density", "coverage")
    lines = [
        "# Quality metrics on real RetinaMNIST: the floor, false alarms, cost",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} "
        f"({os.cpu_count()} CPU cores, {platform.machine()}, no GPU; {elapsed / 60:.1f} min in all; "
        f"1-min load average {result['load_average']:.1f} at the start: other jobs shared the CPU, so "
        f"times are upper bounds).",
        "",
        f"Extractor: ResNet20 `features` layer, {ex['initial_filters']} initial filters, trained on the 1,080 "
        f"train images (best epoch {ex['best_epoch']} of {ex['epochs_run']}, val accuracy "
        f"{_f(ex['val_accuracy'], 3)}; {result['extractor_s']:.0f} s to "
        f"{'train' if ex['trained_now'] else 'load from its cache'} on this machine), "
        f"seed {args.seed}. Resize: {ex['resize_method']}.",
        "",
        "## The floor: real images scored as a synthetic set, against the real test split (400)",
        "",
        "A synthetic set of the same size should not be expected to score better than real images do. "
        "FID and PRDC depend on the set sizes: compare at equal sizes. KID: 100 subsets of "
        "min(1000, sizes) images.",
        "",
        "| set vs test | n | " + " | ".join(columns) + " | IS (domain) | label agreement |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- | --- |",
    ]
    for name, res in (("real train", result["train_vs_test"]), ("real val", result["val_vs_test"])):
        o = res["overall"]
        lines.append(f"| {name} | {o['n_synthetic']} | " + " | ".join(_f(o[c]) for c in columns)
                     + f" | {_f(o['inception_score_mean'], 3)} | {_f(o['label_agreement'], 3)} |")
    lines += ["", "Per class, real train vs real test:", "",
              "| class | n train | n test | " + " | ".join(columns) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for label, entry in result["train_vs_test"]["per_class"].items():
        lines.append(f"| {label} | {entry['n_synthetic']} | {entry['n_real']} | "
                     + " | ".join(_f(entry.get(c)) for c in columns) + " |")
    fa, pa = result["false_alarms"], result["pixel_false_alarms"]
    lines += [
        "",
        "## Memorisation: false alarms on held-out real images",
        "",
        f"The 400 real test images checked against the 1,080 train images (threshold "
        f"{MEMORIZATION_THRESHOLD:.3f} on d(s, nearest train t) / d(t, nearest other train)). "
        "Exact copies score 0.",
        "",
        "| features | suspected copies | min ratio | 1 % quantile | 5 % quantile | median |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| resnet20 | {fa['num_suspected']} / {fa['num_synthetic']} | {_f(fa['ratio_min'], 3)} | "
        f"{_f(fa['ratio_p01'], 3)} | {_f(fa['ratio_p05'], 3)} | {_f(fa['ratio_median'], 3)} |",
        f"| pixels | {pa['num_suspected']} / {pa['num_synthetic']} | {_f(pa['ratio_min'], 3)} | "
        f"{_f(pa['ratio_p01'], 3)} | {_f(pa['ratio_p05'], 3)} | {_f(pa['ratio_median'], 3)} |",
        "",
        "## Cost: run time and peak memory",
        "",
        "Each row in a fresh process. resnet20 rows: images drawn WITH REPLACEMENT from all 1,600 RetinaMNIST "
        "images (n synthetic and n reference images; memorisation against the 1,080 train images); timings "
        "include embedding. 2048-d rows: random Gaussian feature matrices of InceptionV3's width (n x 2048 "
        "per set, 1000 classes for IS), metrics only. Peak memory is the process's peak resident set "
        "(TensorFlow included in the resnet20 rows; before = after loading data and the extractor).",
        "",
        "| features | n per set | d | embed s | FID s | KID s | MMD s | PRDC s | IS s | memorisation s "
        "| peak RSS MiB (before) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        t = case["metric_s"]
        lines.append(
            f"| {case['kind']} | {case['size']:,} | {case['dim']} | {_f(case['embed_s'], 1)} | "
            f"{t['FID']:.2f} | {t['KID (100 x 1000)']:.2f} | {t['Gaussian MMD²']:.2f} | {t['PRDC (k=5)']:.2f} | "
            f"{t['IS']:.2f} | {t['memorisation']:.2f} | {case['peak_rss_mib']:.0f} ({case['rss_before_mib']:.0f}) |")
    lines += ["", NOTES]
    return "\n".join(lines)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.case:
        run_case(args)
        return 0
    from Utils.io import atomic_write_text

    command = "nice -n 10 .venv/bin/python benchmarks/bench_metrics.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    load_average = os.getloadavg()[0]
    result = floor(args)
    result["load_average"] = load_average
    print(json.dumps(result["train_vs_test"]["overall"], indent=1))
    cases = []
    for size in args.sizes:
        cases.append(child(args, f"resnet20:{size}"))
        print(cases[-1], flush=True)
    if not args.skip_inception_width:
        for size in args.sizes:
            cases.append(child(args, f"gaussian2048:{size}"))
            print(cases[-1], flush=True)
    atomic_write_text(RESULTS, report(args, result, cases, command.strip(), time.perf_counter() - started))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    run_cli(main)
