"""LoRA fine-tuning of the UNet: low-rank adapters on the attention projections.

`--unet_tuning lora` (SD_adapting.py's dif stage) trains, in place of the whole UNet,
W' = W + (alpha / rank) * A @ B on every attention projection (diffusers' `to_q`,
`to_k`, `to_v`, `to_out.0` of both attentions of every transformer block; the
targets of diffusers' train_text_to_image_lora.py). A (in, rank) starts random, B
(rank, out) starts at zero, so before the first step the adapted UNet is the base UNet
exactly; the base weights stay frozen, and checkpoints hold only A and B.

The adapters are Keras' own (`keras.layers.Dense.enable_lora`: the kernel read in
`call` is the frozen kernel plus the low-rank product). For sampling they are merged
into the kernels of a plain UNet (`merge_adapters`): no extra work per step, and the
UNet is the same graph generation always uses. `diffusers_lora_tensors` gives them in
the layout a PyTorch pipeline loads with `load_lora_weights` (`save_diffusers_lora`).

Example:
    >>> adapters = add_adapters(unet, rank=4)          # B = 0: the UNet's output is unchanged
    >>> freeze_base_weights(unet)                      # only the adapters train
    >>> values = [v.numpy() for v in adapters.weights] # what a checkpoint holds
    >>> plain = build_unet(preset, 128); plain.set_weights(base_weights)
    >>> merge_adapters(plain, values, alpha=4.0)       # plain now computes what unet does
    >>> save_diffusers_lora(unet, preset, "exported/lora")   # pytorch_lora_weights.safetensors
"""

import numpy as np
from keras import ops

from Models.errors import CheckpointError

TARGET_PROJECTIONS = ("to_q", "to_k", "to_v", "out_proj")  # ours; diffusers: to_q, to_k, to_v, to_out.0
ADAPTERS_PART = "unet_lora"  # the group of a LoRA checkpoint's weights file
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights


def target_layers(unet):
    """The Dense layers that take adapters, in a fixed order (the UNet's layer order, then q, k, v, out)."""
    from Models.diffusion.layers import SpatialTransformer

    layers = []
    for block in unet.layers:
        if isinstance(block, SpatialTransformer):
            for attention in (block.transformer_block.attn1, block.transformer_block.attn2):
                layers += [getattr(attention, name) for name in TARGET_PROJECTIONS]
    return layers


class Adapters:
    """The adapter weights of a UNet as one checkpoint part: `weights` (A, B of each target layer, in
    `target_layers` order) and `set_weights`, as `checkpoints.save_parts` / `load_parts` need."""

    def __init__(self, unet):
        self.layers = [layer for layer in target_layers(unet) if layer.lora_enabled]

    @property
    def weights(self):
        return [v for layer in self.layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)]

    def set_weights(self, values):
        for variable, value in zip(self.weights, values, strict=True):
            variable.assign(value)


def has_adapters(unet):
    return any(layer.lora_enabled for layer in target_layers(unet))


def add_adapters(unet, rank, alpha=None):
    """Adds rank-`rank` adapters (scale alpha / rank; alpha None = rank) to every target layer of a
    built UNet. A is drawn from Keras' global seed (set it first), B is zero. Returns `Adapters`."""
    alpha = float(rank if alpha is None else alpha)
    for layer in target_layers(unet):
        layer.enable_lora(int(rank), lora_alpha=alpha, a_initializer="he_uniform", b_initializer="zeros")
    return Adapters(unet)


def freeze_base_weights(unet):
    """Every weight of the UNet except the adapters stops training (`unet.trainable = True` undoes it)."""
    adapters = {id(v) for v in Adapters(unet).weights}
    for variable in unet.weights:
        variable.trainable = id(variable) in adapters


def adapter_scale(rank, alpha):
    return float(alpha) / float(rank)


def merge_adapters(unet, values, alpha):
    """Adds (alpha / rank) * A @ B of each adapter (`values`: A, B, ... as `Adapters.weights`) to the
    kernels of a UNet without adapters: afterwards it computes what the adapted UNet computed."""
    layers = target_layers(unet)
    if len(values) != 2 * len(layers) or any(layer.lora_enabled for layer in layers):
        raise CheckpointError(f"{len(values) // 2} adapters do not fit a UNet with {len(layers)} "
                              f"attention projections (another preset?)")
    for layer, a, b in zip(layers, values[0::2], values[1::2]):
        kernel = ops.convert_to_numpy(layer.kernel)
        if a.shape != (kernel.shape[0], a.shape[1]) or b.shape != (a.shape[1], kernel.shape[1]):
            raise CheckpointError(f"adapter shapes {a.shape} x {b.shape} do not fit the kernel {kernel.shape} "
                                  f"of {layer.path}")
        update = adapter_scale(a.shape[1], alpha) * np.matmul(a.astype(np.float32), b.astype(np.float32))
        layer.kernel.assign((kernel.astype(np.float32) + update).astype(kernel.dtype))


def diffusers_lora_tensors(unet, preset):
    """The adapters as diffusers LoRA tensors: {"unet.<module>.lora_A.weight": (rank, in),
    "unet.<module>.lora_B.weight": (out, rank)} with the scale folded into B, so the file needs
    no alpha: loaded with the default alpha (= rank), W + B @ A is our W + (alpha / rank) * A @ B."""
    from Models.diffusion.diffusers_convert import unet_module_names

    names = unet_module_names(unet, preset)
    tensors = {}
    for layer in Adapters(unet).layers:
        a = ops.convert_to_numpy(layer.lora_kernel_a).astype(np.float32)
        b = ops.convert_to_numpy(layer.lora_kernel_b).astype(np.float32)
        module = f"unet.{names[id(layer)]}"
        tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        scale = adapter_scale(layer.lora_rank, layer.lora_alpha)
        tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(scale * b.T)
    if not tensors:
        raise CheckpointError("the UNet has no adapters to export")
    return tensors


def save_diffusers_lora(unet, preset, folder):
    """Writes `folder/pytorch_lora_weights.safetensors` (atomically); a PyTorch
    `StableDiffusionPipeline.load_lora_weights(folder)` or `UNet2DConditionModel.load_lora_adapter`
    reads it. Returns its path."""
    from pathlib import Path

    from safetensors.numpy import save_file

    from Utils.io import atomic_path

    path = Path(folder) / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = diffusers_lora_tensors(unet, preset)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path
