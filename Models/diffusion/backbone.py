"""The networks of class-conditional Stable Diffusion, and how each is called.

`ClassConditionalBackbone` holds the conditioning (label -> context: the paper's class encoder,
or a text method, Models/diffusion/conditioning.py), the
UNet (noisy x_t + timestep + context -> its prediction) and, for latent presets, the
frozen autoencoder (images <-> latents x 0.18215). It knows nothing about noise
schedules, sampling or training: `ClassConditionalGenerator` (generator.py) samples
with it, `DiffusionTrainer` (trainer.py) trains it.

Example:
    >>> backbone = ClassConditionalBackbone("tiny", num_classes=10, image_size=8, image_channels=1)
    >>> x0 = backbone.encode_images(images)                 # uint8 (B, 8, 8, 3) -> [-1, 1] (B, 8, 8, 1)
    >>> context, uncond = backbone.contexts([0, 1, 2])      # (3, L, D), (1, L, D)
    >>> eps = backbone.predict(x_t, timesteps, context)     # the UNet's output, float32
    >>> images = backbone.decode(x0)                        # [-1, 1] pixels
"""

import keras
from keras import ops

from Models.diffusion.class_encoder import ClassEncoder
from Models.diffusion.conditioning import ClassEncoderConditioning
from Models.diffusion.presets import get_preset
from Models.diffusion.unet import build_unet, timestep_embedding


class ClassConditionalBackbone(keras.layers.Layer):
    """UNet + class encoder (+ frozen image encoder/decoder for latent presets).

    A container of the parts (`unet`, `class_encoder`, `image_encoder`, `image_decoder`)
    with methods for each way they are called; Keras tracks their weights through it.

    Args:
        preset: a preset name or `DiffusionPreset` ("sd1", "sd2", "tiny", "small").
        num_classes: number of classes (width of the one-hot label).
        image_size: image size in pixels (sd presets: 128; pixel presets: the dataset's native size).
        image_channels: the dataset's channels (1 or 3); pixel presets model them.
        unet, class_encoder, image_encoder, image_decoder: prebuilt parts (default: built here;
            the autoencoder of latent presets is built on first use).
        conditioning: a prebuilt conditioning layer (`Models.diffusion.conditioning`; default: the
            class encoder, `class_encoder` or a new one).

    Example:
        >>> backbone = ClassConditionalBackbone("sd1", num_classes=5, image_size=128)
        >>> load_pretrained_weights(backbone.unet, "unet_sd1")    # Models/diffusion/weights.py
        >>> latents = backbone.encode_images(images)              # (B, 16, 16, 4)
    """

    def __init__(self, preset, num_classes, image_size, image_channels=3, unet=None, class_encoder=None,
                 image_encoder=None, image_decoder=None, conditioning=None, **kwargs):
        kwargs.setdefault("name", "class_conditional_backbone")
        super().__init__(**kwargs)
        self.preset = get_preset(preset)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.image_channels = int(image_channels)
        # Tracked in this order (UNet, conditioning, autoencoder): the order of the trained
        # variables, which optimizer checkpoints rely on.
        length = conditioning.context_length if conditioning is not None else self.preset.context_length
        self.unet = unet or build_unet(self.preset, self.image_size, length, image_channels=self.image_channels)
        if conditioning is None:
            class_encoder = class_encoder or ClassEncoder(
                self.num_classes, self.preset.context_length, self.preset.context_dim,
                hidden=self.preset.class_encoder_hidden, name="class_encoder")
            if not class_encoder.built:
                class_encoder.build((None, self.num_classes))
            conditioning = ClassEncoderConditioning(class_encoder)
        self.conditioning = conditioning
        self._image_encoder = image_encoder
        self._image_decoder = image_decoder
        self.freeze_autoencoder()
        self.built = True

    # ----- shapes --------------------------------------------------------------------------
    @property
    def latent_size(self):
        """Spatial size of the UNet's input: image_size / 8 for latent presets."""
        return self.image_size // self.preset.downsample

    @property
    def unet_channels(self):
        """Channels the UNet sees: the latents' 4, or the dataset's own (1 grey, 3 RGB)."""
        return self.preset.unet_channels(self.image_channels)

    @property
    def noise_shape(self):
        """The shape of one image's x_t: (latent_size, latent_size, unet_channels)."""
        return (self.latent_size, self.latent_size, self.unet_channels)

    # ----- the autoencoder -----------------------------------------------------------------
    @property
    def image_encoder(self):
        """The frozen autoencoder encoder (latent presets only), built on first use."""
        if not self.preset.latent:
            return None
        if self._image_encoder is None:
            from Models.diffusion.autoencoder import build_image_encoder

            self._image_encoder = build_image_encoder(self.image_size)
        self._image_encoder.trainable = False
        return self._image_encoder

    @property
    def image_decoder(self):
        """The frozen autoencoder decoder (latent presets only), built on first use."""
        if not self.preset.latent:
            return None
        if self._image_decoder is None:
            from Models.diffusion.autoencoder import build_image_decoder

            self._image_decoder = build_image_decoder(self.image_size)
        self._image_decoder.trainable = False
        return self._image_decoder

    def freeze_autoencoder(self):
        """The autoencoder never trains (it is Stable Diffusion's, frozen in every stage)."""
        for part in (self._image_encoder, self._image_decoder):
            if part is not None:
                part.trainable = False

    def encode_images(self, images):
        """uint8-valued images (B, S, S, 3) -> the UNet's x_0: pixels in [-1, 1], or latents."""
        x = ops.cast(images, "float32") / 127.5 - 1.0
        if self.preset.latent:
            return ops.cast(self.image_encoder(x, training=False), "float32")
        return x[..., :self.unet_channels]  # grey data arrives as three equal channels

    def decode(self, x0):
        """The UNet's x_0 (NumPy, a batch) -> pixels in [-1, 1]: decoded latents, or x_0 itself."""
        if self.preset.latent:
            return self.image_decoder.predict_on_batch(x0)
        return x0

    # ----- the conditioning and the UNet ----------------------------------------------------
    @property
    def class_encoder(self):
        """The class encoder of the `class_encoder` method (None for the text methods)."""
        return getattr(self.conditioning, "class_encoder", None)

    def encode_labels(self, one_hot, training=False):
        """One-hot labels (B, num_classes) -> contexts (B, L, D) of the class encoder; the all-zero row
        is the unconditional one."""
        return self.class_encoder(one_hot, training=training)

    def contexts(self, labels, indices=None, seed=0):
        """Conditional contexts (B, L, D) for integer labels, and the unconditional one (1, L, D).

        `indices` (each image's index within its class) and `seed` choose the prompts of the text methods."""
        return self.conditioning.contexts(labels, indices=indices, seed=seed)

    def predict(self, x_t, timesteps, context, training=False):
        """The UNet's output (noise or v, float32) for noisy x_t (B, s, s, C) at integer timesteps (B,)."""
        t_emb = timestep_embedding(timesteps, self.preset.timestep_embedding_dim)
        return ops.cast(self.unet([x_t, t_emb, context], training=training), "float32")
