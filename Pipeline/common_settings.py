"""The settings several stages share, declared once (each stage's settings class uses these).

    @dataclass(frozen=True, kw_only=True)
    class CASSettings(RuntimeSettings):
        dataset: str = dataset_setting()
        exp: str = experiment_setting()
        data_dir: str = data_dir_setting()

`dataset_spec(settings)` and `load_real(settings)` read the dataset with the
settings' own `--image_size`, `--data_dir`, `--accept_unverified_data` and
`--train_subset` (with its seed).

The defaults are the paper's (`--dataset cifar10`, `--exp 0`, Stable Diffusion
v1 as `--preset sd1`); `reproduce.py` gives its own (the embedded digits and
the from-scratch preset).
"""

from Utils.cli import existing_file, experiment_id, folder, non_negative_int, positive_int
from Utils.settings import ADDED, PAPER, setting

PRESET_HELP = ("diffusion preset: sd1 (the paper: Stable Diffusion v1, GPU), sd2, small (trained from "
               "scratch on a CPU), tiny (the test model); Models/diffusion/presets.py")


def dataset_setting(default="cifar10", group=PAPER):
    return setting(default, group=group,
                   help="a registered dataset (Data/registry.py), folder:PATH (an image folder: PATH/train/<class>/, "
                        "optional val/ and test/) or tfds:NAME (a prepared TensorFlow Datasets builder)")


def image_size_setting():
    return setting(None, type=positive_int, group=ADDED,
                   help="folder: and tfds: datasets: resize every image to this square size "
                        "(required when their sizes differ; default: the native size)")


def accept_unverified_setting():
    return setting(False, group=ADDED,
                   help="use a data file whose structure matches the dataset but whose content digest "
                        "does not (recorded in results, manifests and reports)")


def train_subset_setting():
    return setting(None, type=positive_int, group=ADDED,
                   help="train on a seeded, stratified subset of this many real training images (large sets on "
                        "small machines; x1 then means this many); validation and test splits are kept whole")


def train_subset_seed_setting():
    return setting(0, type=non_negative_int, group=ADDED,
                   help="which --train_subset: the seed that draws it (the same subset in every stage)")


def dataset_spec(settings):
    """The DatasetSpec of `settings.dataset`, read with the settings' --image_size and --data_dir."""
    from Data.registry import get_spec

    return get_spec(settings.dataset, image_size=getattr(settings, "image_size", None),
                    data_dir=getattr(settings, "data_dir", None))


def load_real(settings):
    """The real splits of `settings.dataset` (Data.loaders.load_dataset with the settings' data flags)."""
    from Data.loaders import load_dataset

    return load_dataset(settings.dataset, data_dir=getattr(settings, "data_dir", None),
                        image_size=getattr(settings, "image_size", None),
                        accept_unverified=getattr(settings, "accept_unverified_data", False),
                        train_subset=getattr(settings, "train_subset", None),
                        train_subset_seed=getattr(settings, "train_subset_seed", 0))


def experiment_setting(group=PAPER):
    return setting("0", type=experiment_id, group=group,
                   help="experiment identifier, kept as written (0001 -> the Exp_0001 folders and results files)")


def preset_setting(default="sd1"):
    return setting(default, group=ADDED, help=PRESET_HELP)


def data_dir_setting(help="folder with the real dataset files (default $SDDG_DATA_DIR or the data cache)"):
    return setting(None, type=folder, group=ADDED, help=help)


def conditioning_setting():
    from Models.diffusion.presets import CONDITIONINGS, DEFAULT_CONDITIONING

    return setting(DEFAULT_CONDITIONING, choices=CONDITIONINGS, group=ADDED,
                   help=f"how a label becomes the UNet's context (default {DEFAULT_CONDITIONING}, the paper's): "
                        "class_encoder, ordinal_class_encoder (classes that are grades of one scale, label 0 the "
                        "lowest: grade k coded as ones at 0..k), text (prompts from --prompt_template over the label "
                        "names, CLIP text encoder), textual_inversion (a learned token per class); "
                        "Models/diffusion/conditioning.py")


def prompt_template_setting():
    return setting(None, type=existing_file, group=ADDED, metavar="FILE",
                   help="text methods: prompt templates, one per line, each with {label} (default: "
                        "'a photo of a {label}.' and 7 more); each image draws one by (seed, class, index)")


def ti_tokens_setting():
    return setting(1, type=positive_int, group=ADDED,
                   help="textual_inversion: new tokens per class")


def conditioning_spec(settings):
    """The ConditioningSpec of the settings' --conditioning, --prompt_template and --ti_tokens."""
    from Models.diffusion.conditioning import DEFAULT_TEMPLATES, ConditioningSpec, read_templates

    path = getattr(settings, "prompt_template", None)
    templates = read_templates(path) if path else DEFAULT_TEMPLATES
    return ConditioningSpec(getattr(settings, "conditioning", "class_encoder"), templates,
                            getattr(settings, "ti_tokens", 1))


def timestep_spacing_setting():
    from Models.diffusion.presets import TIMESTEP_SPACINGS

    return setting(None, choices=TIMESTEP_SPACINGS, group=ADDED,
                   help="where the sampling timesteps fall: leading (Stable Diffusion's), trailing, linspace "
                        "(default: the one the checkpoints record, SD_adapting.py --timestep_spacing)")


def sampler_setting():
    from Models.diffusion.schedulers import DEFAULT_SAMPLER, SAMPLERS

    return setting(DEFAULT_SAMPLER, choices=tuple(SAMPLERS), group=ADDED,
                   help=f"the sampler's update rule (default {DEFAULT_SAMPLER}, the paper's; "
                        f"Models/diffusion/schedulers.py, as diffusers' schedulers of those names)")
