"""What every mode of a run builds first: `Run.build(config, workdir, mode=...)`.

Training and the read-only modes (eval, decode, visualize) share it: the
mesh, the data, the tokenizer, the model and optimizer, the shardings, the
checkpointer with the newest whole checkpoint restored, and the evaluation.
What differs is what they may touch: training builds the training pipeline
and a writable checkpointer; the read-only modes open the checkpoints
read-only, never build a vocabulary, and write nothing outside their own
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from attnx.data import pipeline, tasks, tokenizers
from attnx.errors import RunError
from attnx.models import build_model, make_loss_terms, make_model_config, model_width, spec_of
from attnx.models.loss_terms import LossTerms
from attnx.training import (
    checkpoint_items,
    checkpoints,
    evaluate,
    gold,
    optimizers,
    sharding,
    steps,
)
from attnx.training import config as config_lib
from attnx.training.logging import MetricsWriter


def _eval_task(task: tasks.Task) -> tasks.Task:
    if getattr(task, "caption_choice", None) == "random":
        # The teacher-forced evaluation loss is on one fixed caption per image.
        return dataclasses.replace(task, caption_choice="first")
    return task


def _pipeline(
    config, source, task, tokenizer, *, train: bool, batch_size: int, sharding_, start_batch=0
):
    return pipeline.make_pipeline(
        source,
        task,
        tokenizer,
        max_target_length=config.task.max_target_length,
        max_source_length=config.task.get("max_source_length"),
        batch_size=batch_size,
        packing=bool(config.task.packing) and train,
        num_epochs=None if train else 1,
        shuffle=train,
        seed=config.train.seed,
        worker_count=config.task.worker_count if train else 0,
        image_size=tuple(config.task.image_size) if config.task.get("image_size") else None,
        # Evaluation scores against the records' raw references (every caption).
        with_index=not train,
        start_batch=start_batch,
        sharding=sharding_,
    )


def _model_config(config: ml_collections.ConfigDict, vocab_size: int):
    captions = spec_of(config.model.name).source_kind == "image"
    return make_model_config(
        config.model.to_dict(),
        source_vocab_size=None if captions else vocab_size,
        target_vocab_size=vocab_size,
    )


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises ValueError unless the data x fsdp mesh axes divide the batch sizes."""
    batch_divisor = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    for key in ("train.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        if config[section][name] % batch_divisor:
            raise ValueError(
                f"config.{key}={config[section][name]} is not a multiple of the "
                f"data x fsdp mesh size {batch_divisor}"
            )


@dataclasses.dataclass
class ModelParts:
    """The model and optimizer of a config, as functions and abstract values; no data, no memory.

    Attributes:
      model_config: the architecture's config dataclass.
      graphdef: the model's static structure (`nnx.split`).
      abstract_params: the `nnx.Param` state as shapes and dtypes.
      param_shardings: NamedShardings of the parameters (the logical-axis rules).
      loss_terms: what the model adds to the token loss (its spec's).
      optimizer, schedule: the optax transformation and its learning-rate schedule.
      init_state: `() -> TrainState`, the state before step 0, to be jitted
        (its parameters constrained to `param_shardings`).
      init_rest: `() -> nnx.State`, the model's non-parameter state, to be jitted.
    """

    model_config: Any
    graphdef: Any
    abstract_params: Any
    param_shardings: Any
    loss_terms: LossTerms | None
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], Any]
    init_state: Callable[[], steps.TrainState]
    init_rest: Callable[[], Any]


def build_model_parts(
    config: ml_collections.ConfigDict,
    vocab_size: int,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
) -> ModelParts:
    """The model, optimizer and parameter shardings of `config` for `mesh`, without data.

    Training and the read-only modes jit `init_state` and `init_rest`;
    `--mode=compile` only lowers them, for devices it does not have.
    """
    model_config = _model_config(config, vocab_size)
    seed = config.train.seed

    def create_model():
        return build_model(
            config.model.name, model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1)
        )

    abstract_model = nnx.eval_shape(create_model)
    graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    model_dim = model_width(config.model.name, model_config)
    loss_terms = make_loss_terms(config.model.name, model_config, config.train)
    optimizer, schedule = optimizers.make_optimizer(config.train, model_dim=model_dim)
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)

    def init_rest():
        return nnx.split(create_model(), nnx.Param, ...)[2]

    def init_state():
        params = jax.lax.with_sharding_constraint(
            nnx.split(create_model(), nnx.Param, ...)[1], param_shardings
        )
        state = steps.TrainState.create(params, optimizer, jax.random.key(seed + 2), loss_terms)
        # Adam's zero moments do not depend on the parameters' values, so nothing
        # would tell XLA to lay them out like the parameters: every device would
        # hold all of them (two thirds of the state) whatever fsdp and tensor say.
        opt_state = optax.tree_map_params(
            optimizer,
            jax.lax.with_sharding_constraint,
            state.opt_state,
            param_shardings,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return state.replace(opt_state=opt_state)

    return ModelParts(
        model_config=model_config,
        graphdef=graphdef,
        abstract_params=abstract_params,
        param_shardings=param_shardings,
        loss_terms=loss_terms,
        optimizer=optimizer,
        schedule=schedule,
        init_state=init_state,
        init_rest=init_rest,
    )


@dataclasses.dataclass
class Run:
    """A run's parts, built and restored; see `Run.build`."""

    config: ml_collections.ConfigDict
    workdir: str
    mode: str
    mesh: jax.sharding.Mesh
    data_sharding: jax.sharding.Sharding
    task: tasks.Task
    captions: bool
    train_source: Any
    eval_source: Any
    tokenizer: tokenizers.Tokenizer
    model_config: Any
    loss_terms: LossTerms | None
    graphdef: Any
    rest: Any
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], Any]
    state: steps.TrainState
    state_shardings: Any
    checkpointer: checkpoints.Checkpointer
    eval_step: Callable[..., Any]
    # Set by `restore`: whether a checkpoint was restored and its data state.
    restored: bool = False
    data_state: Any = None
    # The jitted teacher-forced 'alignment' of `_pointing`, compiled on first use.
    _alignment: Any = None
    # The logical-axis rules (config.mesh.rules over the defaults).
    rules: sharding.Rules = sharding.DEFAULT_RULES
    # The split `eval_source` holds: config.task.eval_split for training, else
    # config.eval.split when set. Other splits are opened on demand (`split_source`).
    eval_split: str = "validation"
    _other_sources: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, workdir: str, *, mode: str) -> Run:
        """Builds everything up to (not including) the restore.

        Args:
          config: a validated experiment config.
          workdir: the resolved workdir (`workdir.prepare_workdir`).
          mode: 'train' or one of the read-only modes.
        """
        read_only = mode != "train"
        # An image-to-text model: its source is the batch's 'image' (the model's spec says).
        captions = spec_of(config.model.name).source_kind == "image"

        # --- Mesh ------------------------------------------------------------
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        rules = sharding.parse_rules(config.mesh.get("rules"))
        data_sharding = sharding.batch_sharding(mesh, rules)
        check_batch_sizes(config, mesh)

        # --- Data ------------------------------------------------------------
        task = config_lib.make_task(config)
        eval_split = config.task.eval_split
        if read_only and config.eval.get("split"):
            eval_split = config.eval.split  # --mode=eval/decode/visualize on another split
        eval_source = tasks.open_split(config.task, eval_split)
        if not read_only:
            # A ranking metric that evaluation leaves out stops the run now, not at step N
            # (judged on the first 512 examples it decodes: a share needs no more).
            limit = min(config.eval.max_examples, len(eval_source), 512)
            evaluate.check_ranking_metrics(
                config,
                lambda: [task.references(eval_source[i]) for i in range(limit)],
                captions=captions,
            )
        vocab_dir = os.path.join(workdir, "vocab")
        if read_only:
            # A read-only mode uses the run's own vocabulary; it never builds one.
            train_source = None
            tokenizer = tokenizers.load_tokenizer(vocab_dir)
        else:
            train_source = tasks.open_split(config.task, "train")
            tokenizer = pipeline.build_or_load_task_tokenizer(
                config.task.tokenizer, vocab_dir, task, train_source, config.task.get("vocab_size")
            )

        # --- Model and optimizer ---------------------------------------------
        parts = build_model_parts(config, tokenizer.vocab_size, mesh, rules)
        with jax.set_mesh(mesh):
            state = jax.jit(parts.init_state)()
            rest = jax.jit(parts.init_rest)()
        state_shardings = jax.tree.map(lambda x: x.sharding, state)

        checkpointer = checkpoints.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            best_metric=config.checkpoint.get("best_metric") or None,
            best_mode=config.checkpoint.best_mode,
            keep_best=config.checkpoint.keep_best,
            every_steps=config.checkpoint.every_steps,
            async_save=config.checkpoint.async_save,
            config_hash=checkpoint_items.config_hash(config),
            read_only=read_only,
        )
        eval_step = jax.jit(
            steps.make_eval_step(
                parts.graphdef, rest, label_smoothing=float(config.train.label_smoothing)
            ),
            in_shardings=(state_shardings.params, data_sharding),
        )
        return cls(
            config=config,
            workdir=workdir,
            mode=mode,
            mesh=mesh,
            data_sharding=data_sharding,
            task=task,
            captions=captions,
            train_source=train_source,
            eval_source=eval_source,
            tokenizer=tokenizer,
            model_config=parts.model_config,
            loss_terms=parts.loss_terms,
            graphdef=parts.graphdef,
            rest=rest,
            optimizer=parts.optimizer,
            schedule=parts.schedule,
            state=state,
            state_shardings=state_shardings,
            checkpointer=checkpointer,
            eval_step=eval_step,
            rules=rules,
            eval_split=eval_split,
        )

    def mesh_context(self) -> contextlib.AbstractContextManager:
        """The mesh and logical-axis rules that the compiled steps run under."""
        return sharding.activate(self.mesh, self.rules)

    # --- Restore ---------------------------------------------------------------

    def restore(self) -> None:
        """Restores the newest whole checkpoint into `state` (read-only modes: one must exist)."""
        restored = self.checkpointer.restore(target=self.state)
        if restored is None:
            if self.mode != "train":
                raise RunError(
                    f"--mode={self.mode}: no whole checkpoint in {self.checkpointer.directory}"
                )
            return
        self.state, self.data_state = restored
        self.restored = True
        if self.mode == "train":
            logging.info("Resumed from step %d.", int(self.state.step))

    # --- Data ------------------------------------------------------------------

    def train_batches(self, start_batch: int = 0) -> pipeline.BatchIterator:
        return _pipeline(
            self.config,
            self.train_source,
            self.task,
            self.tokenizer,
            train=True,
            batch_size=self.config.train.batch_size,
            sharding_=self.data_sharding,
            start_batch=start_batch,
        )

    def split_source(self, split: str | None = None) -> Any:
        """The records of `split` (None: `eval_split`), opened once (RunError if it does not exist)."""
        if split is None or split == self.eval_split:
            return self.eval_source
        if split not in self._other_sources:
            self._other_sources[split] = tasks.open_split(self.config.task, split)
        return self._other_sources[split]

    def eval_batches(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        return _pipeline(
            self.config,
            self.split_source(split),
            _eval_task(self.task),
            self.tokenizer,
            train=False,
            batch_size=self.config.eval.batch_size,
            sharding_=self.data_sharding,
        )

    def source_text(self, index: int, split: str | None = None) -> str:
        """The raw source of record `index` of `split` (default the evaluation's; images: a label)."""
        if self.captions:
            return f"image {index}"
        return self.task.source_text(self.split_source(split)[index])

    # --- Evaluation ------------------------------------------------------------

    def _pointing(self, params: Any, batch: dict[str, Any], split: str | None = None) -> Any:
        """Pointing scores of the model's 'alignment' on a batch, against the task's gold."""
        if self._alignment is None:
            self._alignment = _alignment_fn(self.graphdef, self.rest)
        host = {key: evaluate.to_host(value) for key, value in batch.items()}
        keep = np.flatnonzero(host["index"] >= 0)
        if keep.size == 0:
            return None
        rows = {key: value[keep] for key, value in host.items()}
        scorer = gold.scorer(
            self.task,
            self.split_source(split),
            rows,
            rows["targets"].shape[1],
            tokenizer=self.config.task.tokenizer,
        )
        if scorer is None:
            return None
        with self.mesh_context():
            alignment = evaluate.to_host(self._alignment(params, batch))
        return scorer.score(alignment[keep])

    def evaluate(
        self,
        step: int,
        writer: MetricsWriter,
        *,
        plot_dir: str | None,
        params: Any = None,
        prefix: str | None = None,
        split: str | None = None,
        eval_config: dict[str, Any] | None = None,
        write_metrics: bool = True,
        **options: Any,
    ) -> dict[str, float]:
        """Evaluates `params` (default: the state's) on `split` and logs to `writer`.

        Returns the metrics, named `PREFIX/...`. `split` defaults to
        `eval_split`; `prefix` to 'eval' for `config.task.eval_split` (the
        split training evaluates on) and to the split's name for any other
        (`test/bleu`), so a row never leaves its split in doubt.
        `eval_config` overrides fields of `config.eval`; `options` go to
        `evaluate.evaluate` (e.g. `predictions_path`).
        """
        split = split or self.eval_split
        if prefix is None:
            prefix = "eval" if split == self.config.task.eval_split else split
        source = self.split_source(split)
        params = self.state.params if params is None else params
        if gold.has_gold(self.task, self.config.task.tokenizer):
            options.setdefault("pointing", functools.partial(self._pointing, params, split=split))
        merged = ml_collections.ConfigDict(self.config.eval.to_dict())
        merged.update(eval_config or {})
        with self.mesh_context():
            results, pictures = evaluate.evaluate(
                model=nnx.merge(self.graphdef, params, self.rest),
                params=params,
                eval_step=self.eval_step,
                batches=self.eval_batches(split),
                tokenizer=self.tokenizer,
                eval_config=merged,
                max_target_length=self.config.task.max_target_length,
                captions=self.captions,
                plot_dir=plot_dir,
                references_of=lambda index: self.task.references(source[index]),
                sources_of=functools.partial(self.source_text, split=split),
                **options,
            )
        results = {k.replace("eval/", f"{prefix}/", 1): v for k, v in results.items()}
        if write_metrics:
            writer.write(step, results)
            writer.evaluation(step, results)
        for name, picture in pictures:
            writer.write_image(step, f"attention/{name}", picture)
        return results


def _alignment_fn(graphdef: Any, rest: Any) -> Callable[..., jax.Array]:
    """`(params, batch) -> 'alignment' [B, T, s]`, the model's own map, teacher-forced."""

    def alignment(params, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return steps.forward(model, batch, train=False, return_weights=True)[1]["alignment"]

    return jax.jit(alignment)


def vocab_without_data(config: ml_collections.ConfigDict, workdir: str | None) -> tuple[int, str]:
    """The vocabulary size the modes without data use, and where it came from.

    The run's own vocabulary (`WORKDIR/vocab`) if there is one, else the byte
    tokenizer's, else `config.task.vocab_size`, else a placeholder of 256.
    """
    vocab_file = os.path.join(workdir, "vocab", tokenizers.TOKENIZER_FILE) if workdir else None
    if vocab_file and os.path.isfile(vocab_file):
        vocab = tokenizers.load_tokenizer(os.path.dirname(vocab_file)).vocab_size
        return vocab, f"the run's vocabulary, {vocab_file}"
    if config.task.tokenizer == "byte":
        return tokenizers.ByteTokenizer().vocab_size, "the byte tokenizer"
    if config.task.get("vocab_size"):
        return config.task.vocab_size, "config.task.vocab_size"
    return 256, (
        "a placeholder: the character vocabulary comes from the training data; "
        "pass the --workdir of a run to count its own"
    )


def model_summary(
    config: ml_collections.ConfigDict, vocab_size: int
) -> list[tuple[str, tuple, int]]:
    """(path, shape, size) of every parameter of `config.model`, without data or memory."""
    model_config = _model_config(config, vocab_size)
    abstract = nnx.eval_shape(
        lambda: build_model(config.model.name, model_config, rngs=nnx.Rngs(0))
    )
    rows = []
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value()
        rows.append(("/".join(map(str, path)), tuple(value.shape), int(np.prod(value.shape))))
    return rows
