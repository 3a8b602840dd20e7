"""CLIP's byte-level BPE tokenizer: text -> the token ids Stable Diffusion's text encoders read.

Our implementation of the tokenizer OpenAI's CLIP, open_clip and keras-cv share, over the
real vocabulary file `bpe_simple_vocab_16e6.txt.gz` (48,894 merges; 49,408 ids: 256 bytes,
256 word-final bytes, the merges, <start_of_text> 49406 and <end_of_text> 49407). The file is
read from where the user has it (`vocabulary_path`): $SDDG_WEIGHTS_DIR or keras-cv's download
cache (~/.keras/datasets), an installed open-clip-torch, else downloaded; offline and missing,
one line says what to put where (Models/diffusion/weights.py).

How a text becomes ids (open_clip's `tokenize`, whose output this matches):
1. clean: ftfy's `fix_text` (mojibake, curly quotes, ligatures, full-width forms, NFC), HTML
   entities unescaped twice, runs of whitespace made one space, lower case;
2. split into pieces: added tokens (`extra_tokens`), the contractions 's 't 're 've 'm 'll 'd,
   runs of letters, single digits, runs of anything else but whitespace;
3. each piece's UTF-8 bytes, each byte mapped to one printable character, the last marked
   word-final (</w>), merged pair by pair in the order of the merge list (lowest rank first);
4. <start_of_text> + ids + <end_of_text>, cut to `context_length` with the last kept id made
   <end_of_text>, padded with `pad_id` (open_clip: 0; keras-cv's Stable Diffusion: 49407).

Example:
    >>> tokenizer = ClipTokenizer()                                  # finds the vocabulary file
    >>> tokenizer.encode("a photo of a cat.")
    [320, 1125, 539, 320, 2368, 269]
    >>> tokenizer(["a photo of a cat."], context_length=8)          # open_clip's layout
    array([[49406, 320, 1125, 539, 320, 2368, 269, 49407]])
    >>> ClipTokenizer(extra_tokens=["<class-0>"]).encode("a <class-0>")  # a new id, 49408
    [320, 49408]
"""

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from Models.errors import CheckpointError

VOCABULARY_KEY = "clip_vocabulary"  # its entry in Models/diffusion/weights.py: WEIGHT_FILES
START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
CONTEXT_LENGTH = 77
# The vocabulary file holds more merges than CLIP uses: a header line, then the first
# 49152 - 256 - 2 merges make the 49,408-id vocabulary every CLIP text encoder was trained with.
NUM_MERGES = 49152 - 256 - 2
_WORD_END = "</w>"


def vocabulary_path(folder=None, url=None):
    """The checked vocabulary file: a copy the user or keras-cv placed, open_clip's, else downloaded.

    `folder` / `url` override where the file is looked for and fetched from (default:
    `Models.diffusion.weights.weights_dir()`). A missing file that cannot be downloaded is a
    one-line CheckpointError naming the file, its SHA-256, the folder and the address.
    """
    from Models.diffusion.weights import WEIGHT_FILES, fetch_weights, weights_dir

    filename = WEIGHT_FILES[VOCABULARY_KEY].filename
    if not (Path(folder or weights_dir()) / filename).exists():
        packaged = _open_clip_copy(filename)
        if packaged is not None:
            return fetch_weights(VOCABULARY_KEY, folder=packaged.parent)
    return fetch_weights(VOCABULARY_KEY, folder=folder, url=url)


def _open_clip_copy(filename):
    """open-clip-torch ships the file beside its modules; found without importing the package
    (its __init__ imports torch and torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.exists():
            return path
    return None


@lru_cache(maxsize=None)
def byte_characters():
    """The 256 bytes -> 256 printable characters BPE works on, in the order of the first 256 ids.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves and come first; the other 68 (controls, space, soft hyphen) follow, in byte
    order, taking the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable},
            **{byte: chr(256 + i) for i, byte in enumerate(others)}}


def clean_text(text):
    """Step 1 of the module docstring: what open_clip's default ('lower') cleaning does."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@lru_cache(maxsize=4)
def _read_merges(path):
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise CheckpointError(f"{path} is not CLIP's BPE vocabulary (expected {NUM_MERGES} merge pairs)")
    return tuple(merges)


class ClipTokenizer:
    """Text -> CLIP token ids (see the module docstring).

    Args:
        vocabulary: path of `bpe_simple_vocab_16e6.txt.gz` (default: `vocabulary_path()`).
        extra_tokens: added tokens (e.g. textual inversion's placeholders "<class-0>", ...),
            matched whole and given the ids from 49408 on, in order.
    """

    def __init__(self, vocabulary=None, extra_tokens=()):
        import regex

        path = Path(vocabulary) if vocabulary is not None else vocabulary_path()
        merges = _read_merges(str(path))
        bytes_ = list(byte_characters().values())
        vocab = bytes_ + [c + _WORD_END for c in bytes_] + ["".join(pair) for pair in merges]
        self.special_tokens = [START_OF_TEXT, END_OF_TEXT, *extra_tokens]
        vocab += self.special_tokens
        self.ids = {token: i for i, token in enumerate(vocab)}
        if len(self.ids) != len(vocab):
            raise ValueError(f"extra tokens {list(extra_tokens)} repeat a token of the vocabulary")
        self.tokens = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id, self.end_id = self.ids[START_OF_TEXT], self.ids[END_OF_TEXT]
        self.vocab_size = len(vocab)
        added = "|".join(regex.escape(token) for token in self.special_tokens)
        self.pattern = regex.compile(added + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self._byte_chars = byte_characters()
        self._special = set(self.special_tokens)
        self._cache = {}

    def bpe(self, piece):
        """One piece (already mapped to byte characters) -> its BPE symbols."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + _WORD_END]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text):
        """The ids of `text`, without start and end tokens or padding."""
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            if piece in self._special:
                ids.append(self.ids[piece])
                continue
            chars = "".join(self._byte_chars[b] for b in piece.encode("utf-8"))
            ids.extend(self.ids[symbol] for symbol in self.bpe(chars))
        return ids

    def decode(self, ids):
        """Ids -> text (word ends become spaces); start, end and padding are left to the caller."""
        to_byte = {c: b for b, c in self._byte_chars.items()}
        text, out = "".join(self.tokens[i] for i in ids), bytearray()
        for word in text.split(_WORD_END):
            out += bytes(to_byte[c] for c in word if c in to_byte) + b" "
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts, context_length=CONTEXT_LENGTH, pad_id=0):
        """int64 ids (N, context_length): start + ids + end, cut (last kept id made the end) and padded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), context_length), pad_id, np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id][:context_length]
            ids[-1] = self.end_id
            out[row, :len(ids)] = ids
        return out
