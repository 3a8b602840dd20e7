"""Where every stage reads and writes: the paper's folder names, in one place.

All paths are relative to the output root: the environment variable
`SDDG_OUTPUT_ROOT` when set, else the current directory (the paper's scripts
wrote relative to where they ran).

    Checkpoints/DDPM/Exp_{exp}/{dataset}/MyEmbedding/     class-encoder weights
    Checkpoints/DDPM/Exp_{exp}/{dataset}/DiffusionFt/     fine-tuned UNet weights
    Checkpoints/Classifiers/Exp_{exp}/{dataset}/{run}/    ResNet20 weights + history
    Data/Synthetic/Exp_{exp}/{dataset}/                   generated class_{NN}/img_{n}.png
    CAS Results/test_accuracies_exp{exp}.json             CAS table (merged)
    CAS Results/pipeline_optimization_exp{exp}.json       stage table (merged)
    CAS Results/quality_exp{exp}.json                     FID/KID/... (merged)
    optimization_plots/Exp_{exp}/{dataset}/{enc|dif}/     Optuna plots
    Experiments/Exp_{exp}/{dataset}/                      Optuna storage, REPORT.md

{dataset} is `dataset_folder(name)`: a registered name as is; `folder:PATH`
and `tfds:NAME` as a name without path characters (`folder-<base>-<hash>`,
`tfds-<name>`).
"""

import hashlib
import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the repository: real test data and the paper's figures.
SHARED_DIR = Path(os.environ.get("SDDG_SHARED_DIR", REPO_ROOT.parent / "shared"))
PUBLISHED_CAS_JSON = SHARED_DIR / "paper" / "published_cas.json"


def output_root():
    return Path(os.environ.get("SDDG_OUTPUT_ROOT", "."))


def default_data_dir():
    """Where real datasets are cached and downloaded: $SDDG_DATA_DIR or ~/.cache/sd_dataset_generation."""
    return Path(os.environ.get("SDDG_DATA_DIR", Path.home() / ".cache" / "sd_dataset_generation"))


def dataset_folder(dataset):
    """The folder name of a dataset: registered names unchanged; `folder:PATH` → `folder-<base>-<hash of the
    absolute path>` (two folders with one base name stay apart); `tfds:NAME[/CONFIG][:X.Y.Z]` → `tfds-NAME...`."""
    from Data.own_datasets import canonical_name, is_own_dataset

    text = str(dataset).strip()
    if not is_own_dataset(text):
        return text
    prefix, rest = canonical_name(text).split(":", 1)
    if prefix == "folder":
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rest).name).strip("._") or "root"
        return f"folder-{base}-{hashlib.sha256(rest.encode()).hexdigest()[:8]}"
    return "tfds-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", rest)


def dataset_cache_dir(dataset):
    """The data cache's folder for one dataset's decoded arrays (folder: and tfds: datasets)."""
    return default_data_dir() / dataset_folder(dataset)


def diffusion_checkpoint_dir(exp, dataset, stage):
    """stage: 'enc' (class encoder, MyEmbedding) or 'dif' (fine-tuned UNet, DiffusionFt)."""
    folder = {"enc": "MyEmbedding", "dif": "DiffusionFt"}[stage]
    return output_root() / "Checkpoints" / "DDPM" / f"Exp_{exp}" / dataset_folder(dataset) / folder


def classifier_checkpoint_dir(exp, dataset, run_name):
    return output_root() / "Checkpoints" / "Classifiers" / f"Exp_{exp}" / dataset_folder(dataset) / run_name


def synthetic_dir(exp, dataset):
    return output_root() / "Data" / "Synthetic" / f"Exp_{exp}" / dataset_folder(dataset)


def results_dir():
    return output_root() / "CAS Results"


def cas_results_json(exp):
    return results_dir() / f"test_accuracies_exp{exp}.json"


def pipeline_results_json(exp):
    return results_dir() / f"pipeline_optimization_exp{exp}.json"


def quality_results_json(exp):
    return results_dir() / f"quality_exp{exp}.json"


def optimization_plots_dir(exp, dataset, stage):
    return output_root() / "optimization_plots" / f"Exp_{exp}" / dataset_folder(dataset) / stage


def experiment_dir(exp, dataset):
    return output_root() / "Experiments" / f"Exp_{exp}" / dataset_folder(dataset)


def study_name(dataset, exp, stage):
    """The paper's Optuna study name."""
    return f"{dataset_folder(dataset)}_exp{exp}_study_{stage}"
