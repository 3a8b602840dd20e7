"""keras-cv's published Stable Diffusion weight files: where they live, download, check, load.

The files are legacy Keras-2 `.h5` weights; `model.load_weights` matches them to our
models by layer order (see `Models/diffusion/layers.py`). They are looked for in

    $SDDG_WEIGHTS_DIR, else Keras' download cache ($KERAS_HOME or ~/.keras)/datasets

The latter is where keras-cv itself caches them, so files keras-cv already
downloaded are reused. A missing file is downloaded (with a short network timeout);
offline, the error is one line saying which file to place where. Every file is
checked against its published SHA-256 before it is used.

Example:
    >>> unet = build_unet(get_preset("sd1"), 128)
    >>> load_pretrained_weights(unet, "unet_sd1")
    >>> load_pretrained_weights(build_image_decoder(128), "decoder")
"""

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from Models.errors import CheckpointError, ModelSettingsError
from Utils.io import atomic_path


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str


# Names, addresses and hashes as in keras-cv 0.9 (keras_cv/src/models/stable_diffusion/
# diffusion_model.py, image_encoder.py, decoder.py, text_encoder.py, clip_tokenizer.py).
WEIGHT_FILES = {
    "unet_sd1": WeightFile(
        "kcv_diffusion_model.h5",
        "https://huggingface.co/fchollet/stable-diffusion/resolve/main/kcv_diffusion_model.h5",
        "8799ff9763de13d7f30a683d653018e114ed24a6a819667da4f5ee10f9e805fe",
    ),
    "unet_sd2": WeightFile(
        "diffusion_model_v2_1.h5",
        "https://huggingface.co/ianstenbit/keras-sd2.1/resolve/main/diffusion_model_v2_1.h5",
        "c31730e91111f98fe0e2dbde4475d381b5287ebb9672b1821796146a25c5132d",
    ),
    "encoder": WeightFile(
        "vae_encoder.h5",
        "https://huggingface.co/fchollet/stable-diffusion/resolve/main/vae_encoder.h5",
        "c60fb220a40d090e0f86a6ab4c312d113e115c87c40ff75d11ffcf380aab7ebb",
    ),
    "decoder": WeightFile(
        "kcv_decoder.h5",
        "https://huggingface.co/fchollet/stable-diffusion/resolve/main/kcv_decoder.h5",
        "ad350a65cc8bc4a80c8103367e039a3329b4231c2469a1093869a345f55b1962",
    ),
    # CLIP's text side (keras-cv 0.9: text_encoder.py, clip_tokenizer.py). The vocabulary is
    # also found inside an installed open-clip-torch (Models/text/clip_tokenizer.py).
    "text_encoder_sd1": WeightFile(
        "kcv_encoder.h5",
        "https://huggingface.co/fchollet/stable-diffusion/resolve/main/kcv_encoder.h5",
        "4789e63e07c0e54d6a34a29b45ce81ece27060c499a709d556c7755b42bb0dc4",
    ),
    "text_encoder_sd2": WeightFile(
        "text_encoder_v2_1.h5",
        "https://huggingface.co/ianstenbit/keras-sd2.1/resolve/main/text_encoder_v2_1.h5",
        "985002e68704e1c5c3549de332218e99c5b9b745db7171d5f31fcd9a6089f25b",
    ),
    "clip_vocabulary": WeightFile(
        "bpe_simple_vocab_16e6.txt.gz",
        "https://github.com/openai/CLIP/blob/main/clip/bpe_simple_vocab_16e6.txt.gz?raw=true",
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
    ),
}

# Seconds to wait for the server to answer (and for each read): offline runs fail fast.
DOWNLOAD_TIMEOUT = 10
_CHUNK = 1 << 20
# Files already hashed by this process: (path, size, mtime) -> True.
_verified = {}


def weights_dir():
    """The folder holding the weight files (see the module docstring)."""
    if os.environ.get("SDDG_WEIGHTS_DIR"):
        return Path(os.environ["SDDG_WEIGHTS_DIR"])
    keras_home = os.environ.get("KERAS_HOME", Path.home() / ".keras")
    return Path(keras_home) / "datasets"


def unet_weights_key(preset):
    """The WEIGHT_FILES key of a preset's UNet: 'unet_sd1' / 'unet_sd2'."""
    key = f"unet_{preset.name}"
    if not preset.pretrained or key not in WEIGHT_FILES:
        raise ModelSettingsError(f"preset {preset.name!r} has no published weights; train it from scratch")
    return key


def _spec(which):
    try:
        return WEIGHT_FILES[which]
    except KeyError:
        raise ModelSettingsError(f"unknown weight file {which!r}; choose one of {', '.join(WEIGHT_FILES)}") from None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place_hint(spec, folder, url):
    return f"place {spec.filename} (sha256 {spec.sha256}) in {folder} (from {url})"


def _download(spec, path, url, timeout):
    """Streams `url` to `path` (atomically), checking the SHA-256 on the way."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "sd-dataset-generation"})
    with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(path) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                        desc=f"downloading {spec.filename}") as bar:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            # Raising inside atomic_path removes the temporary file: nothing half-written stays.
            raise CheckpointError(f"downloaded {spec.filename} has sha256 {digest.hexdigest()}, expected "
                                  f"{spec.sha256}; {_place_hint(spec, path.parent, url)}")


def fetch_weights(which, folder=None, url=None, timeout=DOWNLOAD_TIMEOUT):
    """Local path of the checked weight file `which` (a WEIGHT_FILES key), downloading it if missing.

    folder / url override `weights_dir()` / the published address. Offline, or on a hash
    mismatch, raises CheckpointError in one line naming the file, its hash, the folder and the URL.
    """
    spec = _spec(which)
    folder = Path(folder) if folder is not None else weights_dir()
    url = url or spec.url
    path = folder / spec.filename
    if not path.exists():
        try:
            _download(spec, path, url, timeout)
        except CheckpointError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise CheckpointError(f"cannot download {spec.filename} ({reason}); "
                                  f"{_place_hint(spec, folder, url)}") from None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        found = _sha256(path)
        if found != spec.sha256:
            raise CheckpointError(f"{path} has sha256 {found}, expected {spec.sha256}; "
                                  f"replace it with the file from {url}")
        _verified[key] = True
    return path


def load_pretrained_weights(model, which, folder=None, url=None, timeout=DOWNLOAD_TIMEOUT):
    """Loads keras-cv's published weights `which` ('unet_sd1', 'unet_sd2', 'encoder', 'decoder',
    'text_encoder_sd1', 'text_encoder_sd2') into model.

    The model must come from the matching builder (`build_unet(get_preset('sd1'), ...)`,
    `build_image_encoder`, ...); any image size and context length work.
    """
    path = fetch_weights(which, folder=folder, url=url, timeout=timeout)
    try:
        model.load_weights(path)
    except ValueError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name} does not fit model {model.name!r}: {first_line}") from None
    return path
