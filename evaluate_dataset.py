"""Measures a synthetic dataset against the real one: FID, KID, MMD, IS, PRDC, memorisation.

Works on our generated folders and on any folder of class sub-folders (a
PyTorch pipeline's ImageFolder output included: `Data/synthetic.py` says how
folder names map to labels). Every metric is computed overall and per class
from the embeddings of one extractor (`Metrics/features.py`), against the real
TEST split by default; `Metrics/quality.py` documents each metric.

    # our generated images, with the ResNet20 extractor (trained once on the real
    # train split and cached under Checkpoints/Classifiers/Exp_0/<dataset>/feature_extractor/)
    python evaluate_dataset.py --dataset retinamnist --synthetic_dir Data/Synthetic/Exp_0/retinamnist
    python evaluate_dataset.py --dataset retinamnist --exp 0     # the same: our folder is the default
    # another implementation's folder, with InceptionV3 (ImageNet) features
    python evaluate_dataset.py --dataset cifar10 --synthetic_dir ../torch_run/samples --features inception

Writes: `CAS Results/quality_exp{exp}.json` (merged, keyed by dataset, folder
and extractor) and a PNG of the most copy-like synthetic/training pairs under
`CAS Results/quality_exp{exp}/{dataset}/`.

The stage itself is Pipeline/evaluate.py (`EvaluateSettings`, `run`, `is_done`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Pipeline.evaluate import EvaluateSettings, run  # noqa: E402
from Utils.cli import run_cli  # noqa: E402
from Utils.settings import command_line  # noqa: E402

parser, main = command_line(EvaluateSettings, run, __doc__)

if __name__ == "__main__":
    run_cli(main)
