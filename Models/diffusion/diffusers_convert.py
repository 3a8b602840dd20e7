"""Diffusers checkpoints in and out: `UNet2DConditionModel` and `AutoencoderKL` <-> our Keras models.

Most Stable Diffusion checkpoints (fine-tuned ones included) are published in the
diffusers layout: a folder with `config.json` and `diffusion_pytorch_model.safetensors`
(or `.bin`). This module reads such a folder into our UNet (`unet.py`) and autoencoder
(`autoencoder.py`), and writes our UNet back as a diffusers folder, so a model
fine-tuned here can be sampled by a PyTorch pipeline.

It needs neither torch nor diffusers: tensors are read and written with
`safetensors.numpy`; only legacy `.bin` (pickled torch) files import torch, lazily.

What differs between the two layouts, and how it is handled:
    images        PyTorch NCHW, Keras NHWC (only activations; weights below)
    Conv2d        weight (out, in, kh, kw)   -> Conv2D kernel (kh, kw, in, out)
    Linear        weight (out, in)           -> Dense kernel (in, out)
    GroupNorm/LayerNorm  weight, bias        -> gamma, beta
    proj_in/out   SD1: 1x1 Conv2d, SD2 (`use_linear_projection`): Linear; the preset's
                  `linear_attention_projection` says which, so the shapes must agree
    heads         diffusers' `attention_head_dim` is (for SD's UNet) the number of heads
    GELU          diffusers' GEGLU uses the exact (erf) GELU, keras-cv the tanh
                  approximation; converted models set the preset's `gelu_approximate=False`
    channels      a pixel-space UNet has the dataset's channels (1 grey, 3 RGB), a latent
                  one 4; a pixel preset fits either, so the config's in_channels (to
                  Keras) and the Keras UNet's input (to diffusers) say which
    GroupNorm eps diffusers' VAE uses 1e-6, keras-cv 1e-5: `build_diffusers_autoencoder`
                  builds ours with 1e-6. (Its UNet transformers' 1e-6 against our 1e-5
                  moves a noise prediction by ~1e-5; not worth a preset field.)

The mapping is a plan: every weight-owning block of our model paired with its diffusers
name prefix, built from the preset with the same loops as `build_unet` (and the
autoencoder builders). Loading checks every tensor first and assigns nothing unless all
are present with the right shapes; missing, unexpected and mismatched tensors are named
in one `ModelSettingsError` line.

Example:
    >>> config, tensors = read_diffusers_model("sd15/unet")
    >>> preset = unet_preset_from_config(config)              # or check against get_preset("sd1")
    >>> unet = build_unet(preset, image_size=128, image_channels=config["in_channels"])
    >>> load_unet_weights(unet, preset, tensors)
    >>> save_unet_as_diffusers(unet, preset, "exported/unet")  # config.json + safetensors
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from Models.diffusion.presets import PRESETS, get_preset
from Models.errors import CheckpointError, ModelSettingsError
from Utils.io import atomic_path, atomic_write_json

DIFFUSERS_VERSION = "0.42.1"  # written into exported configs; any recent diffusers reads them
WEIGHTS_NAME = "diffusion_pytorch_model"
_MAX_NAMED = 8  # tensors named in one error line before "... and N more"


# --------------------------------------------------------------------------------------
# Reading and writing diffusers folders (no torch)
# --------------------------------------------------------------------------------------

def read_diffusers_model(folder):
    """Reads a diffusers model folder: (config dict, {name: float32 NumPy array}).

    The folder holds `config.json` and one of `diffusion_pytorch_model.safetensors`,
    a sharded `diffusion_pytorch_model.safetensors.index.json`, or (legacy, needs torch)
    `diffusion_pytorch_model.bin`. Half-precision tensors are widened to float32.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a diffusers model folder: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt diffusers config {config_path}: {e}") from None
    tensors = _read_tensors(folder)
    return config, {name: _to_float32(name, value) for name, value in tensors.items()}


def _read_tensors(folder):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    single = folder / f"{WEIGHTS_NAME}.safetensors"
    index = folder / f"{WEIGHTS_NAME}.safetensors.index.json"
    legacy = folder / f"{WEIGHTS_NAME}.bin"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            tensors = {}
            for shard in shards:
                tensors.update(load_file(folder / shard))
            return tensors
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the weights in {folder}: {e}") from None
    if legacy.is_file():
        return _read_torch_bin(legacy)
    raise CheckpointError(f"no weights in {folder}: expected {single.name} (or {index.name}, {legacy.name})")


def _read_torch_bin(path):
    """Legacy pickled PyTorch weights; the only place torch is imported."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch .bin file and torch is not installed: "
                              "pip install torch, or convert it to .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return {name: value.float().numpy() for name, value in state.items()}


def _to_float32(name, value):
    value = np.asarray(value)
    if value.dtype.kind != "f":
        raise CheckpointError(f"tensor {name} has dtype {value.dtype}; expected floating point weights")
    return value.astype(np.float32, copy=False)


def write_diffusers_model(folder, config, tensors):
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` into `folder` (atomically)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    contiguous = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()}
    with atomic_path(folder / f"{WEIGHTS_NAME}.safetensors") as tmp:
        save_file(contiguous, tmp, metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)


# --------------------------------------------------------------------------------------
# UNet: diffusers config <-> preset
# --------------------------------------------------------------------------------------

# The architecture fields of a preset; everything else (context length, training and
# generation defaults, image size) is not in a diffusers UNet config.
UNET_ARCHITECTURE_FIELDS = (
    "level_channels", "level_attention", "level_heads", "num_res_blocks",
    "linear_attention_projection", "context_dim", "timestep_embedding_dim", "norm_groups",
    "latent", "gelu_approximate",
)

# diffusers UNet2DConditionModel options we do not implement, with the value that
# means "off" (a config may omit them: diffusers' defaults are these values).
_UNET_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "norm_eps": 1e-5,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}


def _per_level(config, key, levels, default):
    """A config value that is an int (same for every level) or a list, as a tuple per level."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ModelSettingsError(f"unsupported diffusers UNet config: {key}={value} does not have "
                                     f"one entry per level ({levels})")
        return tuple(value)
    return (value,) * levels


# The UNet's input/output channels: the autoencoder's 4 latents, or grey / RGB pixels.
LATENT_CHANNELS = 4
PIXEL_CHANNELS = (1, 3)


def unet_config_channels(config):
    """(in_channels, out_channels) of a diffusers UNet config: equal, 4 (latent) or 1 / 3 (pixels)."""
    in_channels, out_channels = config.get("in_channels", 4), config.get("out_channels", 4)
    if in_channels != out_channels or in_channels not in (LATENT_CHANNELS, *PIXEL_CHANNELS):
        raise ModelSettingsError(f"unsupported diffusers UNet config: in_channels={in_channels}, "
                                 f"out_channels={out_channels} (expected 4 latent, or 1 grey / 3 RGB pixel "
                                 "channels, the same in and out)")
    return in_channels, out_channels


def unet_preset_from_config(config, base=None):
    """Our `DiffusionPreset` for a diffusers `UNet2DConditionModel` config.

    The architecture comes from the config (block_out_channels, layers_per_block,
    attention_head_dim, cross_attention_dim, use_linear_projection, down/up block
    types, norm_num_groups, in/out channels: 4 = latent, 1 or 3 = pixel space; a
    pixel-space preset does not fix the channel count, see `unet_config_channels`).
    Everything else comes from `base`:
    a preset (or its name) that the architecture must then equal, apart from the GELU
    flavour, which is always diffusers' exact GELU. Without `base`, the first preset whose
    architecture matches (sd1, sd2, tiny, small: `presets_with_architecture`) is used, else the
    defaults of sd2 (latent UNets with linear attention projections), sd1 (other latent UNets)
    or tiny (pixel-space UNets) under the name "diffusers".

    Raises ModelSettingsError naming the first unsupported option, or the fields that differ
    from `base`.
    """
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ModelSettingsError(f"expected a diffusers UNet2DConditionModel config, got {name}")
    for key, off in _UNET_FIXED.items():
        value = config.get(key, off)
        if key == "transformer_layers_per_block" and isinstance(value, (list, tuple)) \
                and all(v == 1 for v in value):
            continue
        if key == "only_cross_attention" and isinstance(value, (list, tuple)) and not any(value):
            continue
        if key == "mid_block_only_cross_attention" and value is False:
            continue
        if key in ("norm_eps", "dropout", "mid_block_scale_factor", "resnet_out_scale_factor"):
            if value is not None and abs(float(value) - off) < 1e-12:
                continue
        if value != off:
            raise ModelSettingsError(f"unsupported diffusers UNet config: {key}={value!r} (only {off!r} is implemented)")

    channels = tuple(int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = tuple(config.get("down_block_types", ()))
    up = tuple(config.get("up_block_types", ()))
    down_kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != levels or any(block not in down_kinds for block in down):
        raise ModelSettingsError(f"unsupported diffusers UNet config: down_block_types={list(down)} "
                                 f"(expected {levels} of {', '.join(down_kinds)})")
    attention = tuple(down_kinds[block] for block in down)
    expected_up = tuple(("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention))
    if up != expected_up:
        raise ModelSettingsError(f"unsupported diffusers UNet config: up_block_types={list(up)} "
                                 f"does not mirror down_block_types (expected {list(expected_up)})")
    layers = set(_per_level(config, "layers_per_block", levels, 2))
    if len(layers) != 1:
        raise ModelSettingsError(f"unsupported diffusers UNet config: layers_per_block={config['layers_per_block']} "
                                 "differs between levels")
    heads = _per_level(config, "attention_head_dim", levels, 8)
    if not all(isinstance(h, int) and h > 0 for h in heads):
        raise ModelSettingsError(f"unsupported diffusers UNet config: attention_head_dim={config.get('attention_head_dim')!r}")
    context_dims = set(_per_level(config, "cross_attention_dim", levels, 1280))
    if len(context_dims) != 1:
        raise ModelSettingsError(f"unsupported diffusers UNet config: cross_attention_dim="
                                 f"{config['cross_attention_dim']} differs between levels")
    in_channels, _ = unet_config_channels(config)
    time_dim = config.get("time_embedding_dim")
    if time_dim not in (None, 4 * channels[0]):
        raise ModelSettingsError(f"unsupported diffusers UNet config: time_embedding_dim={time_dim} "
                                 f"(only 4 x block_out_channels[0] = {4 * channels[0]} is implemented)")
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise ModelSettingsError("unsupported diffusers UNet config: norm_num_groups=None")
    architecture = dict(
        level_channels=channels,
        level_attention=attention,
        level_heads=heads,
        num_res_blocks=int(layers.pop()),
        linear_attention_projection=bool(config.get("use_linear_projection", False)),
        context_dim=int(context_dims.pop()),
        # diffusers' sinusoidal embedding is block_out_channels[0] wide ([cos, sin], shift 0).
        timestep_embedding_dim=channels[0],
        norm_groups=int(groups),
        latent=in_channels == LATENT_CHANNELS,
        gelu_approximate=False,
    )
    for level_width, level_heads in zip(channels, heads):
        if level_width % level_heads or level_width % architecture["norm_groups"]:
            raise ModelSettingsError(f"unsupported diffusers UNet config: {level_width} channels not divisible "
                                     f"by {level_heads} heads and {groups} groups")

    if base is not None:
        base = get_preset(base)
        differ = [f"{key}: config {architecture[key]} vs {base.name} {getattr(base, key)}"
                  for key in UNET_ARCHITECTURE_FIELDS
                  if key != "gelu_approximate" and architecture[key] != getattr(base, key)]
        if differ:
            raise ModelSettingsError(f"the diffusers UNet does not have the {base.name} architecture: " + "; ".join(differ))
        return dataclasses.replace(base, **architecture)
    matching = presets_with_architecture(architecture)
    if matching:
        return dataclasses.replace(PRESETS[matching[0]], **architecture)
    if architecture["latent"]:
        # Stable Diffusion 2's UNets project attention linearly, version 1's with 1x1 convolutions;
        # the family decides the rest (its text encoder, for the text conditioning methods).
        defaults = PRESETS["sd2" if architecture["linear_attention_projection"] else "sd1"]
    else:
        defaults = PRESETS["tiny"]
    return dataclasses.replace(defaults, name="diffusers", pretrained=False, **architecture)


def presets_with_architecture(architecture):
    """Names of our presets with this UNet architecture (a preset, or a dict of
    UNET_ARCHITECTURE_FIELDS), in PRESETS order; the GELU flavour is not compared.

    Presets that differ only in their training recipe share one (a diffusers UNet config
    does not say which recipe trained it).
    """
    value = architecture.get if isinstance(architecture, dict) else lambda key: getattr(architecture, key)
    return [name for name, preset in PRESETS.items()
            if all(value(key) == getattr(preset, key) for key in UNET_ARCHITECTURE_FIELDS
                   if key != "gelu_approximate")]


def diffusers_unet_config(preset, sample_size=None, image_channels=None):
    """The diffusers `UNet2DConditionModel` config of our `preset`'s UNet.

    `image_channels` is the dataset's (1 grey, 3 RGB), as given to `build_unet`: a
    pixel-space UNet has that many input/output channels (None: 3); latent ones always 4.
    Raises ModelSettingsError if the preset cannot be expressed in diffusers (its sinusoidal
    timestep embedding must be `level_channels[0]` wide, as diffusers ties the two).
    """
    preset = get_preset(preset)
    if preset.timestep_embedding_dim != preset.level_channels[0]:
        raise ModelSettingsError(f"preset {preset.name} cannot be written for diffusers: its timestep embedding "
                                 f"is {preset.timestep_embedding_dim} wide, diffusers requires "
                                 f"block_out_channels[0] = {preset.level_channels[0]}")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in preset.level_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(preset.level_attention)]
    size = sample_size or (preset.image_size // preset.downsample if preset.image_size else 32)
    channels = preset.unet_channels(image_channels) if image_channels else preset.latent_channels
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION}
    config.update(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(preset.level_channels),
        layers_per_block=preset.num_res_blocks,
        attention_head_dim=list(preset.level_heads),  # diffusers' name for the number of heads
        cross_attention_dim=preset.context_dim,
        use_linear_projection=preset.linear_attention_projection,
        norm_num_groups=preset.norm_groups,
    )
    config.update({key: value for key, value in _UNET_FIXED.items()
                   if key not in ("num_attention_heads",)})
    return config


# --------------------------------------------------------------------------------------
# UNet: the weight plan
# --------------------------------------------------------------------------------------

# Inside each of our blocks: (attribute path of the Keras leaf layer, diffusers sub-name).
_RESNET_PARTS = (
    ("norm1", "norm1"), ("conv1.conv2d", "conv1"), ("embedding_dense", "time_emb_proj"),
    ("norm2", "norm2"), ("conv2.conv2d", "conv2"), ("residual_projection.conv2d", "conv_shortcut"),
)
_TRANSFORMER_PARTS = (
    ("norm", "norm"), ("proj_in", "proj_in"), ("proj_out", "proj_out"),
    ("transformer_block.norm1", "transformer_blocks.0.norm1"),
    ("transformer_block.attn1.to_q", "transformer_blocks.0.attn1.to_q"),
    ("transformer_block.attn1.to_k", "transformer_blocks.0.attn1.to_k"),
    ("transformer_block.attn1.to_v", "transformer_blocks.0.attn1.to_v"),
    ("transformer_block.attn1.out_proj", "transformer_blocks.0.attn1.to_out.0"),
    ("transformer_block.norm2", "transformer_blocks.0.norm2"),
    ("transformer_block.attn2.to_q", "transformer_blocks.0.attn2.to_q"),
    ("transformer_block.attn2.to_k", "transformer_blocks.0.attn2.to_k"),
    ("transformer_block.attn2.to_v", "transformer_blocks.0.attn2.to_v"),
    ("transformer_block.attn2.out_proj", "transformer_blocks.0.attn2.to_out.0"),
    ("transformer_block.norm3", "transformer_blocks.0.norm3"),
    ("transformer_block.geglu.dense", "transformer_blocks.0.ff.net.0.proj"),
    ("transformer_block.dense", "transformer_blocks.0.ff.net.2"),
)
_PARTS = {
    "UNetResBlock": _RESNET_PARTS,
    "SpatialTransformer": _TRANSFORMER_PARTS,
    "Upsample": (("conv.conv2d", "conv"),),
    "PaddedConv2D": (("conv2d", ""),),
    "Dense": (("", ""),),
    "GroupNorm": (("", ""),),
    "VAEResBlock": tuple(part for part in _RESNET_PARTS if part[0] != "embedding_dense"),
    # diffusers' VAE attention projections are Linear layers; ours are 1x1 convolutions.
    "VAEAttentionBlock": (("norm", "group_norm"), ("q.conv2d", "to_q", True), ("k.conv2d", "to_k", True),
                          ("v.conv2d", "to_v", True), ("proj_out.conv2d", "to_out.0", True)),
}


def _unet_block_prefixes(preset):
    """Diffusers name prefixes of the UNet's blocks, by our block type, in data-flow order.

    The loops are `build_unet`'s; within one block type the order of our model's layers
    is the data-flow order too, so the two lists pair up one to one.
    """
    levels = len(preset.level_channels)
    prefixes = {"Dense": ["time_embedding.linear_1", "time_embedding.linear_2"],
                "PaddedConv2D": ["conv_in"], "UNetResBlock": [], "SpatialTransformer": [],
                "Upsample": [], "GroupNorm": []}
    for level in range(levels):
        for j in range(preset.num_res_blocks):
            prefixes["UNetResBlock"].append(f"down_blocks.{level}.resnets.{j}")
            if preset.level_attention[level]:
                prefixes["SpatialTransformer"].append(f"down_blocks.{level}.attentions.{j}")
        if level < levels - 1:
            prefixes["PaddedConv2D"].append(f"down_blocks.{level}.downsamplers.0.conv")
    prefixes["UNetResBlock"] += ["mid_block.resnets.0", "mid_block.resnets.1"]
    # The middle attention sits between the middle ResBlocks in data flow; among the
    # SpatialTransformers it comes after the down path's and before the up path's.
    prefixes["SpatialTransformer"].append("mid_block.attentions.0")
    for k, level in enumerate(reversed(range(levels))):
        for j in range(preset.num_res_blocks + 1):
            prefixes["UNetResBlock"].append(f"up_blocks.{k}.resnets.{j}")
            if preset.level_attention[level]:
                prefixes["SpatialTransformer"].append(f"up_blocks.{k}.attentions.{j}")
        if level > 0:
            prefixes["Upsample"].append(f"up_blocks.{k}.upsamplers.0")
    prefixes["GroupNorm"].append("conv_norm_out")
    prefixes["PaddedConv2D"].append("conv_out")
    return prefixes


def _leaf(layer, path):
    for attribute in filter(None, path.split(".")):
        layer = getattr(layer, attribute)
        if layer is None:
            return None
    return layer


def _join(*names):
    return ".".join(name for name in names if name)


def _plan(model, block_prefixes):
    """[(diffusers prefix, Keras leaf layer, linear)] for every weight-owning leaf of `model`.

    `block_prefixes` maps our block type to the diffusers prefixes of its blocks in
    data-flow order; `linear` marks a diffusers Linear held by our 1x1 convolution.
    """
    by_type = {}
    for layer in model.layers:
        if layer.weights:
            by_type.setdefault(type(layer).__name__, []).append(layer)
    unknown = sorted(set(by_type) - set(block_prefixes))
    if unknown:
        raise ValueError(f"{model.name}: no diffusers mapping for layers of type {', '.join(unknown)}")
    plan = []
    for kind, prefixes in block_prefixes.items():
        layers = by_type.get(kind, [])
        if len(layers) != len(prefixes):
            raise ValueError(f"{model.name}: {len(layers)} {kind} layers, the plan expects {len(prefixes)}")
        for layer, prefix in zip(layers, prefixes):
            for part in _PARTS[kind]:
                path, sub_name, linear = part if len(part) == 3 else (*part, False)
                leaf = _leaf(layer, path)
                if leaf is not None:
                    plan.append((_join(prefix, sub_name), leaf, linear))
    return plan


# --------------------------------------------------------------------------------------
# Tensor layouts
# --------------------------------------------------------------------------------------

def _torch_name(variable):
    """Our leaf variable -> its diffusers tensor name ('weight' or 'bias')."""
    return {"kernel": "weight", "gamma": "weight", "bias": "bias", "beta": "bias"}[_variable_kind(variable)]


def _variable_kind(variable):
    return variable.path.rsplit("/", 1)[-1]


def _to_keras(array, variable):
    """A diffusers tensor in the layout of our variable (conv/linear kernels transposed)."""
    if _variable_kind(variable) != "kernel":
        return array
    if array.ndim == 4:    # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:    # Linear (out, in) -> (in, out); into a 1x1 conv: (1, 1, in, out)
        return array.T.reshape(variable.shape) if len(variable.shape) == 4 else array.T
    return array


def _to_torch(array, variable, linear):
    """Our variable's value in the diffusers layout (`linear`: a Linear kept as our 1x1 conv)."""
    if _variable_kind(variable) != "kernel":
        return array
    if array.ndim == 4:
        return array[0, 0].T if linear else array.transpose(3, 2, 0, 1)
    return array.T


def _entries(plan):
    """[(diffusers tensor name, Keras variable, linear)] of a plan."""
    return [(f"{prefix}.{_torch_name(variable)}", variable, linear)
            for prefix, leaf, linear in plan for variable in leaf.weights]


def _load_entries(entries, tensors, what):
    """Checks every tensor, then assigns them all; names what is missing, mismatched or unexpected."""
    missing, mismatched, arrays = [], [], []
    for name, variable, linear in entries:
        if name not in tensors:
            missing.append(name)
            continue
        expected = _to_torch(np.zeros(variable.shape, np.float32), variable, linear).shape
        if tuple(tensors[name].shape) != tuple(expected):
            mismatched.append(f"{name} {tuple(tensors[name].shape)} (expected {tuple(expected)})")
            continue
        arrays.append((variable, _to_keras(tensors[name], variable)))
    known = {name for name, _, _ in entries}
    unexpected = sorted(name for name in tensors if name not in known)
    problems = []
    for label, names in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
        if names:
            shown = ", ".join(names[:_MAX_NAMED])
            more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
            problems.append(f"{label} {len(names)}: {shown}{more}")
    if problems:
        raise CheckpointError(f"the {what} tensors do not fit our model: " + "; ".join(problems))
    for variable, array in arrays:
        variable.assign(array)


def _export_entries(entries):
    return {name: np.ascontiguousarray(_to_torch(np.asarray(variable.numpy(), np.float32), variable, linear))
            for name, variable, linear in entries}


def unet_entries(unet, preset):
    """[(diffusers tensor name, Keras variable)] for every weight of our UNet."""
    return _entries(_plan(unet, _unet_block_prefixes(get_preset(preset))))


def unet_module_names(unet, preset):
    """{id(Keras leaf layer): its diffusers module name} of our UNet (e.g. an attention projection ->
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"); LoRA export names adapters by it."""
    return {id(leaf): prefix for prefix, leaf, _ in _plan(unet, _unet_block_prefixes(get_preset(preset)))}


def load_unet_weights(unet, preset, tensors):
    """Assigns diffusers UNet `tensors` ({name: array}) to our `unet` (built from `preset`)."""
    _load_entries(unet_entries(unet, preset), tensors, "diffusers UNet")


def unet_tensors(unet, preset):
    """Our UNet's weights as diffusers tensors ({name: float32 array in PyTorch layout})."""
    return _export_entries(unet_entries(unet, preset))


def unet_image_channels(unet):
    """The input/output channels our built UNet has (its `latent` input's last dimension)."""
    return int(unet.inputs[0].shape[-1])


def save_unet_as_diffusers(unet, preset, folder, sample_size=None):
    """Writes our UNet as a diffusers `UNet2DConditionModel` folder (config.json + safetensors).

    The config's in/out channels are the UNet's own (a grey pixel-space UNet has 1).
    """
    config = diffusers_unet_config(preset, sample_size, image_channels=unet_image_channels(unet))
    write_diffusers_model(folder, config, unet_tensors(unet, preset))
    return config


# --------------------------------------------------------------------------------------
# Autoencoder (AutoencoderKL): Stable Diffusion's VAE, the only layout our builders make
# --------------------------------------------------------------------------------------

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# diffusers' (and the PyTorch original's) GroupNorm epsilon in the VAE; keras-cv uses 1e-5.
VAE_NORM_EPSILON = 1e-6
# Checkpoints saved before diffusers 0.14 name the VAE attention's projections so.
_LEGACY_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def check_autoencoder_config(config):
    """Raises ModelSettingsError unless `config` is Stable Diffusion's AutoencoderKL (SD 1.x and 2.x share it)."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ModelSettingsError(f"expected a diffusers AutoencoderKL config, got {name}")
    for key, expected in VAE_CONFIG.items():
        value = config.get(key, expected)
        if isinstance(value, tuple):
            value = list(value)
        if key == "scaling_factor" and value is not None and abs(value - expected) < 1e-9:
            continue
        if value != expected:
            raise ModelSettingsError(f"unsupported diffusers AutoencoderKL config: {key}={value!r} "
                                     f"(our autoencoder is Stable Diffusion's: {expected!r})")


def build_diffusers_autoencoder(image_size=None):
    """Our image encoder and decoder with diffusers' GroupNorm epsilon, for AutoencoderKL weights.

    Example:
        >>> encoder, decoder = build_diffusers_autoencoder(128)
        >>> load_autoencoder_weights(encoder, decoder, read_diffusers_model("sd15/vae")[1])
    """
    from Models.diffusion.autoencoder import build_image_decoder, build_image_encoder

    return (build_image_encoder(image_size, norm_epsilon=VAE_NORM_EPSILON),
            build_image_decoder(image_size, norm_epsilon=VAE_NORM_EPSILON))


def _vae_block_prefixes():
    channels, layers = VAE_CONFIG["block_out_channels"], VAE_CONFIG["layers_per_block"]
    levels = len(channels)
    encoder = {
        "PaddedConv2D": ["encoder.conv_in"]
        + [f"encoder.down_blocks.{i}.downsamplers.0.conv" for i in range(levels - 1)]
        + ["encoder.conv_out", "quant_conv"],
        "VAEResBlock": [f"encoder.down_blocks.{i}.resnets.{j}" for i in range(levels) for j in range(layers)]
        + ["encoder.mid_block.resnets.0", "encoder.mid_block.resnets.1"],
        "VAEAttentionBlock": ["encoder.mid_block.attentions.0"],
        "GroupNorm": ["encoder.conv_norm_out"],
    }
    decoder = {
        "PaddedConv2D": ["post_quant_conv", "decoder.conv_in"]
        + [f"decoder.up_blocks.{i}.upsamplers.0.conv" for i in range(levels - 1)]
        + ["decoder.conv_out"],
        "VAEResBlock": ["decoder.mid_block.resnets.0", "decoder.mid_block.resnets.1"]
        + [f"decoder.up_blocks.{i}.resnets.{j}" for i in range(levels) for j in range(layers + 1)],
        "VAEAttentionBlock": ["decoder.mid_block.attentions.0"],
        "GroupNorm": ["decoder.conv_norm_out"],
    }
    return encoder, decoder


def autoencoder_entries(image_encoder, image_decoder):
    """[(diffusers tensor name, Keras variable, linear)] of our image encoder and decoder."""
    encoder_prefixes, decoder_prefixes = _vae_block_prefixes()
    return (_entries(_plan(image_encoder, encoder_prefixes))
            + _entries(_plan(image_decoder, decoder_prefixes)))


def _modern_vae_names(tensors):
    renamed = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _LEGACY_VAE_NAMES and "attentions" in parts:
            name = ".".join(parts[:-2] + [_LEGACY_VAE_NAMES[parts[-2]], parts[-1]])
        renamed[name] = value
    return renamed


def load_autoencoder_weights(image_encoder, image_decoder, tensors):
    """Assigns diffusers AutoencoderKL `tensors` to our image encoder and decoder (autoencoder.py)."""
    _load_entries(autoencoder_entries(image_encoder, image_decoder), _modern_vae_names(tensors),
                  "diffusers AutoencoderKL")


def autoencoder_tensors(image_encoder, image_decoder):
    """Our autoencoder's weights as diffusers AutoencoderKL tensors (PyTorch layout)."""
    return _export_entries(autoencoder_entries(image_encoder, image_decoder))


def save_autoencoder_as_diffusers(image_encoder, image_decoder, folder, sample_size=None):
    """Writes our autoencoder as a diffusers `AutoencoderKL` folder (config.json + safetensors)."""
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
              "sample_size": sample_size or 512, "force_upcast": True, **VAE_CONFIG}
    write_diffusers_model(folder, config, autoencoder_tensors(image_encoder, image_decoder))
    return config
