"""Our CLIP tokenizer gives open_clip's token ids, and a missing vocabulary is one line.

open_clip's tokenizer module is loaded alone, by path (the package's __init__ imports
torchvision, which is not installed: it would break diffusers' import); open-clip-torch is a
development requirement installed without its dependencies (.ci/run).
"""

import importlib.util
import random
import string

import numpy as np
import pytest

from Models.errors import CheckpointError
from Models.text import clip_tokenizer as T
from tests.conftest import require_module


def open_clip_tokenizer_module():
    require_module("torch")
    require_module("ftfy")
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        require_module("open_clip")  # skips locally, fails under CI=true
    location = spec.submodule_search_locations[0]
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_alone", f"{location}/tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def prompts():
    """A few hundred texts: templates over label names, punctuation, numbers, unicode, long text."""
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
              "aquarium_fish", "sweet pepper", "maple_tree", "colorectal adenocarcinoma epithelium",
              "basophil", "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
              "melanocytic nevi", "0", "1", "9"]
    templates = ["a photo of a {}.", "a blurry photo of the {}!", "A PHOTO OF A {}", "itap of a {}",
                 "a {} in a video game?", "art of the {}...", "  a   low-resolution\tphoto of a {}\n",
                 "it's a {}; they're {}s, we'll see", "<start_of_text> {} <end_of_text>"]
    texts = [t.format(label, label) for t in templates for label in labels]
    texts += ["", " ", "!!!", "a...b,,,c;;;d", "3.14159 and 2718281828", "100%", "e-mail: x@y.z",
              "naïve café résumé", "Ünïcödé ÄÖÜ straße", "日本語のテキスト", "中文文本", "emoji 🐱🐶🚀",
              "“curly quotes” and ‘single’", "ﬁne ligature ﬂow", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "tab\tand\nnewline",
              "&amp; &lt;html&gt; &amp;amp;", "Ελληνικά κείμενο", "русский текст", "عربى", "हिन्दी",
              "mojibake: cafÃ©", "x" * 300, "word " * 100, "a photo of " + "very " * 80 + "big cat"]
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " éüñ漢字🙂"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(120)]
    return texts


def test_token_ids_equal_open_clip_tokenize():
    reference = open_clip_tokenizer_module()
    texts = prompts()
    assert len(texts) >= 300
    ours = T.ClipTokenizer()
    expected = reference.tokenize(texts).numpy()
    got = ours(texts)
    assert got.shape == expected.shape == (len(texts), 77)
    mismatches = [texts[i] for i in range(len(texts)) if not np.array_equal(got[i], expected[i])]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]}"
    # over-long texts are cut to 77 ids ending with <end_of_text>
    long = ours(["word " * 100])[0]
    assert long[0] == ours.start_id and long[-1] == ours.end_id and (long != 0).all()
    # other context lengths and keras-cv's padding
    np.testing.assert_array_equal(ours(texts[:20], context_length=16), reference.tokenize(texts[:20], 16).numpy())
    padded = ours(["a cat"], pad_id=ours.end_id)[0]
    assert (padded[4:] == ours.end_id).all()


def test_added_tokens_and_decode():
    reference = open_clip_tokenizer_module()
    extra = ["<class-0>", "<class-1>"]
    ours = T.ClipTokenizer(extra_tokens=extra)
    theirs = reference.SimpleTokenizer(additional_special_tokens=extra)
    for text in ["a photo of a <class-1>.", "<class-0><class-1> and a cat", "a <class-0>, a <class-1>!"]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.ids["<class-0>"] == 49408 and ours.vocab_size == 49410
    assert ours.decode(ours.encode("a photo of a cat.")) == "a photo of a cat ."


def test_vocabulary_found_and_checked(tmp_path, monkeypatch):
    open_clip_tokenizer_module()
    monkeypatch.setenv("SDDG_WEIGHTS_DIR", str(tmp_path))
    path = T.vocabulary_path()  # not in the folder: open_clip's copy
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.parent != tmp_path
    # the user's copy is preferred, and checked
    (tmp_path / path.name).write_bytes(b"not the vocabulary")
    with pytest.raises(CheckpointError, match="sha256"):
        T.vocabulary_path()


def test_missing_vocabulary_is_one_line_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_open_clip_copy", lambda filename: None)
    with pytest.raises(CheckpointError) as info:
        T.vocabulary_path(folder=tmp_path, url="http://127.0.0.1:9/bpe_simple_vocab_16e6.txt.gz")
    message = str(info.value)
    assert "\n" not in message
    assert "bpe_simple_vocab_16e6.txt.gz" in message and str(tmp_path) in message and "924691ac" in message


def test_not_a_vocabulary_file(tmp_path):
    import gzip

    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("header\na b\n")
    with pytest.raises(CheckpointError, match="not CLIP's BPE vocabulary"):
        T.ClipTokenizer(path)
