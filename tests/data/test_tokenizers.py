"""Tests of attnx.data.tokenizers: round trips, specials, saving and loading."""

import pickle

import numpy as np
import pytest

from attnx.data import tokenizers

# Several scripts: Latin with diacritics, Greek, Cyrillic, Arabic, Devanagari, CJK, emoji.
TEXTS = [
    "Le 3 février 2021, à l'été",
    "Straße über Äpfel",
    "Καλημέρα κόσμε",
    "Привет, мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "日本語のテキスト 中文",
    "emoji 🙂 ok",
]


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A SentencePiece vocabulary trained (once) on the multi-script corpus."""
    directory = tmp_path_factory.mktemp("spm")
    calls = []

    def texts_fn():
        calls.append(1)
        return iter(TEXTS * 20)

    tokenizer = tokenizers.build_or_load_tokenizer("sentencepiece", directory, texts_fn, 80)
    return directory, tokenizer, calls


def test_character_ids_are_sorted_characters_after_specials():
    tokenizer = tokenizers.CharacterTokenizer.from_texts(reversed(TEXTS))
    reference = sorted(set("".join(TEXTS)))
    assert tokenizer.vocab_size == 4 + len(reference)
    text = TEXTS[2] + TEXTS[6]
    np.testing.assert_array_equal(tokenizer.encode(text), [4 + reference.index(c) for c in text])
    assert tokenizer.encode(text).dtype == np.int32
    # Unknown characters map to unk.
    np.testing.assert_array_equal(tokenizer.encode("Z€"), [tokenizers.UNK_ID] * 2)


def test_byte_ids_are_utf8_bytes_after_specials():
    tokenizer = tokenizers.ByteTokenizer()
    assert tokenizer.vocab_size == 260
    for text in TEXTS:
        np.testing.assert_array_equal(tokenizer.encode(text), [b + 4 for b in text.encode("utf-8")])


@pytest.mark.parametrize("kind", ["char", "byte", "sentencepiece"])
def test_round_trip_and_specials(kind, sentencepiece_dir):
    if kind == "char":
        tokenizer = tokenizers.CharacterTokenizer.from_texts(TEXTS)
    elif kind == "byte":
        tokenizer = tokenizers.ByteTokenizer()
    else:
        tokenizer = sentencepiece_dir[1]
    assert (tokenizers.PAD_ID, tokenizers.BOS_ID, tokenizers.EOS_ID, tokenizers.UNK_ID) == (
        0,
        1,
        2,
        3,
    )
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        # Known text never produces a special id, and stays inside the vocabulary.
        assert ids.min() >= 4 and ids.max() < tokenizer.vocab_size, text
        assert tokenizer.decode(ids) == text
        # bos and pad are skipped, decoding stops at the first eos.
        wrapped = np.concatenate([[1], ids, [2], ids, [0, 0]])
        assert tokenizer.decode(wrapped) == text
        assert tokenizer.decode(np.concatenate([[0], ids, [0]])) == text


def test_sentencepiece_special_ids_are_fixed(sentencepiece_dir):
    tokenizer = sentencepiece_dir[1]
    processor = tokenizer._processor
    assert (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id()) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.vocab_size == 80


def test_sentencepiece_trains_once_then_loads(sentencepiece_dir):
    directory, tokenizer, calls = sentencepiece_dir
    assert (directory / tokenizers.SENTENCEPIECE_FILE).is_file()
    assert (directory / tokenizers.TOKENIZER_FILE).is_file()
    assert len(calls) == 1

    def must_not_train():
        raise AssertionError("the saved vocabulary must be loaded, not retrained")

    loaded = tokenizers.build_or_load_tokenizer("sentencepiece", directory, must_not_train, 80)
    for text in TEXTS:
        np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_save_load_gives_identical_ids(kind, tmp_path):
    built = tokenizers.build_or_load_tokenizer(kind, tmp_path, lambda: iter(TEXTS))
    loaded = tokenizers.load_tokenizer(tmp_path)
    assert type(loaded) is type(built) and loaded.vocab_size == built.vocab_size
    for text in TEXTS:
        np.testing.assert_array_equal(loaded.encode(text), built.encode(text))


def test_sentencepiece_pickles(sentencepiece_dir):
    tokenizer = sentencepiece_dir[1]
    copy = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(copy.encode(TEXTS[0]), tokenizer.encode(TEXTS[0]))


def test_refuses_to_overwrite_a_different_vocabulary(tmp_path, sentencepiece_dir):
    tokenizers.build_or_load_tokenizer("char", tmp_path, lambda: iter(TEXTS))
    saved = str(tmp_path / tokenizers.TOKENIZER_FILE)
    with pytest.raises(FileExistsError, match=saved):
        tokenizers.build_or_load_tokenizer("byte", tmp_path)
    with pytest.raises(FileExistsError, match=saved):
        tokenizers.CharacterTokenizer("abc").save(tmp_path)
    spm_dir = sentencepiece_dir[0]
    with pytest.raises(FileExistsError, match=str(spm_dir / tokenizers.TOKENIZER_FILE)):
        tokenizers.build_or_load_tokenizer("sentencepiece", spm_dir, lambda: iter(TEXTS), 64)
    # The saved vocabulary is untouched.
    assert isinstance(tokenizers.load_tokenizer(tmp_path), tokenizers.CharacterTokenizer)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="'words'"):
        tokenizers.build_or_load_tokenizer("words", tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.build_or_load_tokenizer("char", tmp_path, lambda: iter(TEXTS), 100)
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.build_or_load_tokenizer("sentencepiece", tmp_path, lambda: iter(TEXTS))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizers.load_tokenizer(tmp_path)


# Characters that no text of TEXTS holds: 'Z', 'ë', 'ʼ' (a modifier letter apostrophe,
# not "'"), '€' and '—'; every other character of NEW_TEXT occurs in TEXTS.
NEW_TEXT = "Zoë ʼ€ Zoë—€ été, Привет 🙂"
NEW_CHARACTERS = ["Z", "ë", "ʼ", "€", "—"]


def test_character_unknown_characters_in_order_of_first_appearance():
    tokenizer = tokenizers.CharacterTokenizer.from_texts(TEXTS)
    assert tokenizer.unknown_characters(NEW_TEXT) == NEW_CHARACTERS
    assert tokenizer.unknown_characters("") == []
    for text in TEXTS:
        assert tokenizer.unknown_characters(text) == []
    # The override agrees with the base class's definition (encodes to unk).
    for text in [NEW_TEXT, *TEXTS]:
        assert tokenizers.Tokenizer.unknown_characters(
            tokenizer, text
        ) == tokenizer.unknown_characters(text)
    # Exactly these characters are read as unk.
    ids = tokenizer.encode(NEW_TEXT)
    assert [c for c, i in zip(NEW_TEXT, ids, strict=True) if i == tokenizers.UNK_ID] == [
        "Z",
        "ë",
        "ʼ",
        "€",
        "Z",
        "ë",
        "—",
        "€",
    ]


def test_byte_tokenizer_has_no_unknown_characters():
    tokenizer = tokenizers.ByteTokenizer()
    for text in [NEW_TEXT, *TEXTS, "\x00\t\n\ufffd\U0010ffff", ""]:
        assert tokenizer.unknown_characters(text) == []


def test_sentencepiece_unknown_characters(sentencepiece_dir):
    # Trained with character_coverage=1.0: every character of TEXTS has a piece,
    # and a character absent from the training text encodes to unk.
    tokenizer = sentencepiece_dir[1]
    for character in NEW_CHARACTERS:
        assert tokenizers.UNK_ID in tokenizer.encode(character).tolist(), character
    assert tokenizer.unknown_characters(NEW_TEXT) == NEW_CHARACTERS
    assert tokenizers.UNK_ID in tokenizer.encode(NEW_TEXT).tolist()
    for text in TEXTS:
        assert tokenizer.unknown_characters(text) == []
    # Answers come from a per-character cache the second time; they must not change.
    assert tokenizer.unknown_characters(NEW_TEXT + "Z") == NEW_CHARACTERS
    # A pickled copy (a worker process) answers the same.
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.unknown_characters(NEW_TEXT) == NEW_CHARACTERS
