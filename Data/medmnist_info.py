"""MedMNIST v2/v3 facts for the 2D classification datasets, as plain data.

Kept here so the pipeline does not need the `medmnist` package (it pulls in
PyTorch): `MEDMNIST_COPY` holds the facts from MedMNIST's own `INFO` table
(`medmnist/info.py`, release 3.0.2; tests/test_own_data.py compares the two): the 28x28 files on Zenodo record 10519652,
their MD5 checksums, channels, split sizes and label names IN MEDMNIST'S LABEL
ORDER. (The paper's original code listed DermaMNIST's and BloodMNIST's names in
a different order from the labels stored in the files; the names below are
the ones that match the labels.)

ChestMNIST is left out on purpose: it is multi-label (14 independent binary
findings), which a single-label class-conditional generator cannot model.
RetinaMNIST is an ordinal-regression task (diabetic-retinopathy grade 0..4);
like the paper we treat the five grades as five classes.

MedMNIST is released under CC BY 4.0; cite Yang et al., "MedMNIST v2 - A
large-scale lightweight benchmark for 2D and 3D biomedical image
classification", Scientific Data 10, 41 (2023).

Where the `medmnist` package is installed, `MEDMNIST` is built from its
`INFO` instead (its `info.py` alone is read: the package's `__init__` would
import PyTorch); `MEDMNIST_SOURCE` says which.

Example:
    >>> MEDMNIST["bloodmnist"]["labels"][0]
    'basophil'
    >>> MEDMNIST["retinamnist"]["md5"]
    'bd4c0672f1bba3e3a89f0e4e876791e4'
"""

MEDMNIST_VERSION = "3.0.2"  # the release whose INFO these facts were checked against
MEDMNIST_HOMEPAGE = "https://medmnist.com/"
_ZENODO = "https://zenodo.org/records/10519652/files"


def _entry(name, md5, task, channels, n_train, n_val, n_test, labels):
    return {
        "file": f"{name}.npz",
        "url": f"{_ZENODO}/{name}.npz?download=1",
        "md5": md5,
        "task": task,
        "channels": channels,
        "image_size": 28,
        "n_samples": {"train": n_train, "val": n_val, "test": n_test},
        "labels": tuple(labels),
    }


MEDMNIST_COPY = {
    "pathmnist": _entry(
        "pathmnist", "a8b06965200029087d5bd730944a56c1", "multi-class", 3, 89996, 10004, 7180,
        ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
         "normal colon mucosa", "cancer-associated stroma",
         "colorectal adenocarcinoma epithelium"]),
    "dermamnist": _entry(
        "dermamnist", "0744692d530f8e62ec473284d019b0c7", "multi-class", 3, 7007, 1003, 2005,
        ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
         "vascular lesions"]),
    "bloodmnist": _entry(
        "bloodmnist", "7053d0359d879ad8a5505303e11de1dc", "multi-class", 3, 11959, 1712, 3421,
        ["basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
         "monocyte", "neutrophil", "platelet"]),
    "retinamnist": _entry(
        "retinamnist", "bd4c0672f1bba3e3a89f0e4e876791e4", "ordinal-regression", 3, 1080, 120, 400,
        ["0", "1", "2", "3", "4"]),
    "breastmnist": _entry(
        "breastmnist", "750601b1f35ba3300ea97c75c52ff8f6", "binary-class", 1, 546, 78, 156,
        ["malignant", "normal, benign"]),
    "pneumoniamnist": _entry(
        "pneumoniamnist", "28209eda62fecd6e6a2d98b1501bb15f", "binary-class", 1, 4708, 524, 624,
        ["normal", "pneumonia"]),
    "octmnist": _entry(
        "octmnist", "c68d92d5b585d8d81f7112f81e2d0842", "multi-class", 1, 97477, 10832, 1000,
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "organamnist": _entry(
        "organamnist", "68e3f8846a6bd62f0c9bf841c0d9eacc", "multi-class", 1, 34561, 6491, 17778,
        ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
         "lung-left", "lung-right", "pancreas", "spleen"]),
    "organcmnist": _entry(
        "organcmnist", "b9ceb9546e10131b32923c5bbeaea2b1", "multi-class", 1, 12975, 2392, 8216,
        ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
         "lung-left", "lung-right", "pancreas", "spleen"]),
    "organsmnist": _entry(
        "organsmnist", "9ab87b696fb54e2a387ebe992d6ed5f1", "multi-class", 1, 13932, 2452, 8827,
        ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
         "lung-left", "lung-right", "pancreas", "spleen"]),
    "tissuemnist": _entry(
        "tissuemnist", "ebe78ee8b05294063de985d821c1c34b", "multi-class", 1, 165466, 23640, 47280,
        ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
         "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
         "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
}

def entry_from_info(name, info):
    """Our entry for `name` from one item of the `medmnist` package's INFO (28x28 files)."""
    labels = info["label"]
    return _entry(name, info["MD5"], info["task"], info["n_channels"], info["n_samples"]["train"],
                  info["n_samples"]["val"], info["n_samples"]["test"],
                  [labels[str(i)] for i in range(len(labels))]) | {"url": info["url"]}


def package_info():
    """(INFO, version) of the installed `medmnist` package, reading only its info.py; None if absent."""
    import importlib.util
    from pathlib import Path

    try:
        found = importlib.util.find_spec("medmnist")  # finds without importing the package
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(list(found.submodule_search_locations)[0]) / "info.py"
        spec = importlib.util.spec_from_file_location("_medmnist_info", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.INFO, module.__version__
    except Exception:  # a broken or unexpected install: our copy is complete on its own
        return None


def _medmnist():
    found = package_info()
    if found is None:
        return MEDMNIST_COPY, f"copy of medmnist {MEDMNIST_VERSION}"
    info, version = found
    table = {}
    for name, copy in MEDMNIST_COPY.items():
        try:
            table[name] = entry_from_info(name, info[name])
        except (KeyError, TypeError, ValueError):
            table[name] = copy
    return table, f"medmnist {version} package"


MEDMNIST, MEDMNIST_SOURCE = _medmnist()

# MedMNIST 2D datasets we cannot use, with the reason (for a helpful error).
UNSUPPORTED = {
    "chestmnist": "ChestMNIST is multi-label (14 binary findings per image), "
                  "not a single-label classification task",
}
