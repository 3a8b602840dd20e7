"""CLIP's text encoder in keras.ops: token ids (B, 77) -> per-token context (B, 77, width).

The graph of keras-cv's `TextEncoder` (Stable Diffusion v1: 12 layers, 768 wide, 12 heads,
quick GELU) and `TextEncoderV2` (v2: 23 layers, 1024 wide, 16 heads, tanh GELU), layer for
layer and weight for weight, so keras-cv's published weight files load unchanged
(`load_pretrained_weights(encoder, "text_encoder_sd1")`, Models/diffusion/weights.py):

    token embedding + position embedding
    -> layers x [x + attention(LayerNorm(x)) (causal);  x + fc2(act(fc1(LayerNorm(x))))]
    -> LayerNorm

Legacy Keras-2 `.h5` files load by order (Models/diffusion/layers.py), so each block creates
its sub-layers in keras-cv's order; do not reorder attribute assignments.

The encoder also runs from token embeddings (`embed_tokens`, then `encode_embeddings`), which
is how textual inversion puts its learned embeddings in place of placeholder tokens.

Example:
    >>> encoder = build_text_encoder("clip_vit_l14")
    >>> load_pretrained_weights(encoder, "text_encoder_sd1")
    >>> tokens = ClipTokenizer()(["a photo of a cat."], pad_id=49407)        # (1, 77)
    >>> encoder(tokens).shape
    (1, 77, 768)
"""

import keras
from keras import ops

from Models.diffusion.presets import TEXT_ENCODERS, TextEncoderPreset
from Models.errors import ModelSettingsError


def quick_gelu(x):
    """CLIP's activation, x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_approximate": lambda x: ops.gelu(x, approximate=True)}


@keras.saving.register_keras_serializable(package="sddg")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token ids (B, L) -> token embedding + the embedding of each position 0..L-1 (keras-cv's CLIPEmbedding).

    Example:
        >>> TokenAndPositionEmbedding(49408, 768, 77)(keras.ops.zeros((2, 77), "int32")).shape
        (2, 77, 768)
    """

    def __init__(self, vocab_size, width, max_length, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.width, self.max_length = int(vocab_size), int(width), int(max_length)
        self.token_embedding = keras.layers.Embedding(self.vocab_size, self.width, name="token_embedding")
        self.position_embedding = keras.layers.Embedding(self.max_length, self.width, name="position_embedding")

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.position_embedding.build(input_shape)

    def add_positions(self, x):
        """Token embeddings (B, L, width) -> + the position embeddings."""
        length = ops.shape(x)[1]
        return x + self.position_embedding(ops.arange(length, dtype="int32"))[None]

    def call(self, tokens):
        return self.add_positions(self.token_embedding(tokens))

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "width": self.width,
                "max_length": self.max_length}


@keras.saving.register_keras_serializable(package="sddg")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head self-attention where token i sees tokens 0..i (keras-cv's CLIPAttention).

    Example:
        >>> CausalSelfAttention(768, 12)(keras.ops.zeros((2, 77, 768))).shape
        (2, 77, 768)
    """

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = int(width), int(heads)
        self.head_size = self.width // self.heads
        self.q_proj = keras.layers.Dense(self.width, name="q_proj")
        self.k_proj = keras.layers.Dense(self.width, name="k_proj")
        self.v_proj = keras.layers.Dense(self.width, name="v_proj")
        self.out_proj = keras.layers.Dense(self.width, name="out_proj")

    def build(self, input_shape):
        for dense in (self.q_proj, self.k_proj, self.v_proj):
            dense.build(input_shape)
        self.out_proj.build(input_shape)

    def _split_heads(self, x):  # (B, L, width) -> (B, heads, L, head_size)
        x = ops.reshape(x, (ops.shape(x)[0], -1, self.heads, self.head_size))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, x):
        length = ops.shape(x)[1]
        q = self._split_heads(self.q_proj(x) * self.head_size ** -0.5)
        k, v = self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        # Every row keeps its diagonal, so no row is all -inf.
        future = ops.triu(ops.ones((length, length), "bool"), k=1)
        scores = ops.where(future[None, None], ops.cast(float("-inf"), scores.dtype), scores)
        out = ops.matmul(ops.softmax(scores, axis=-1), v)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (ops.shape(x)[0], length, self.width))
        return self.out_proj(out)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


@keras.saving.register_keras_serializable(package="sddg")
class TextEncoderLayer(keras.layers.Layer):
    """Pre-LayerNorm transformer block: causal self-attention, then an MLP 4x as wide (keras-cv's CLIPEncoderLayer).

    Example:
        >>> TextEncoderLayer(768, 12, "quick_gelu")(keras.ops.zeros((2, 77, 768))).shape
        (2, 77, 768)
    """

    def __init__(self, width, heads, activation, **kwargs):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS:
            raise ModelSettingsError(f"unknown text-encoder activation {activation!r}; "
                                     f"choose one of {', '.join(ACTIVATIONS)}")
        self.width, self.heads, self.activation = int(width), int(heads), activation
        # keras-cv's order: layer_norm1, attention, layer_norm2, fc1, fc2.
        self.layer_norm1 = keras.layers.LayerNormalization(epsilon=1e-5, name="layer_norm1")
        self.attention = CausalSelfAttention(self.width, self.heads, name="attention")
        self.layer_norm2 = keras.layers.LayerNormalization(epsilon=1e-5, name="layer_norm2")
        self.fc1 = keras.layers.Dense(4 * self.width, name="fc1")
        self.fc2 = keras.layers.Dense(self.width, name="fc2")

    def build(self, input_shape):
        self.layer_norm1.build(input_shape)
        self.attention.build(input_shape)
        self.layer_norm2.build(input_shape)
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], 4 * self.width))

    def call(self, x):
        x = x + self.attention(self.layer_norm1(x))
        return x + self.fc2(ACTIVATIONS[self.activation](self.fc1(self.layer_norm2(x))))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "activation": self.activation}


class TextEncoder(keras.Model):
    """A CLIP text encoder of `preset` (a `TextEncoderPreset` or a TEXT_ENCODERS name); see the module docstring.

    Its layers with weights, in order: the embedding, `layers` TextEncoderLayers, the final
    LayerNorm (keras-cv's functional model has the same, after its two weightless inputs).
    """

    def __init__(self, preset, **kwargs):
        kwargs.setdefault("name", "text_encoder")
        super().__init__(**kwargs)
        self.preset = get_text_preset(preset)
        p = self.preset
        self.embedding = TokenAndPositionEmbedding(p.vocab_size, p.width, p.max_length, name="embedding")
        self.encoder_layers = [TextEncoderLayer(p.width, p.heads, p.activation, name=f"layer_{i:02d}")
                               for i in range(p.layers)]
        self.final_layer_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_layer_norm")
        self.embedding.build((None, p.max_length))
        for layer in self.encoder_layers:
            layer.build((None, p.max_length, p.width))
        self.final_layer_norm.build((None, p.max_length, p.width))
        self.built = True

    def embed_tokens(self, tokens):
        """Token ids (B, L) -> token embeddings (B, L, width), before the positions."""
        return self.embedding.token_embedding(ops.cast(tokens, "int32"))

    def encode_embeddings(self, x):
        """Token embeddings (B, L, width) -> the context (B, L, width): + positions, the layers, LayerNorm."""
        x = self.embedding.add_positions(x)
        for layer in self.encoder_layers:
            x = layer(x)
        return self.final_layer_norm(x)

    def call(self, tokens):
        return self.encode_embeddings(self.embed_tokens(tokens))


def get_text_preset(preset):
    """A TextEncoderPreset by name (a TextEncoderPreset passes through)."""
    if isinstance(preset, TextEncoderPreset):
        return preset
    try:
        return TEXT_ENCODERS[preset]
    except KeyError:
        raise ModelSettingsError(f"unknown text encoder {preset!r}; choose one of {', '.join(TEXT_ENCODERS)}") from None


def build_text_encoder(preset, pretrained=False):
    """A `TextEncoder` of `preset`; `pretrained`: with keras-cv's published weights (downloaded on
    first use; offline and missing, a one-line CheckpointError naming the file and where to put it)."""
    encoder = TextEncoder(preset)
    if pretrained:
        if encoder.preset.weights is None:
            raise ModelSettingsError(f"text encoder {encoder.preset.name} has no published weights")
        from Models.diffusion.weights import load_pretrained_weights

        load_pretrained_weights(encoder, encoder.preset.weights)
    return encoder
