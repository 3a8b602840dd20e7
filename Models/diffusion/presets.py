"""The diffusion presets: one place for every width, depth and default of the UNet.

Three presets share one parameterised UNet (`Models/diffusion/unet.py`):

- `sd1`: keras-cv's `DiffusionModel` (Stable Diffusion v1.4) layer for layer, 768-wide
  context, working on the autoencoder's 4-channel latents. The paper's model.
- `sd2`: keras-cv's `DiffusionModelV2` (Stable Diffusion v2.1): 64-wide attention heads,
  Dense projections around the transformer, 1024-wide context.
- `tiny`: the same blocks with small widths and two levels, in pixel space with no
  autoencoder, small enough to train from scratch in seconds to minutes. Not a
  published model: the test model.
- `small`: the from-scratch generator for CPUs (digits, 28 px MedMNIST): tiny's widths
  (measured: a third level costs CPU time and CAS at this training length), in pixel
  space, with the training recipe chosen by measurement (BENCHMARKS.md, "From-scratch
  recipe"): cosine noise schedule, v-prediction, EMA of the weights, label dropout for
  classifier-free guidance (min-SNR weighting off), 50 epochs and one gentle fine-tuning
  epoch (the default run's 10 minutes).

Pixel-space presets model the dataset's own channels (a grey dataset is generated as
exactly grey images); latent presets work on the autoencoder's 4 latent channels.
The sd presets keep the paper's training recipe (scaled_linear, epsilon, no EMA, no
label dropout); every recipe field can be overridden by SD_adapting.py's flags.

Example:
    >>> preset = get_preset("sd1")
    >>> preset.level_channels, preset.latent_channels, preset.downsample
    ((320, 640, 1280, 1280), 4, 8)
"""

from dataclasses import dataclass, replace

from Models.errors import ModelSettingsError

# The two training stages (PAPER.md stages 1 and 3): the class encoder, then the UNet fine-tuning.
STAGES = ("enc", "dif")
# The paper's generation batch: images per sampler call (generation and tuning trials).
GENERATION_BATCH_SIZE = 250

# How a label becomes the UNet's context (Models/diffusion/conditioning.py); here, without Keras, so
# that the scripts' flags are declared before TensorFlow starts.
CONDITIONINGS = ("class_encoder", "ordinal_class_encoder", "text", "textual_inversion")
DEFAULT_CONDITIONING = "class_encoder"
# The methods whose context comes from prompts through a CLIP text encoder (the others: a class encoder).
TEXT_CONDITIONINGS = ("text", "textual_inversion")

# The names diffusers gives these settings (`Models/diffusion/schedule.py` implements them).
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class TextEncoderPreset:
    """A CLIP text encoder (`Models/text/text_encoder.py`): keras-cv's `TextEncoder` / `TextEncoderV2`
    layout, read by the text conditioning methods (`Models/diffusion/conditioning.py`)."""

    name: str
    width: int                   # token width (= the UNet's context_dim)
    layers: int                  # transformer layers
    heads: int                   # attention heads
    activation: str              # the MLP's: "quick_gelu" (CLIP ViT-L/14) or "gelu_approximate" (keras-cv's sd2)
    weights: object = None       # Models/diffusion/weights.py key of keras-cv's published file; None: random only
    max_length: int = 77         # tokens per prompt (the context length the UNet attends to)
    vocab_size: int = 49408      # CLIP's BPE vocabulary (Models/text/clip_tokenizer.py)
    pad_with_end: bool = True    # pad prompts with <end_of_text>, as keras-cv's Stable Diffusion; else 0 (open_clip)


TEXT_ENCODERS = {
    # Stable Diffusion v1's: OpenAI CLIP ViT-L/14's text side (keras-cv's TextEncoder).
    "clip_vit_l14": TextEncoderPreset("clip_vit_l14", width=768, layers=12, heads=12, activation="quick_gelu",
                                      weights="text_encoder_sd1"),
    # Stable Diffusion v2's: OpenCLIP ViT-H/14 without its last layer (keras-cv's TextEncoderV2, which
    # uses the tanh-approximated GELU).
    "open_clip_vit_h14": TextEncoderPreset("open_clip_vit_h14", width=1024, layers=23, heads=16,
                                           activation="gelu_approximate", weights="text_encoder_sd2"),
    # The test model's: the same blocks, random weights, as wide as tiny's context; prompts of up to
    # 16 tokens (the templates' are shorter), which keeps the UNet's cross-attention CPU-sized.
    "tiny_clip": TextEncoderPreset("tiny_clip", width=64, layers=2, heads=4, activation="quick_gelu",
                                   max_length=16),
}


@dataclass(frozen=True)
class DiffusionPreset:
    """Everything that differs between the UNet presets (see the module docstring)."""

    name: str
    # UNet: one entry per resolution level, highest resolution first.
    level_channels: tuple        # output channels of the level's ResBlocks
    level_attention: tuple       # whether the level's ResBlocks are followed by a SpatialTransformer
    level_heads: tuple           # attention heads at that level (head size = channels // heads);
                                 # the middle block uses the last level's
    num_res_blocks: int          # ResBlocks per level going down (one more going up, as keras-cv)
    linear_attention_projection: bool  # Dense proj_in/proj_out (sd2) instead of 1x1 convolutions (sd1)
    gelu_approximate: bool       # GEGLU with the tanh GELU (keras-cv) or the exact erf GELU (PyTorch/diffusers)
    context_dim: int             # width of each context token (the class encoder's output)
    context_length: int          # tokens in the context (the paper's class encoder: 100)
    timestep_embedding_dim: int  # width of the sinusoidal timestep embedding fed to the UNet
    norm_groups: int             # GroupNormalization groups (must divide every width)
    # Image space.
    latent: bool                 # True: UNet on the autoencoder's latents (4 channels, /8); False: pixels
    image_size: object           # int, or None = the dataset's native size (tiny)
    pretrained: bool             # keras-cv weight files exist for the UNet (+ autoencoder)
    # Training defaults (PAPER.md for the sd presets).
    class_encoder_hidden: int
    enc_batch_size: int
    enc_epochs: int
    enc_lr: float
    dif_batch_size: int
    dif_epochs: int
    dif_lr: float
    # Generation defaults (the paper's "no optimisation" settings = keras-cv's defaults).
    default_inference_steps: int
    default_guidance_scale: float
    # The training recipe (diffusers' names; `Models/diffusion/schedule.py`). Defaults: the paper's.
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    cond_dropout: float = 0.0       # probability of training on the all-zero (unconditional) label
    ema_decay: float = 0.0          # 0: no moving average of the weights
    snr_gamma: float = 0.0          # 0: plain MSE; else min-SNR-gamma weighting
    # Mirror each training image left-right with probability 1/2 (diffusers' --random_flip). Off by
    # default: the paper does not, and digits are not mirror-symmetric; a per-dataset choice.
    random_flip: bool = False
    # Draw each epoch's images with replacement, every class equally likely (class-balanced
    # sampling), so a rare class trains the conditional branch as often as a common one. Off by
    # default: the paper trains on the data as it is.
    balanced_sampling: bool = False
    # Steps over which the learning rate rises linearly from 0 to its peak before the cosine decay
    # (diffusers' --lr_warmup_steps). 0: the paper's schedule, decaying from the first step.
    lr_warmup_steps: int = 0
    # The text encoder of the text conditioning methods (a TEXT_ENCODERS key; its width is context_dim).
    text_encoder: str = "tiny_clip"

    @property
    def text(self):
        """The `TextEncoderPreset` of the text conditioning methods."""
        return TEXT_ENCODERS[self.text_encoder]

    @property
    def latent_channels(self):
        """Channels of the UNet's input and output: 4 latent channels, or 3 RGB channels."""
        return 4 if self.latent else 3

    def unet_channels(self, image_channels):
        """The UNet's input/output channels for a dataset of `image_channels` (1 grey, 3 RGB)."""
        return 4 if self.latent else int(image_channels)

    def recipe(self):
        """The training-recipe fields, as SD_adapting.py's flags name them."""
        return {"beta_schedule": self.beta_schedule, "prediction_type": self.prediction_type,
                "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
                "timestep_spacing": self.timestep_spacing, "cond_dropout": self.cond_dropout,
                "ema_decay": self.ema_decay, "snr_gamma": self.snr_gamma, "random_flip": self.random_flip,
                "balanced_sampling": self.balanced_sampling, "lr_warmup_steps": self.lr_warmup_steps}

    @property
    def downsample(self):
        """Image size / UNet input size: 8 through the autoencoder, 1 in pixel space."""
        return 8 if self.latent else 1

    @property
    def time_embedding_width(self):
        """Width of the MLP-projected timestep embedding inside the UNet (keras-cv: 4 x 320 = 1280)."""
        return 4 * self.level_channels[0]

    @property
    def min_image_size(self):
        """The smallest image size the UNet accepts: every downsampling step must halve exactly."""
        return self.downsample * 2 ** (len(self.level_channels) - 1)


# The paper's training and generation settings, shared by both Stable Diffusion presets.
_SD_TRAINING = dict(
    latent=True,
    image_size=128,
    pretrained=True,
    context_length=100,
    timestep_embedding_dim=320,
    norm_groups=32,
    num_res_blocks=2,
    class_encoder_hidden=500,
    enc_batch_size=64, enc_epochs=50, enc_lr=1e-4,
    dif_batch_size=16, dif_epochs=10, dif_lr=1e-5,
    default_inference_steps=50,
    default_guidance_scale=7.5,
)

PRESETS = {
    "sd1": DiffusionPreset(
        name="sd1",
        level_channels=(320, 640, 1280, 1280),
        level_attention=(True, True, True, False),
        level_heads=(8, 8, 8, 8),
        linear_attention_projection=False,
        gelu_approximate=True,  # keras-cv's; the PyTorch original uses the exact GELU
        context_dim=768,
        text_encoder="clip_vit_l14",
        **_SD_TRAINING,
    ),
    "sd2": DiffusionPreset(
        name="sd2",
        level_channels=(320, 640, 1280, 1280),
        level_attention=(True, True, True, False),
        level_heads=(5, 10, 20, 20),  # 64-wide heads
        linear_attention_projection=True,
        gelu_approximate=True,
        context_dim=1024,
        text_encoder="open_clip_vit_h14",
        **_SD_TRAINING,
    ),
    "tiny": DiffusionPreset(
        name="tiny",
        level_channels=(32, 64),
        level_attention=(False, True),  # attention only at the lower resolution (4x4 / 14x14)
        level_heads=(4, 4),
        num_res_blocks=2,
        linear_attention_projection=False,
        # The exact GELU and a timestep embedding as wide as the first level (as SD's 320)
        # make tiny expressible as a diffusers UNet2DConditionModel (diffusers_convert.py).
        gelu_approximate=False,
        context_dim=64,
        context_length=4,
        timestep_embedding_dim=32,
        norm_groups=8,
        latent=False,
        image_size=None,
        pretrained=False,
        # CPU-sized, measured on digits (BENCHMARKS.md): the enc stage
        # trains the UNet from scratch (batch 32 learns faster per CPU second than 64;
        # lr 5e-3 does not converge), the dif stage fine-tunes it briefly.
        class_encoder_hidden=64,
        enc_batch_size=32, enc_epochs=15, enc_lr=2e-3,
        dif_batch_size=32, dif_epochs=5, dif_lr=5e-4,
        default_inference_steps=20,
        default_guidance_scale=4.0,
    ),
}


# The from-scratch generator: tiny's UNet (measured on digits, BENCHMARKS.md "From-scratch recipe":
# a third level of 128 channels costs 50 % more CPU time and 3 CAS points at this training
# length) with the training recipe and the defaults that the same ablation chose.
PRESETS["small"] = replace(
    PRESETS["tiny"],
    name="small",
    # 50 epochs: on digits longer training keeps paying at this size (25 -> 40 -> 50 epochs: CAS x1
    # higher each time; on RetinaMNIST 40 and 50 tie, BENCHMARKS.md) and still fits the default
    # run's 10 minutes.
    enc_epochs=50,
    # tiny's batch 32 kept: at 8 px a step of 64 takes about twice a step of 32 on a CPU, so 64 saves
    # ~10 % of an epoch and thinned x1's margin over three seeds (BENCHMARKS.md, round 6).
    # The enc stage already trains the UNet, down to a learning rate of 0: fine-tuning it again at
    # tiny's 5e-4 throws it out of that minimum (KID x10 even through the EMA); at 2e-5, 100x
    # below the enc stage's peak (the paper's two stages are 10x apart), it keeps its quality.
    dif_epochs=1,
    dif_lr=2e-5,
    default_guidance_scale=1.5,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    timestep_spacing="leading",
    cond_dropout=0.1,
    ema_decay=0.999,
    snr_gamma=0.0,
)


def _check(preset):
    levels = len(preset.level_channels)
    if not (len(preset.level_attention) == len(preset.level_heads) == levels):
        raise ValueError(f"preset {preset.name}: level_* tuples must have one entry per level")
    for channels, heads in zip(preset.level_channels, preset.level_heads):
        if channels % heads or channels % preset.norm_groups:
            raise ValueError(f"preset {preset.name}: {channels} channels not divisible by "
                             f"{heads} heads and {preset.norm_groups} groups")
    if preset.text.width != preset.context_dim:
        raise ValueError(f"preset {preset.name}: text encoder {preset.text.name} is {preset.text.width} wide, "
                         f"the UNet's context {preset.context_dim}")


for _preset in PRESETS.values():
    _check(_preset)


def preset_help(default):
    """The --preset flag's help text, the same in every script."""
    return (f"diffusion preset (default {default}): sd1 (the paper: Stable Diffusion v1, GPU), sd2, "
            "small (trained from scratch on a CPU), tiny (the test model)")


def get_preset(name):
    """The preset called `name` ('sd1', 'sd2', 'tiny' or 'small'); a DiffusionPreset passes through."""
    if isinstance(name, DiffusionPreset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelSettingsError(f"unknown diffusion preset {name!r}; choose one of {', '.join(PRESETS)}") from None
