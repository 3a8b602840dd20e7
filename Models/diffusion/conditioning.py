"""How a class label becomes the UNet's context: the conditioning methods, one interface.

Every method turns integer labels into the context (B, L, D) the UNet cross-attends to, and
has its own unconditional context (1, L, D) that classifier-free guidance starts from. The
sampler, training, tuning, generation, CAS and the report are the same for all of them.

| method | context | unconditional | the enc stage trains |
| --- | --- | --- | --- |
| `class_encoder` (the paper's, default) | one-hot -> Dense -> Dense -> (100, D) | the all-zero label | the class encoder |
| `ordinal_class_encoder` (graded classes) | grade k as ones at 0..k -> the same class encoder | the all-zero label | the class encoder |
| `text` | CLIP text encoder of a prompt from templates over the label names | the empty prompt | nothing |
| `textual_inversion` | the same, the prompt naming the class by placeholder tokens | the empty prompt | the placeholders' embeddings |

(Presets without pretrained weights, `tiny` and `small`, also train the UNet from scratch in
the enc stage, whatever the method.) Text prompts: each image draws one template, by
(seed, class, index within class) when generating, so the same seed gives the same images;
by the trainer's seeded generator when training. The CLIP text encoder is frozen in every stage.

`ConditioningSpec` is the data (method, templates, placeholders per class); `build_conditioning`
makes the layer. Each layer has:

    contexts(labels, indices, seed) -> (context (B, L, D), uncond (1, L, D))       generation
    training_context(labels, keep, seed_generator, training) -> (B, L, D)          the loss; keep: cond dropout
    trained_parts() -> {name: layer}                                               what an enc checkpoint holds

Example:
    >>> spec = ConditioningSpec("text", templates=("a photo of a {label}.",))
    >>> conditioning = build_conditioning(spec, get_preset("tiny"), label_names=("zero", "one"))
    >>> context, uncond = conditioning.contexts([0, 1], indices=[0, 0], seed=0)    # (2, 77, 64), (1, 77, 64)
"""

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import ops

from Models.errors import ModelSettingsError

from Models.diffusion.presets import CONDITIONINGS, DEFAULT_CONDITIONING, TEXT_CONDITIONINGS
# The prompts of the text methods, after CLIP's zero-shot ImageNet templates.
DEFAULT_TEMPLATES = (
    "a photo of a {label}.",
    "a close-up photo of a {label}.",
    "a photo of the {label}.",
    "a low resolution photo of a {label}.",
    "a cropped photo of a {label}.",
    "a bright photo of a {label}.",
    "a good photo of a {label}.",
    "a photo of one {label}.",
)
# A separate stream of (seed, class, index): the template draw must not move the image's noise.
_TEMPLATE_STREAM = 7


@dataclass(frozen=True)
class ConditioningSpec:
    """A conditioning method and its settings (recorded in settings.json, manifests and results)."""

    method: str = DEFAULT_CONDITIONING
    templates: tuple = DEFAULT_TEMPLATES
    ti_tokens: int = 1  # textual inversion: new tokens per class

    def __post_init__(self):
        if self.method not in CONDITIONINGS:
            raise ModelSettingsError(f"unknown conditioning {self.method!r}; choose one of {', '.join(CONDITIONINGS)}")
        object.__setattr__(self, "templates", tuple(self.templates))
        for template in self.templates:
            if template.count("{label}") != 1:
                raise ModelSettingsError(f"prompt template {template!r} must hold {{label}} exactly once")
        if not self.templates:
            raise ModelSettingsError("no prompt templates")
        if int(self.ti_tokens) < 1:
            raise ModelSettingsError(f"ti_tokens must be at least 1, got {self.ti_tokens}")

    @property
    def uses_text(self):
        return self.method in TEXT_CONDITIONINGS

    def record(self):
        """The settings.json / manifest entries (the class encoder's alone: the paper's files stay as they were)."""
        if not self.uses_text:
            return {"conditioning": self.method}
        record = {"conditioning": self.method, "prompt_templates": list(self.templates)}
        if self.method == "textual_inversion":
            record["ti_tokens"] = int(self.ti_tokens)
        return record

    @classmethod
    def from_record(cls, record):
        """The spec a settings.json or manifest records (none recorded: the paper's class encoder)."""
        return cls(record.get("conditioning", DEFAULT_CONDITIONING),
                   tuple(record.get("prompt_templates") or DEFAULT_TEMPLATES), int(record.get("ti_tokens", 1)))

    def trains(self):
        """Whether the method has weights of its own to train (the text method has none)."""
        return self.method != "text"


def read_templates(path):
    """One template per line (blank lines and lines starting with # skipped), each with {label} once."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelSettingsError(f"cannot read prompt templates {path}: {e}") from None
    templates = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not templates:
        raise ModelSettingsError(f"{path} holds no prompt templates (one per line, each with {{label}})")
    for template in templates:
        if template.count("{label}") != 1:
            raise ModelSettingsError(f"prompt template {template!r} in {path} must hold {{label}} exactly once")
    return templates


def context_length(spec, preset):
    """Tokens in the UNet's context: the class encoder's (the preset's, 100 for sd) or a prompt's (77)."""
    return preset.text.max_length if spec.uses_text else preset.context_length


def template_choices(seed, labels, indices, num_templates):
    """The template of each generated image: a function of (seed, class, index within class)."""
    return np.array([np.random.default_rng([int(seed), int(label), int(index), _TEMPLATE_STREAM])
                     .integers(num_templates) for label, index in zip(labels, indices)], np.int64)


def placeholders(num_classes, ti_tokens):
    """Textual inversion's new tokens: `<class-i>` per class (k > 1: `<class-i-0>` ... `<class-i-{k-1}>`)."""
    if ti_tokens == 1:
        return [[f"<class-{c}>"] for c in range(num_classes)]
    return [[f"<class-{c}-{j}>" for j in range(ti_tokens)] for c in range(num_classes)]


def build_conditioning(spec, preset, label_names, text_encoder=None, vocabulary=None):
    """The conditioning layer of `spec` for a dataset with `label_names` (call right after the UNet is built:
    random initial weights follow the build order)."""
    from Models.diffusion.class_encoder import ClassEncoder

    spec = spec if isinstance(spec, ConditioningSpec) else ConditioningSpec(spec)
    num_classes = len(label_names)
    if not spec.uses_text:
        encoder = ClassEncoder(num_classes, preset.context_length, preset.context_dim,
                               hidden=preset.class_encoder_hidden, name="class_encoder")
        encoder.build((None, num_classes))
        if spec.method == "ordinal_class_encoder":
            return OrdinalClassEncoderConditioning(encoder)
        return ClassEncoderConditioning(encoder)
    from Models.text.clip_tokenizer import ClipTokenizer
    from Models.text.text_encoder import build_text_encoder

    text_encoder = text_encoder or build_text_encoder(preset.text)
    names = [str(name).replace("_", " ") for name in label_names]
    if spec.method == "text":
        tokenizer = ClipTokenizer(vocabulary)
        return TextConditioning(tokenizer, text_encoder, spec.templates, names)
    new = placeholders(num_classes, spec.ti_tokens)
    tokenizer = ClipTokenizer(vocabulary, extra_tokens=[token for tokens in new for token in tokens])
    # Each class's new embeddings start at the mean embedding of its name's tokens (textual inversion's
    # initialisation from a descriptive word).
    table = keras.ops.convert_to_numpy(text_encoder.embedding.token_embedding.embeddings)
    initial = np.stack([table[tokenizer.encode(name) or [tokenizer.end_id]].mean(axis=0)
                        for name in names for _ in range(spec.ti_tokens)])
    return TextualInversionConditioning(tokenizer, text_encoder, spec.templates, [" ".join(t) for t in new],
                                        initial)


class Conditioning(keras.layers.Layer):
    """The interface of every conditioning method (see the module docstring)."""

    method = None

    def contexts(self, labels, indices=None, seed=0):
        """Contexts (B, L, D) of integer labels (image `indices` within class, with `seed`, pick the
        prompts of text methods) and the unconditional context (1, L, D)."""
        raise NotImplementedError

    def training_context(self, labels, keep, seed_generator, training=False):
        """Contexts (B, L, D) for the loss; where `keep` (B, 1) is False, the unconditional one."""
        raise NotImplementedError

    def trained_parts(self):
        """{name: layer} of the method's own trained weights (what its enc checkpoints hold)."""
        raise NotImplementedError


class ClassEncoderConditioning(Conditioning):
    """The paper's: the class encoder of one-hot labels; unconditional = the all-zero label.

    Example:
        >>> conditioning = ClassEncoderConditioning(ClassEncoder(10, 100, 768))
        >>> context, uncond = conditioning.contexts([3, 7])           # (2, 100, 768), (1, 100, 768)
    """

    method = "class_encoder"

    def __init__(self, class_encoder, **kwargs):
        kwargs.setdefault("name", "class_encoder_conditioning")
        super().__init__(**kwargs)
        self.class_encoder = class_encoder
        self.num_classes = class_encoder.num_classes
        self.context_length = class_encoder.context_length
        self.built = True

    def label_codes(self, labels):
        """The class encoder's input for integer labels (B,): one-hot (B, num_classes)."""
        return ops.one_hot(ops.cast(labels, "int32"), self.num_classes)

    def contexts(self, labels, indices=None, seed=0):
        codes = self.label_codes(ops.convert_to_tensor(np.asarray(labels), "int32"))
        return self.class_encoder(codes), self.class_encoder(ops.zeros((1, self.num_classes)))

    def training_context(self, labels, keep, seed_generator, training=False):
        codes = self.label_codes(labels)
        if keep is not None:
            # Classifier-free-guidance training: some labels become the all-zero vector.
            codes = codes * ops.cast(keep, codes.dtype)
        return self.class_encoder(codes, training=training)

    def trained_parts(self):
        return {"class_encoder": self.class_encoder}


class OrdinalClassEncoderConditioning(ClassEncoderConditioning):
    """For classes that are grades of one scale, label 0 the lowest (RetinaMNIST's retinopathy grades 0-4).

    Grade k is coded as ones at positions 0..k (a thermometer code) instead of one-hot, so the class
    encoder's first layer adds one learned vector per step up the scale: neighbouring grades share all
    but one of them, and a rare grade borrows what its neighbours teach. The all-zero code stays the
    unconditional label (grade 0 is a single one). Same weights and checkpoint layout as `class_encoder`.

    Example:
        >>> conditioning = OrdinalClassEncoderConditioning(ClassEncoder(5, 100, 768))
        >>> ops.convert_to_numpy(conditioning.label_codes(np.array([0, 2])))   # [[1 0 0 0 0], [1 1 1 0 0]]
    """

    method = "ordinal_class_encoder"

    def label_codes(self, labels):
        grades = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
        return ops.cast(ops.arange(self.num_classes, dtype="int32")[None, :] <= grades, "float32")


class TextConditioning(Conditioning):
    """Prompts from templates over the label names through the frozen CLIP text encoder.

    The token ids of every (class, template) prompt are computed once (C * T, 77); the
    unconditional context is the empty prompt's.
    """

    method = "text"

    def __init__(self, tokenizer, text_encoder, templates, label_words, **kwargs):
        kwargs.setdefault("name", f"{self.method}_conditioning")
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_encoder.trainable = False
        self.templates = tuple(templates)
        self.label_words = list(label_words)
        self.num_classes = len(self.label_words)
        p = text_encoder.preset
        self.context_length = p.max_length
        self.pad_id = tokenizer.end_id if p.pad_with_end else 0
        prompts = [t.format(label=word) for word in self.label_words for t in self.templates]
        self.prompt_tokens = tokenizer(prompts, p.max_length, self.pad_id).astype(np.int32)
        self.empty_tokens = tokenizer([""], p.max_length, self.pad_id).astype(np.int32)
        self.built = True

    def prompts(self, labels, choices):
        """The prompt text of each (label, template choice)."""
        return [self.templates[t].format(label=self.label_words[c]) for c, t in zip(labels, choices)]

    def encode(self, tokens):
        """Token ids (B, 77) -> contexts (B, 77, D)."""
        return self.text_encoder(tokens)

    def contexts(self, labels, indices=None, seed=0):
        labels = np.asarray(labels, np.int64).reshape(-1)
        indices = np.zeros_like(labels) if indices is None else np.asarray(indices, np.int64).reshape(-1)
        choices = template_choices(seed, labels, indices, len(self.templates))
        tokens = self.prompt_tokens[labels * len(self.templates) + choices]
        return self.encode(ops.convert_to_tensor(tokens)), self.encode(ops.convert_to_tensor(self.empty_tokens))

    def training_context(self, labels, keep, seed_generator, training=False):
        batch = ops.shape(labels)[0]
        choice = keras.random.randint((batch,), 0, len(self.templates), dtype="int32", seed=seed_generator)
        rows = labels * len(self.templates) + choice
        tokens = ops.take(ops.convert_to_tensor(self.prompt_tokens), rows, axis=0)
        context = self.encode(tokens)
        if keep is not None:
            uncond = self.encode(ops.convert_to_tensor(self.empty_tokens))
            context = ops.where(ops.reshape(keep, (-1, 1, 1)), context, uncond)
        return context

    def trained_parts(self):
        return {}


@keras.saving.register_keras_serializable(package="sddg")
class PlaceholderEmbeddings(keras.layers.Layer):
    """Textual inversion's only trained weights: one embedding per new token (C * k, D)."""

    def __init__(self, initial, **kwargs):
        kwargs.setdefault("name", "textual_inversion")
        super().__init__(**kwargs)
        initial = np.asarray(initial, np.float32)
        self.embeddings = self.add_weight(shape=initial.shape, name="embeddings",
                                          initializer=keras.initializers.Constant(initial))
        self.built = True


class TextualInversionConditioning(TextConditioning):
    """Prompts naming each class by its own new tokens, whose embeddings alone train.

    Token ids from the text encoder's vocabulary size on are the placeholders: their embeddings
    come from `PlaceholderEmbeddings`, every other token's from the frozen token table.
    """

    method = "textual_inversion"

    def __init__(self, tokenizer, text_encoder, templates, class_tokens, initial, **kwargs):
        super().__init__(tokenizer, text_encoder, templates, class_tokens, **kwargs)
        self.new_tokens = PlaceholderEmbeddings(initial)

    def encode(self, tokens):
        tokens = ops.cast(tokens, "int32")
        vocab = self.text_encoder.preset.vocab_size
        is_new = tokens >= vocab
        known = self.text_encoder.embed_tokens(ops.where(is_new, 0, tokens))
        new = ops.take(self.new_tokens.embeddings, ops.where(is_new, tokens - vocab, 0), axis=0)
        embeddings = ops.where(is_new[..., None], ops.cast(new, known.dtype), known)
        return self.text_encoder.encode_embeddings(embeddings)

    def trained_parts(self):
        return {"textual_inversion": self.new_tokens}
