"""How a synthetic dataset differs from the real one: every metric, overall and per class.

`evaluate_synthetic` is what `evaluate_dataset.py` (and the pipeline report)
calls: it reads a folder of class sub-folders (ours or any other
implementation's), embeds it and the real data with one extractor
(`Metrics.features`), and returns, overall and for each class:

| metric | question | better |
| --- | --- | --- |
| `fid` (Fréchet distance of the embeddings) | realism + variety, one number | lower |
| `kid_mean`, `kid_std` (unbiased MMD², cubic kernel, over subsets) | same, unbiased at small sample sizes | lower |
| `mmd2_gaussian` (+ `mmd_bandwidth`, the median heuristic) | same, Gaussian kernel | lower |
| `precision`, `density` | realism: synthetic samples lie where real ones do | higher |
| `recall`, `coverage` | representation: the real data's modes are reached | higher |
| `inception_score_mean`, `_std` (overall only) | confident and varied classes | higher |
| `label_agreement` (resnet20 only) | share of synthetic images the extractor puts in their own class | higher |
| `memorization` | novelty: share of suspected copies of TRAINING images | lower |

The REFERENCE real set the synthetic set is compared with is the real TEST
split by default (`reference="test"`): the ResNet20 extractor was trained on
the train split, so train images sit unnaturally well in its feature space;
test images are, like synthetic ones, new to it. The floor every synthetic set
is measured against is the real TRAIN split scored the same way (what a
perfect generator's samples would score; `benchmarks/bench_metrics.py`). Sample
sizes bias FID (upwards, strongly) and PRDC: compare sets only at equal sizes
(`n_synthetic`, `n_real` are recorded). Memorisation always compares with the
whole train split.

Images of any size are first brought to the dataset's native size (as the CAS
classifier sees them; `Data.synthetic.load_image_folder`), then to the
extractor's input size, with the one antialiased resize; real images take the
same path, so neither side is favoured by the resampling.

Results are merged into `CAS Results/quality_exp{exp}.json`:

    {dataset: {synthetic folder: {extractor: {"overall": {...}, "per_class": {label: {...}},
                                               "memorization": {...}, "settings": {...}, ...}}}}

Example:
    >>> result = evaluate_synthetic("retinamnist", "Data/Synthetic/Exp_0/retinamnist", exp=0,
    ...                             data_dir="../shared/data", features="resnet20")
    >>> result["overall"]["fid"], result["per_class"]["0"]["kid_mean"]
    >>> # in hyp_opt.py --objective kid, per trial (no classifier training per trial):
    >>> kid = kid_objective(images, labels, splits.x_train, splits.y_train, seed=0)
"""

import hashlib
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from Metrics.distribution import frechet_distance_from_features, gaussian_mmd2, kernel_inception_distance
from Metrics.errors import MetricsError
from Metrics.features import FEATURE_EXTRACTORS, Embeddings, ResNet20Features, build_extractor
from Metrics.inception_score import inception_score
from Metrics.memorization import MEMORIZATION_THRESHOLD, memorization
from Metrics.prdc import precision_recall_density_coverage

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRDC_K = 5
IS_SPLITS = 10
# Images per set (synthetic, reference) unless told otherwise: FID's usual 10k.
DEFAULT_NUM_SAMPLES = 10000
REFERENCE_SPLITS = ("test", "val", "train")
CLOSEST_PAIRS_IN_GRID = 16


# ------------------------------------------------------------ the metrics
def distribution_metrics(real_features, synthetic_features, k=PRDC_K, kid_subsets=KID_SUBSETS,
                         kid_subset_size=KID_SUBSET_SIZE, seed=0):
    """FID, KID, Gaussian MMD² and PRDC between two feature matrices.

    A metric the sample sizes cannot support (FID/KID/MMD need 2 per set, PRDC
    more than k) is None, with the reason in "skipped".
    """
    n_real, n_syn = len(real_features), len(synthetic_features)
    out = {"n_real": int(n_real), "n_synthetic": int(n_syn)}
    skipped = []
    if min(n_real, n_syn) >= 2:
        out["fid"] = frechet_distance_from_features(real_features, synthetic_features)
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(
            real_features, synthetic_features, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        out["kid_subset_size"] = int(min(kid_subset_size, n_real, n_syn))
        out["mmd2_gaussian"], out["mmd_bandwidth"] = gaussian_mmd2(real_features, synthetic_features, seed=seed)
    else:
        out.update(fid=None, kid_mean=None, kid_std=None, mmd2_gaussian=None, mmd_bandwidth=None)
        skipped.append("fid/kid/mmd need at least 2 images per set")
    if min(n_real, n_syn) > k:
        prdc = precision_recall_density_coverage(real_features, synthetic_features, k=k)
        out.update({name: prdc[name] for name in ("precision", "recall", "density", "coverage")})
    else:
        out.update(precision=None, recall=None, density=None, coverage=None)
        skipped.append(f"precision/recall/density/coverage need more than k={k} images per set")
    if skipped:
        out["skipped"] = skipped
    return out


def compute_quality(reference, reference_labels, synthetic, synthetic_labels, train_features, label_names,
                    probabilities_are_labels=False, seed=0, k=PRDC_K, kid_subsets=KID_SUBSETS,
                    kid_subset_size=KID_SUBSET_SIZE, is_splits=IS_SPLITS,
                    memorization_threshold=MEMORIZATION_THRESHOLD):
    """All metrics, overall and per class, from embeddings.

    Args:
        reference, synthetic: `Embeddings` of the real reference set and of the synthetic set.
        reference_labels, synthetic_labels: their integer labels.
        train_features: features of the real TRAIN split (for memorisation).
        label_names: the dataset's class names (index = label).
        probabilities_are_labels: the extractor's classes are the dataset's
            (resnet20): adds `label_agreement`.

    Returns:
        (result, memo): result = {"overall", "per_class", "memorization"} (JSON-able);
        memo = the full `memorization` output (per-image ratios) for the grid.
    """
    reference_labels = np.asarray(reference_labels).reshape(-1)
    synthetic_labels = np.asarray(synthetic_labels).reshape(-1)
    options = dict(k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)

    overall = distribution_metrics(reference.features, synthetic.features, **options)
    if synthetic.probabilities is not None:
        # The folder is read class by class: shuffle so every IS split holds all classes.
        order = np.random.default_rng(seed).permutation(len(synthetic))
        overall["inception_score_mean"], overall["inception_score_std"] = inception_score(
            synthetic.probabilities[order], splits=is_splits)
        order = np.random.default_rng(seed).permutation(len(reference))
        overall["reference_inception_score_mean"], _ = inception_score(
            reference.probabilities[order], splits=is_splits)
    if probabilities_are_labels and synthetic.probabilities is not None:
        predicted = synthetic.probabilities.argmax(axis=1)
        overall["label_agreement"] = float(np.mean(predicted == synthetic_labels))
        overall["reference_label_agreement"] = float(np.mean(reference.probabilities.argmax(1) == reference_labels))

    memo = memorization(train_features, synthetic.features, threshold=memorization_threshold)
    suspected = memo["ratios"] < memorization_threshold

    per_class = {}
    for label, name in enumerate(tqdm(label_names, desc="per-class metrics", unit="class", leave=False)):
        syn_mask, ref_mask = synthetic_labels == label, reference_labels == label
        if not syn_mask.any():
            per_class[str(label)] = {"name": str(name), "n_synthetic": 0, "n_real": int(ref_mask.sum()),
                                     "skipped": ["no synthetic image of this class"]}
            continue
        entry = {"name": str(name), **distribution_metrics(reference.features[ref_mask],
                                                           synthetic.features[syn_mask], **options)}
        entry["memorization_share"] = float(suspected[syn_mask].mean())
        if probabilities_are_labels and synthetic.probabilities is not None:
            entry["label_agreement"] = float(np.mean(synthetic.probabilities[syn_mask].argmax(1) == label))
        per_class[str(label)] = entry

    summary = {key: value for key, value in memo.items() if key not in ("ratios", "nearest_train")}
    return {"overall": overall, "per_class": per_class, "memorization": summary}, memo


# --------------------------------------------------------- images → result
def evaluate_images(spec, synthetic_images, synthetic_labels, reference_images, reference_labels,
                    train_images, extractor, seed=0, **metric_options):
    """Embeds three image sets with `extractor` and runs `compute_quality`.

    Returns (result, memo, timings) — see `compute_quality`; timings in seconds.
    """
    timings = {}
    started = time.perf_counter()
    synthetic = extractor.embed(synthetic_images, desc="synthetic features")
    reference = extractor.embed(reference_images, desc="reference features")
    train = extractor.embed(train_images, desc="train features")
    timings["embed_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    result, memo = compute_quality(
        reference, reference_labels, synthetic, synthetic_labels, train.features, spec.label_names,
        probabilities_are_labels=extractor.classes_are_dataset_labels, seed=seed, **metric_options)
    timings["metrics_s"] = round(time.perf_counter() - started, 2)
    return result, memo, timings


def subsample(images, labels, num_samples, seed):
    """At most `num_samples` rows, drawn at random without replacement (seeded), order kept."""
    if num_samples is None or len(images) <= num_samples:
        return images, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(images), int(num_samples), replace=False))
    return images[keep], labels[keep]


def _count_image_files(folder):
    from Data.synthetic import IMAGE_EXTENSIONS

    return sum(1 for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
               and not p.name.startswith(".") and p.parent != Path(folder))


def folder_key(folder):
    """How a synthetic folder is named in the results JSON: relative to the output root when inside it."""
    from Utils.paths import output_root

    folder = Path(folder).resolve()
    try:
        return folder.relative_to(Path(output_root()).resolve()).as_posix()
    except ValueError:
        return folder.as_posix()


def closest_pairs_png(exp, dataset, key, features):
    """Where the grid of the most copy-like pairs goes, beside the results JSON."""
    from Utils.paths import dataset_folder, quality_results_json

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "folder"
    return quality_results_json(exp).parent / f"quality_exp{exp}" / dataset_folder(dataset) / f"{slug}__{features}_closest_pairs.png"


def save_closest_pairs(memo, synthetic_images, train_images, path, count=CLOSEST_PAIRS_IN_GRID):
    """A two-row PNG: the `count` most copy-like synthetic images over their nearest training images."""
    from Data.images import save_image_grid

    chosen = memo["closest"][:count]
    nearest = memo["closest_train"][:count]
    ratios = ", ".join(f"{r:.2f}" for r in memo["closest_ratio"][:8])
    images = np.concatenate([synthetic_images[chosen], train_images[nearest]])
    rows = np.repeat([0, 1], len(chosen))
    title = (f"most copy-like synthetic images (top) over their nearest real training image; "
             f"ratio d(s,t)/d(t,t'): {ratios}{', ...' if len(chosen) > 8 else ''}; "
             f"suspected copy if < {memo['threshold']:.2f}")
    return save_image_grid(images, rows, ["synthetic", "nearest train"], path, per_class=len(chosen), title=title)


def evaluate_synthetic(dataset, synthetic_dir, exp=0, data_dir=None, features="resnet20",
                       num_samples=DEFAULT_NUM_SAMPLES, seed=0, reference="test", extractor=None,
                       extractor_config=None, write=True, grid=True, verbose=True, splits=None, **metric_options):
    """Every metric for a folder of class sub-folders against the real dataset; returns the result dict.

    Args:
        dataset: a registered dataset name.
        synthetic_dir: a folder of class sub-folders (`Data.synthetic.load_image_folder` rules).
        exp: experiment identifier (results file, extractor cache).
        data_dir: where the real data lives (None: the default cache).
        features: "resnet20" or "inception" (ignored when `extractor` is given).
        num_samples: at most this many synthetic images (class-balanced) and
            reference images (random); None: all.
        seed: every random draw (subsets, KID subsets, extractor training).
        reference: the real split the synthetic set is compared with ("test", "val", "train").
        extractor: an already-built extractor (`Metrics.features`), else built here.
        extractor_config: the ResNet20 extractor's `ClassifierConfig` (default: the fast one).
        write: merge the result into `CAS Results/quality_exp{exp}.json`.
        grid: write the PNG of the closest synthetic/train pairs.
        splits: the already-loaded real `Data.loaders.Splits` (else loaded from `data_dir`).
        **metric_options: k, kid_subsets, kid_subset_size, is_splits, memorization_threshold.
    """
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Data.synthetic import format_report, load_image_folder

    spec = splits.spec if splits is not None else get_spec(dataset)
    if reference not in REFERENCE_SPLITS:
        raise MetricsError(f"unknown reference split '{reference}'; choose from: {', '.join(REFERENCE_SPLITS)}")
    if extractor is None and features not in FEATURE_EXTRACTORS:
        raise MetricsError(f"unknown feature extractor '{features}'; choose from: {', '.join(FEATURE_EXTRACTORS)}")
    if num_samples is not None and num_samples <= 0:
        raise MetricsError(f"num_samples must be a positive number of images, got {num_samples}")
    folder = Path(synthetic_dir)
    if not folder.is_dir():
        raise MetricsError(f"synthetic data folder {folder} does not exist")
    started = time.perf_counter()

    splits = splits if splits is not None else load_dataset(spec.name, data_dir)
    take = num_samples if num_samples is not None and _count_image_files(folder) > num_samples else None
    x_syn, y_syn, report = load_image_folder(folder, spec, take=take, seed=seed)
    if verbose:
        print("\n".join(format_report(report)), flush=True)
    x_ref, y_ref = subsample(getattr(splits, f"x_{reference}"), getattr(splits, f"y_{reference}"),
                             num_samples, seed)
    if extractor is None:
        extractor = build_extractor(features, spec.name, exp=exp, data_dir=data_dir, seed=seed,
                                    config=extractor_config, splits=splits, verbose=2 if verbose else 0)

    result, memo, timings = evaluate_images(spec, x_syn, y_syn, x_ref, y_ref, splits.x_train, extractor,
                                            seed=seed, **metric_options)
    key = folder_key(folder)
    if grid:
        path = closest_pairs_png(exp, spec.name, key, extractor.name)
        save_closest_pairs(memo, x_syn, splits.x_train, path)
        result["memorization"]["closest_pairs_png"] = str(path)
    options = {"k": PRDC_K, "kid_subsets": KID_SUBSETS, "kid_subset_size": KID_SUBSET_SIZE,
               "is_splits": IS_SPLITS, "memorization_threshold": MEMORIZATION_THRESHOLD, **metric_options}
    result["settings"] = {
        "dataset": spec.name, "exp": str(exp), "synthetic_dir": key, "reference_split": reference,
        "num_samples": num_samples, "seed": int(seed), **options, **extractor.describe(),
    }
    result["folder_report"] = {name: report[name] for name in
                               ("label_rule", "counts", "total", "missing_classes", "warnings", "resized_from")}
    result["folder_report"]["unreadable_files"] = len(report["unreadable_files"])
    timings["total_s"] = round(time.perf_counter() - started, 2)
    result["timings"] = timings
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if write:
        from Utils.io import merge_json
        from Utils.paths import quality_results_json

        merge_json(quality_results_json(exp), {spec.name: {key: {extractor.name: result}}})
    return result


# ------------------------------------------------- the tuning objective
_EXTRACTOR_CACHE = {}
_REFERENCE_CACHE = {}


def _digest(*arrays):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def kid_extractor(real_images, real_labels, seed=0, features="resnet20", config=None):
    """The extractor `kid_objective` uses, built once per process for the same real data.

    resnet20: trained on `real_images` with a stratified, seeded tenth held out
    for validation (the tuning loop passes the train split only); in memory.
    """
    key = (features, _digest(real_images, real_labels), int(seed), repr(config))
    if key not in _EXTRACTOR_CACHE:
        if features == "inception":
            _EXTRACTOR_CACHE[key] = build_extractor("inception")
        elif features == "resnet20":
            labels = np.asarray(real_labels).reshape(-1)
            rng = np.random.default_rng(seed)
            val = np.zeros(len(labels), bool)
            for c in np.unique(labels):
                members = np.flatnonzero(labels == c)
                val[rng.choice(members, max(1, len(members) // 10), replace=False)] = True
            _EXTRACTOR_CACHE[key] = ResNet20Features.train(
                real_images[~val], labels[~val], real_images[val], labels[val],
                int(labels.max()) + 1, config=config, seed=seed)
        else:
            raise MetricsError(f"unknown feature extractor '{features}'; choose from: {', '.join(FEATURE_EXTRACTORS)}")
    return _EXTRACTOR_CACHE[key]


def kid_objective(images, labels, real_images, real_labels, seed=0, features="resnet20", extractor=None,
                  extractor_config=None, num_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE):
    """KID between in-memory generated images and real images: one float, lower is better.

    For `hyp_opt.py --objective kid`: no classifier is trained per trial. The
    extractor (`kid_extractor`, or the one given) and the real images'
    features are computed on the first call and reused by every later call
    with the same real data in this process. `labels` are accepted for the
    tuning loop's signature; the score is the overall KID.

    Example:
        >>> kid_objective(generated_uint8, generated_labels, splits.x_train, splits.y_train, seed=0)
        0.0123
    """
    del labels  # the overall KID; per-class KIDs are in evaluate_synthetic
    extractor = extractor or kid_extractor(real_images, real_labels, seed=seed, features=features,
                                           config=extractor_config)
    key = (id(extractor), _digest(real_images))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()  # one reference set at a time
        _REFERENCE_CACHE[key] = extractor.embed(real_images, desc="real features").features
    generated = extractor.embed(np.asarray(images), desc="generated features").features
    mean, _ = kernel_inception_distance(_REFERENCE_CACHE[key], generated, num_subsets=num_subsets,
                                        subset_size=subset_size, seed=seed)
    return mean


__all__ = ["Embeddings", "compute_quality", "distribution_metrics", "evaluate_images", "evaluate_synthetic",
           "kid_extractor", "kid_objective"]
