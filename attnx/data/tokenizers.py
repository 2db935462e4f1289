"""Tokenizers: characters, UTF-8 bytes and SentencePiece, with one interface.

All three reserve the same special ids, so models, losses and decoding never
need to know which tokenizer produced a batch:

  pad = 0   padding (and the "no token" value of packed rows)
  bos = 1   begin of sequence (the model shifts targets right with it)
  eos = 2   end of sequence (every target ends with it)
  unk = 3   a character or piece the vocabulary does not hold

A tokenizer is saved next to the run (in the workdir) as `tokenizer.json`, plus
`sentencepiece.model` for SentencePiece, so that a checkpoint can be decoded
without the data it was trained on. `build_or_load_tokenizer` builds the
vocabulary from the training split on first use and loads it afterwards; it
never silently replaces a saved vocabulary of another kind or size.
"""

from __future__ import annotations

import abc
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIALS = 4

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "sentencepiece.model"
KINDS = ("char", "byte", "sentencepiece")


class Tokenizer(abc.ABC):
    """Maps text to int32 ids and back; specials pad=0, bos=1, eos=2, unk=3."""

    kind: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included; every id is in [0, vocab_size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text`, shape [n] int32, without bos or eos."""

    @abc.abstractmethod
    def _decode_content(self, ids: list[int]) -> str:
        """Decodes ids that hold no specials other than unk."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of `ids` [n]: stops at the first eos, skips pad and bos."""
        content = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == EOS_ID:
                break
            if token in (PAD_ID, BOS_ID):
                continue
            content.append(int(token))
        return self._decode_content(content)

    def unknown_characters(self, text: str) -> list[str]:
        """The distinct characters of `text` that this vocabulary cannot represent.

        A character is unknown when encoding it on its own yields the unk id
        (`UNK_ID` = 3): the model then reads `<unk>` in its place and cannot
        copy it to its output. Characters that the tokenizer's normalisation
        maps to known ones, or drops (SentencePiece's NFKC and whitespace
        handling), are not unknown.

        Args:
          text: any text, e.g. a source sentence about to be encoded.

        Returns:
          Each unknown character once, in order of first appearance in `text`;
          [] when the whole text is representable.
        """
        # The per-character answers never change for a given vocabulary; caching
        # them makes scanning a whole evaluation split cost one encode per
        # distinct character instead of one per character occurrence.
        cache: dict[str, bool] | None = getattr(self, "_unknown_cache", None)
        if cache is None:
            cache = self._unknown_cache = {}
        unknown = []
        for character in dict.fromkeys(text):  # distinct, in order of first appearance
            is_unknown = cache.get(character)
            if is_unknown is None:
                is_unknown = cache[character] = bool(np.any(self.encode(character) == UNK_ID))
            if is_unknown:
                unknown.append(character)
        return unknown

    @abc.abstractmethod
    def _metadata(self) -> dict:
        """The JSON-serialisable description written to `tokenizer.json`."""

    def save(self, directory: epath.PathLike) -> None:
        """Writes the tokenizer to `directory` (created if missing).

        Raises:
          FileExistsError: if `directory` already holds a different tokenizer.
        """
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        metadata = self._metadata()
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != metadata:
                raise FileExistsError(
                    f"{path} already holds a {saved.get('kind')!r} tokenizer with "
                    f"vocab_size={saved.get('vocab_size')}; refusing to overwrite it with a "
                    f"{self.kind!r} tokenizer with vocab_size={self.vocab_size}."
                )
            return
        _write_atomically(path, json.dumps(metadata, ensure_ascii=False, indent=1).encode())


class CharacterTokenizer(Tokenizer):
    """One id per Unicode code point of a fixed, sorted character set.

    Attributes:
      characters: the vocabulary, sorted; character `characters[i]` has id 4 + i.
    """

    kind = "char"

    def __init__(self, characters: Iterable[str]):
        characters = sorted(set(characters))
        for character in characters:
            if len(character) != 1:
                raise ValueError(f"CharacterTokenizer: {character!r} is not a single character.")
        self.characters = characters
        self._ids = {c: i + NUM_SPECIALS for i, c in enumerate(characters)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharacterTokenizer:
        """Builds the vocabulary from every character of `texts`."""
        characters: set[str] = set()
        for text in texts:
            characters.update(text)
        return cls(characters)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIALS + len(self.characters)

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter((self._ids.get(c, UNK_ID) for c in text), np.int32, len(text))

    def unknown_characters(self, text: str) -> list[str]:
        # Exactly the characters without an id: no need to encode anything.
        return [c for c in dict.fromkeys(text) if c not in self._ids]

    def _decode_content(self, ids: list[int]) -> str:
        # An unknown character decodes to U+FFFD, the Unicode replacement character.
        return "".join(
            self.characters[i - NUM_SPECIALS] if NUM_SPECIALS <= i < self.vocab_size else "\ufffd"
            for i in ids
        )

    def _metadata(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "characters": self.characters}


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte: byte b has id 4 + b; needs no vocabulary."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIALS + 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_SPECIALS

    def unknown_characters(self, text: str) -> list[str]:
        # Every character has a UTF-8 encoding, and every byte an id.
        return []

    def _decode_content(self, ids: list[int]) -> str:
        data = bytes(i - NUM_SPECIALS for i in ids if NUM_SPECIALS <= i < self.vocab_size)
        # A model may emit a byte sequence that is not valid UTF-8.
        return data.decode("utf-8", errors="replace")

    def _metadata(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose special ids are pad=0, bos=1, eos=2, unk=3."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        specials = (
            self._processor.pad_id(),
            self._processor.bos_id(),
            self._processor.eos_id(),
            self._processor.unk_id(),
        )
        if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"SentencePiece model has special ids (pad, bos, eos, unk) = {specials}, "
                f"expected {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}."
            )

    def __getstate__(self) -> dict:
        # The processor is a C++ object; worker processes rebuild it from the model.
        return {"model_proto": self.model_proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        max_sentences: int = 1_000_000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
    ) -> SentencePieceTokenizer:
        """Trains a model on up to `max_sentences` texts (the first ones given).

        Args:
          texts: training text, one sentence per item (newlines are replaced by spaces).
          vocab_size: size of the vocabulary, specials included.
          max_sentences: how many texts to read at most.
          model_type: 'unigram' or 'bpe'.
          character_coverage: share of characters the vocabulary must cover.
        """
        with tempfile.TemporaryDirectory() as tmp:
            text_path = os.path.join(tmp, "train.txt")
            count = 0
            with open(text_path, "w", encoding="utf-8") as f:
                for text in texts:
                    if count >= max_sentences:
                        break
                    f.write(text.replace("\n", " ") + "\n")
                    count += 1
            if count == 0:
                raise ValueError("SentencePieceTokenizer.train: no training text was given.")
            model_prefix = os.path.join(tmp, "spm")
            spm.SentencePieceTrainer.train(
                input=text_path,
                model_prefix=model_prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                minloglevel=2,
            )
            with open(model_prefix + ".model", "rb") as f:
                return cls(f.read())

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), np.int32)

    def _decode_content(self, ids: list[int]) -> str:
        return self._processor.decode(ids)

    def _metadata(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "model": SENTENCEPIECE_FILE}

    def save(self, directory: epath.PathLike) -> None:
        directory = epath.Path(directory)
        model_path = directory / SENTENCEPIECE_FILE
        if model_path.exists() and model_path.read_bytes() != self.model_proto:
            raise FileExistsError(
                f"{model_path} already holds a different SentencePiece model; "
                "refusing to overwrite it."
            )
        directory.mkdir(parents=True, exist_ok=True)
        # The model goes first: a tokenizer.json is only ever written next to a full model.
        if not model_path.exists():
            _write_atomically(model_path, self.model_proto)
        super().save(directory)


def _write_atomically(path: epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place.

    A reader (another process of the same run) sees either no file or the whole file.
    """
    tmp_path = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp_path.write_bytes(data)
    tmp_path.rename(path)


def load_tokenizer(directory: epath.PathLike) -> Tokenizer:
    """Loads the tokenizer saved in `directory` by `Tokenizer.save`."""
    path = epath.Path(directory) / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"No saved tokenizer: {path} does not exist.")
    metadata = json.loads(path.read_text())
    kind = metadata.get("kind")
    if kind == "char":
        tokenizer: Tokenizer = CharacterTokenizer(metadata["characters"])
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer((path.parent / metadata["model"]).read_bytes())
    else:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; expected one of {KINDS}.")
    if tokenizer.vocab_size != metadata["vocab_size"]:
        raise ValueError(
            f"{path}: saved vocab_size={metadata['vocab_size']} but the loaded "
            f"tokenizer has {tokenizer.vocab_size}."
        )
    return tokenizer


def build_or_load_tokenizer(
    kind: str,
    directory: epath.PathLike,
    texts_fn: Callable[[], Iterable[str]] | None = None,
    vocab_size: int | None = None,
    *,
    max_sentences: int = 1_000_000,
) -> Tokenizer:
    """Loads the tokenizer saved in `directory`, or builds and saves it there.

    Args:
      kind: 'char', 'byte' or 'sentencepiece'.
      directory: where the run keeps its vocabulary (e.g. `workdir/vocab`).
      texts_fn: returns the training text; called only when a vocabulary must be
        built ('char' and 'sentencepiece').
      vocab_size: SentencePiece's vocabulary size (specials included); must be
        None for 'char' and 'byte', whose sizes follow from the text.
      max_sentences: SentencePiece trains on at most this many texts.

    Returns:
      The tokenizer, identical on every later call with the same directory.

    Raises:
      ValueError: unknown kind, or a vocab_size where it has no meaning.
      FileExistsError: `directory` holds a tokenizer of another kind or size.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown tokenizer kind {kind!r}; expected one of {KINDS}.")
    if kind == "sentencepiece":
        if vocab_size is None or vocab_size <= NUM_SPECIALS:
            raise ValueError(
                f"tokenizer 'sentencepiece' needs vocab_size > {NUM_SPECIALS}, got {vocab_size}."
            )
    elif vocab_size is not None:
        raise ValueError(
            f"vocab_size={vocab_size} was given for tokenizer {kind!r}, whose size follows "
            "from its text; vocab_size applies only to 'sentencepiece'."
        )
    path = epath.Path(directory) / TOKENIZER_FILE
    if path.exists():
        tokenizer = load_tokenizer(directory)
        saved_size = json.loads(path.read_text())["vocab_size"]
        if tokenizer.kind != kind or (vocab_size is not None and saved_size != vocab_size):
            raise FileExistsError(
                f"{path} holds a {tokenizer.kind!r} tokenizer with vocab_size={saved_size}, "
                f"but a {kind!r} tokenizer with vocab_size={vocab_size} was asked for. "
                "Use another directory or remove that file."
            )
        logging.info("Loaded %s tokenizer (vocab_size=%d) from %s", kind, saved_size, path)
        return tokenizer
    if kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        if texts_fn is None:
            raise ValueError(f"Tokenizer {kind!r} must be built but no texts_fn was given.")
        logging.info("Building %s tokenizer from the training text into %s", kind, directory)
        if kind == "char":
            tokenizer = CharacterTokenizer.from_texts(texts_fn())
        else:
            tokenizer = SentencePieceTokenizer.train(
                texts_fn(), vocab_size, max_sentences=max_sentences
            )
    tokenizer.save(directory)
    return tokenizer
