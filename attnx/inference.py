"""Use a trained run from Python: `attnx.load(workdir)`, then `translate` or `caption`.

    import attnx

    model = attnx.load("/tmp/dates_transformer")
    [result] = model.translate(["3 March 1974"], beam_size=4, nbest=2)
    best = result.hypotheses[0]
    best.text, best.score      # '1974-03-03', -0.01
    best.attention             # float32 [len(best.tokens), len(result.source_tokens)]

`load` reads data, never code: the config that training recorded
(`WORKDIR/config.json`, parsed as JSON), the vocabulary (`WORKDIR/vocab/`) and
the newest whole checkpoint (`WORKDIR/checkpoints/`, opened read-only, so a
training run still writing the workdir is not disturbed). It imports no
experiment file and nothing found in the workdir, so a run shared by someone
else is safe to open. The parameters are restored onto one device of this
machine (`jax.local_devices()[0]`), whatever mesh wrote them. A checkpoint is
restored whole, optimizer state included (the restore checks every leaf), so
loading needs the memory of the training state (with Adam, three times the
parameters').

Inputs are prepared as the training pipeline prepared its sources:

* text is encoded with the run's tokenizer and ends with eos. Characters the
  vocabulary never saw are read as <unk> (one warning per input names them);
  a source longer than the run allows (`config.task.max_source_length`, or the
  model's `max_length` / `max_source_length`) keeps its first tokens, with a
  warning; an empty text gets no hypothesis and costs no model call.
* images (paths, or uint8 arrays `[H, W]` / `[H, W, C]`) are converted to the
  model's channels, resized (bilinear) to `config.task.image_size` when the
  run sets one, and scaled to [0, 1]; without an image_size, each image keeps
  its own size (images of different sizes are decoded in separate batches).
  An image that cannot be read is a `RunError` naming it.

Decoding is `attnx.decoding.beam_search` over batches of up to `batch_size`
inputs, padded to a power-of-two number of rows and (text) to the longest
source the run allows, so that a few compiled programs serve any number of
inputs. The command-line input mode (`--mode=decode --config.decode.input=`,
`attnx.training.interactive`) calls these same methods, so it gives the same
hypotheses for the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from attnx import decoding
from attnx.data import tokenizers
from attnx.errors import RunError
from attnx.interpret import alignment_output, alignments
from attnx.models import MODELS, build_model, make_loss_terms, make_model_config, model_width
from attnx.training import checkpoints, optimizers, steps
from attnx.training.workdir import CONFIG_FILE

ImageInput = str | os.PathLike | np.ndarray


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One output of beam search for one input.

    Attributes:
      text: the detokenised output.
      score: beam search's ranking score, log P(y|x) / lp(|y|) (the run's
        `config.eval.length_penalty` and `alpha`); hypotheses come best first.
      log_prob: log P(y|x), the sum of the log-probs of its tokens.
      tokens: one label per output token, eos included as '</s>' when the
        hypothesis ended (`finished`); the rows of `attention`.
      attention: float32 `[len(tokens), source_len]`, the model's alignment
        weights of every output token (the Transformer's last decoder layer
        averaged over heads, the RNN's attention, ConvS2S's mean over layers,
        the captioner's alpha over the grid cells, row-major); source_len is
        the number of source tokens with their eos (`Result.source_tokens`),
        or of grid cells.
      finished: True if it ended with eos (False: it reached the maximum
        length, `config.task.max_target_length`).
      alignment: with `alignment='hard'`, the hard alignment as (source
        position, target position) pairs, 0-based, sorted as Pharaoh lines
        are: for each output token but the final eos, the real source token
        it attends to most (eos is not a candidate; for a captioner, the grid
        cell). Else None.
      soft_alignment: with `alignment='soft'`, float32 `[n, m]`: the weights
        of the n output tokens before eos over the m real source tokens (or
        grid cells). Else None. Both index tokens as `--mode=interpret`'s
        `alignments.pharaoh` does (`attnx.interpret.alignment_output`).
    """

    text: str
    score: float
    log_prob: float
    tokens: list[str]
    attention: np.ndarray
    finished: bool
    alignment: list[tuple[int, int]] | None = None
    soft_alignment: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    """What one input gave.

    Attributes:
      source: the input as given (for an image: its path, or 'array i').
      hypotheses: up to `nbest` hypotheses, best first; [] for an empty text.
      source_tokens: one label per source token as the model read it (after
        truncation, unknown characters as '<unk>', then '</s>'): the columns
        of each hypothesis's `attention`. None for an image.
      unknown_characters: characters of the text that the vocabulary lacks
        (read as <unk>), each once.
      truncated: True if the source was cut to the length the run allows.
    """

    source: str
    hypotheses: list[Hypothesis]
    source_tokens: list[str] | None = None
    unknown_characters: list[str] = dataclasses.field(default_factory=list)
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class _Source:
    """One input made ready for the model; `array` None for an empty one."""

    source: str
    array: np.ndarray | None  # ids [s] int32 ending with eos, or an image float32 [H, W, C]
    source_tokens: list[str] | None = None
    unknown_characters: list[str] = dataclasses.field(default_factory=list)
    truncated: bool = False


def _describe(characters: Sequence[str]) -> str:
    """Each character with its code point: `'☃' (U+2603), 'Z' (U+005A)`."""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in characters)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- reading a workdir ---------------------------------------------------------------------------


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config training recorded in `WORKDIR/config.json`, parsed as JSON (never executed).

    Raises:
      RunError: naming the workdir or the file when either is missing or unreadable.
    """
    if not os.path.isdir(workdir):
        raise RunError(f"attnx.load: {workdir} is not a directory (give a run's --workdir)")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunError(
            f"attnx.load: {workdir} has no {CONFIG_FILE} (training writes it at every start; "
            "a run trained by an older attnx lacks it): run its training command once more "
            "(at its last step it trains nothing) to write it"
        )
    try:
        with open(path, encoding="utf-8") as f:
            as_dict = json.load(f)
    except (OSError, ValueError) as error:
        raise RunError(f"attnx.load: cannot read {path}: {error}") from None
    if not isinstance(as_dict, dict) or "model" not in as_dict:
        raise RunError(f"attnx.load: {path} is not an attnx config (no 'model' section)")
    return ml_collections.ConfigDict(as_dict)


_REQUIRED = object()


def _setting(config: ml_collections.ConfigDict, key: str, default: Any = _REQUIRED) -> Any:
    """`config[section][name]` for `key` = 'section.name'; RunError if absent without default."""
    section, name = key.split(".")
    value = config[section].get(name) if section in config else None
    if value is None:
        if default is _REQUIRED:
            raise RunError(f"attnx.load: the run's {CONFIG_FILE} has no config.{key}")
        return default
    return value


def _restore_model(
    config: ml_collections.ConfigDict, workdir: str, model_config: Any
) -> tuple[nnx.Module, int]:
    """The model with the newest whole checkpoint's parameters, on this machine's first device.

    The checkpoint holds a whole TrainState (optimizer state included), and the
    restore checks the target's every leaf, so the target is the whole state
    too, built abstractly (nothing allocated) from the run's own config.
    """
    seed = int(_setting(config, "train.seed", 0))
    name = config.model.name

    def create() -> nnx.Module:
        return build_model(name, model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    optimizer, _ = optimizers.make_optimizer(
        config.train, model_dim=model_width(config.model.name, model_config)
    )

    loss_terms = make_loss_terms(name, model_config, config.train)

    def initial_state() -> steps.TrainState:
        params = nnx.split(create(), nnx.Param, ...)[1]
        return steps.TrainState.create(params, optimizer, jax.random.key(seed + 2), loss_terms)

    on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device),
        jax.eval_shape(initial_state),
    )
    graphdef = nnx.split(nnx.eval_shape(create), nnx.Param, ...)[0]
    # The rest of the model's state (RNG streams) is not in checkpoints: built as training does.
    rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2], out_shardings=on_device)()

    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        restored = checkpointer.restore(target=target)
    except ValueError as error:  # The config does not describe this checkpoint's model.
        raise RunError(f"attnx.load: {workdir}: {error}") from None
    finally:
        checkpointer.close()
    if restored is None:
        raise RunError(f"attnx.load: no whole checkpoint in {checkpointer.directory}")
    state, _ = restored
    return nnx.merge(graphdef, state.params, rest), int(state.step)


def load(workdir: str | os.PathLike) -> TrainedModel:
    """Loads a trained run for decoding; see the module docstring.

    Args:
      workdir: the run's `--workdir` (relative, `~` and symlinks are resolved).

    Returns:
      A `TrainedModel` holding the newest whole checkpoint.

    Raises:
      RunError: naming what is missing or unreadable: the workdir, its
        config.json, vocabulary or checkpoints, or a config that does not
        describe the checkpoint.
    """
    path = os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(workdir))))
    return TrainedModel.restore(read_run_config(path), path)


# --- the model ---------------------------------------------------------------------------------


class TrainedModel:
    """A trained run, restored and ready to decode (`attnx.load`).

    Attributes:
      config: the run's config (`WORKDIR/config.json`).
      workdir: the run's resolved workdir.
      step: the training step of the restored checkpoint.
      tokenizer: the run's tokenizer.
      model_config: the architecture's config dataclass (`attnx.models.make_model_config`).
      model: the restored NNX model (for your own analyses; decoding does not change it).
      image_source: True for a captioner (use `caption`), False for text (`translate`).
      default_beam_size, default_batch_size: what decoding uses unless told:
        the run's `config.decode` values, else its `config.eval` ones.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        tokenizer: tokenizers.Tokenizer,
        model_config: Any,
        model: nnx.Module,
        step: int,
    ):
        self.config = config
        self.workdir = workdir
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model = model
        self.step = step
        # What the model's encoder reads, as its spec says.
        self.image_source = MODELS[config.model.name].source_kind == "image"
        self._max_target_length = int(_setting(config, "task.max_target_length"))
        self._length_penalty = _setting(config, "eval.length_penalty", "gnmt")
        self._alpha = float(_setting(config, "eval.alpha", 0.6))
        self.default_beam_size = int(
            _setting(config, "decode.beam_size", None) or _setting(config, "eval.beam_size")
        )
        self.default_batch_size = int(
            _setting(config, "decode.batch_size", None) or _setting(config, "eval.batch_size", 16)
        )
        limits = [
            (f"config.task.max_source_length={value}", int(value))
            for value in [_setting(config, "task.max_source_length", None)]
            if value
        ]
        # The model's own bounds: learned positions, or a score sized for the source length.
        for field in ("max_length", "max_source_length"):
            value = getattr(model_config, field, None)
            if isinstance(value, int) and not self.image_source:
                limits.append((f"config.model.{field}={value}", value))
        # The tightest limit, named for the truncation warning; None: text of any length.
        self._source_limit = min(limits, key=lambda limit: limit[1]) if limits else None
        image_size = _setting(config, "task.image_size", None)
        self._image_size = tuple(int(n) for n in image_size) if image_size else None
        self._channels = getattr(model_config, "image_channels", None)

    @classmethod
    def restore(cls, config: ml_collections.ConfigDict, workdir: str) -> TrainedModel:
        """Builds the model of `config` and restores the newest whole checkpoint of `workdir`."""
        vocab = os.path.join(workdir, "vocab")
        if not os.path.isfile(os.path.join(vocab, tokenizers.TOKENIZER_FILE)):
            raise RunError(
                f"attnx.load: {workdir} has no vocabulary ({vocab}/{tokenizers.TOKENIZER_FILE})"
            )
        steps_dir = os.path.join(workdir, "checkpoints")
        if not os.path.isdir(steps_dir) or not any(n.isdigit() for n in os.listdir(steps_dir)):
            raise RunError(f"attnx.load: {workdir} has no checkpoint in {steps_dir}")
        try:
            tokenizer = tokenizers.load_tokenizer(vocab)
        except (OSError, ValueError, KeyError) as error:
            raise RunError(f"attnx.load: cannot read the vocabulary in {vocab}: {error}") from None
        if config.model.get("name") not in MODELS:
            raise RunError(
                f"attnx.load: {CONFIG_FILE} of {workdir}: config.model.name="
                f"{config.model.get('name')!r} is not one of {sorted(MODELS)}"
            )
        try:
            # The vocabulary sizes go where the model has a field for them (none for images).
            model_config = make_model_config(
                config.model.to_dict(),
                source_vocab_size=tokenizer.vocab_size,
                target_vocab_size=tokenizer.vocab_size,
            )
        except (ValueError, TypeError) as error:
            raise RunError(f"attnx.load: {CONFIG_FILE} of {workdir}: {error}") from None
        model, step = _restore_model(config, workdir, model_config)
        logging.info("attnx.load: step %d of %s", step, workdir)
        return cls(config, workdir, tokenizer, model_config, model, step)

    # --- public API ---

    def translate(
        self,
        texts: Sequence[str],
        *,
        beam_size: int | None = None,
        nbest: int = 1,
        alignment: str | None = None,
        batch_size: int | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Result]:
        """Decodes each text with beam search; one `Result` per text, in order.

        Args:
          texts: the sources, one text each ("" gives a Result without hypotheses).
          beam_size: hypotheses kept per input; default `config.decode.beam_size`,
            else `config.eval.beam_size` of the run.
          nbest: hypotheses returned per input, best first (<= beam_size).
          alignment: 'hard' or 'soft': also give each hypothesis's `alignment`
            (hard) or `soft_alignment`; None gives neither.
          batch_size: inputs decoded at once; default `config.decode.batch_size`,
            else `config.eval.batch_size` of the run.
          names: how warnings name each input (default 'input i', 0-based).
        """
        if self.image_source:
            raise ValueError("translate: this run captions images; use caption()")
        if isinstance(texts, str):
            raise TypeError("translate: give a list of texts, not one str")
        names = self._names(names, len(texts))
        sources = [self._text(text, name) for text, name in zip(texts, names, strict=True)]
        return self._decode(sources, beam_size, nbest, alignment, batch_size)

    def caption(
        self,
        images: Sequence[ImageInput],
        *,
        beam_size: int | None = None,
        nbest: int = 1,
        alignment: str | None = None,
        batch_size: int | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Result]:
        """Captions each image (a path, or a uint8 array `[H, W]` / `[H, W, C]`); as `translate`.

        An empty path ("") gives a Result without hypotheses.

        Raises:
          RunError: an image that cannot be read, naming it.
        """
        if not self.image_source:
            raise ValueError("caption: this run translates text; use translate()")
        if isinstance(images, str | os.PathLike) or (
            isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim <= 3
        ):
            raise TypeError("caption: give a list of images, not one")
        names = self._names(names, len(images))
        sources = [
            self._image(image, index, name)
            for index, (image, name) in enumerate(zip(images, names, strict=True))
        ]
        return self._decode(sources, beam_size, nbest, alignment, batch_size)

    # --- inputs ---

    @staticmethod
    def _names(names: Sequence[str] | None, count: int) -> Sequence[str]:
        if names is None:
            return [f"input {i}" for i in range(count)]
        if len(names) != count:
            raise ValueError(f"names: {len(names)} names for {count} inputs")
        return names

    def _label(self, token: int) -> str:
        if token == tokenizers.EOS_ID:
            return "</s>"
        if token == tokenizers.UNK_ID:
            return "<unk>"
        return self.tokenizer.decode([token]) or f"<{token}>"

    def _text(self, text: str, name: str) -> _Source:
        if not isinstance(text, str):
            raise TypeError(f"translate: {name} is a {type(text).__name__}, not a str")
        if not text:
            return _Source(text, None)
        unknown = self.tokenizer.unknown_characters(text)
        if unknown:
            logging.warning(
                "%s: characters outside the vocabulary, read as <unk>: %s", name, _describe(unknown)
            )
        ids = self.tokenizer.encode(text)
        truncated = False
        if self._source_limit is not None and len(ids) + 1 > self._source_limit[1]:
            key, limit = self._source_limit
            logging.warning(
                "%s: %d tokens and eos exceed %s; decoding its first %d tokens",
                name,
                len(ids),
                key,
                limit - 1,
            )
            ids, truncated = ids[: limit - 1], True
        ids = np.append(ids, tokenizers.EOS_ID).astype(np.int32)
        labels = [self._label(int(token)) for token in ids]
        return _Source(text, ids, labels, unknown, truncated)

    def _image(self, image: ImageInput, index: int, name: str) -> _Source:
        if isinstance(image, np.ndarray):
            label = f"array {index}"
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"caption: {name} is a {image.dtype} array of shape {image.shape}; give "
                    "uint8 [H, W] or [H, W, C]"
                )
            picture = Image.fromarray(
                image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
            )
        else:
            label = os.fspath(image)
            if not label:
                return _Source(label, None)
            try:
                with Image.open(label) as opened:
                    opened.load()
                    picture = opened.copy()
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                reason = getattr(error, "strerror", None) or error
                raise RunError(f"{name}: cannot read the image {label}: {reason}") from None
        # The model's channels, as the pipeline's images had them.
        if self._channels == 1:
            picture = picture.convert("L")
        elif self._channels == 3:
            picture = picture.convert("RGB")
        if self._image_size is not None and picture.size != self._image_size[::-1]:
            height, width = self._image_size
            picture = picture.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(picture)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if self._channels is not None and pixels.shape[2] != self._channels:
            raise RunError(
                f"{name}: the image {label} has {pixels.shape[2]} channels; the model reads "
                f"{self._channels}"
            )
        return _Source(label, pixels.astype(np.float32) / 255.0)

    # --- decoding ---

    def _decode(
        self,
        sources: list[_Source],
        beam_size: int | None,
        nbest: int,
        alignment: str | None,
        batch_size: int | None,
    ) -> list[Result]:
        beam_size = self.default_beam_size if beam_size is None else beam_size
        batch_size = self.default_batch_size if batch_size is None else batch_size
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
        if not isinstance(nbest, int) or not 1 <= nbest <= beam_size:
            raise ValueError(f"nbest must be an int in [1, beam_size={beam_size}], got {nbest!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        alignment_output.check_kind(alignment, key="alignment")
        hypotheses: list[list[Hypothesis]] = [[] for _ in sources]
        for start in range(0, len(sources), batch_size):
            chunk = range(start, min(start + batch_size, len(sources)))
            real = [i for i in chunk if sources[i].array is not None]
            # Images of different sizes (no config.task.image_size) cannot share a batch.
            groups: dict[tuple[int, ...], list[int]] = {}
            for i in real:
                groups.setdefault(sources[i].array.shape if self.image_source else (), []).append(i)
            for rows in groups.values():
                found = self._decode_batch(
                    [sources[i] for i in rows], beam_size, nbest, alignment, batch_size
                )
                for i, one in zip(rows, found, strict=True):
                    hypotheses[i] = one
        return [
            Result(
                source=source.source,
                hypotheses=found,
                source_tokens=source.source_tokens,
                unknown_characters=source.unknown_characters,
                truncated=source.truncated,
            )
            for source, found in zip(sources, hypotheses, strict=True)
        ]

    def _batch_array(self, sources: list[_Source], rows: int) -> np.ndarray:
        """The sources as one padded batch of `rows` rows (zero rows after them)."""
        if self.image_source:
            batch = np.zeros((rows, *sources[0].array.shape), np.float32)
            for row, source in enumerate(sources):
                batch[row] = source.array
            return batch
        if self._source_limit is not None:
            width = self._source_limit[1]
        else:  # No limit: a power of two, so that few lengths compile.
            width = _next_power_of_two(max(len(source.array) for source in sources))
        batch = np.zeros((rows, width), np.int32)
        for row, source in enumerate(sources):
            batch[row, : len(source.array)] = source.array
        return batch

    def _decode_batch(
        self,
        sources: list[_Source],
        beam_size: int,
        nbest: int,
        alignment: str | None,
        batch_size: int,
    ) -> list[list[Hypothesis]]:
        """Beam search on one batch of non-empty sources; their hypotheses, best first."""
        # A power of two of rows (at most batch_size): few shapes, few compilations.
        rows = min(_next_power_of_two(len(sources)), batch_size)
        result = decoding.beam_search(
            self.model,
            jnp.asarray(self._batch_array(sources, rows)),
            beam_size=beam_size,
            length_penalty=self._length_penalty,
            alpha=self._alpha,
            max_length=self._max_target_length,
            return_weights=True,
            num_return=nbest,
        )
        sequences, scores, log_probs, lengths, finished, weights = (
            np.asarray(x)
            for x in (
                result.sequences,
                result.scores,
                result.log_probs,
                result.lengths,
                result.finished,
                result.alignments,
            )
        )
        found = []
        for row, source in enumerate(sources):
            source_length = weights.shape[-1] if self.image_source else len(source.array)
            one = []
            for k in range(nbest):
                # A hypothesis that never got a finite score is an empty slot of the pool.
                if not np.isfinite(scores[row, k]):
                    continue
                length = int(lengths[row, k])
                ids = sequences[row, k, :length]
                attention = weights[row, k, :length, :source_length]
                ended = bool(finished[row, k])
                hard = soft = None
                if alignment is not None:
                    # The same cut as --mode=interpret's: no eos row, no eos column.
                    source_ids = None if self.image_source else source.array[None]
                    target_mask, source_mask = alignment_output.real_masks(
                        ids[None], source_ids, source_length
                    )
                    if alignment == "hard":
                        links = alignments.argmax_links(attention[None], source_mask, target_mask)
                        hard = sorted(links[0])
                    else:
                        soft = attention[target_mask[0]][:, source_mask[0]]
                one.append(
                    Hypothesis(
                        text=self.tokenizer.decode(ids),
                        score=float(scores[row, k]),
                        log_prob=float(log_probs[row, k]),
                        tokens=[self._label(int(token)) for token in ids],
                        attention=attention,
                        finished=ended,
                        alignment=hard,
                        soft_alignment=soft,
                    )
                )
            found.append(one)
        return found
