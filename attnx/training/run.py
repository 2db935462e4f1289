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
        batch_divisor = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
        for key in ("train.batch_size", "eval.batch_size"):
            section, name = key.split(".")
            if config[section][name] % batch_divisor:
                raise ValueError(
                    f"config.{key}={config[section][name]} is not a multiple of the "
                    f"data x fsdp mesh size {batch_divisor}"
                )

        # --- Data ------------------------------------------------------------
        task = config_lib.make_task(config)
        eval_source = tasks.open_split(config.task, config.task.eval_split)
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
        model_config = _model_config(config, tokenizer.vocab_size)
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

        # --- Sharding --------------------------------------------------------
        param_shardings = sharding.state_shardings(abstract_params, mesh, rules)

        @jax.jit
        def init_rest():
            return nnx.split(create_model(), nnx.Param, ...)[2]

        @jax.jit
        def init_state():
            params = jax.lax.with_sharding_constraint(
                nnx.split(create_model(), nnx.Param, ...)[1], param_shardings
            )
            return steps.TrainState.create(params, optimizer, jax.random.key(seed + 2), loss_terms)

        with jax.set_mesh(mesh):
            state = init_state()
            rest = init_rest()
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
                graphdef, rest, label_smoothing=float(config.train.label_smoothing)
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
            model_config=model_config,
            loss_terms=loss_terms,
            graphdef=graphdef,
            rest=rest,
            optimizer=optimizer,
            schedule=schedule,
            state=state,
            state_shardings=state_shardings,
            checkpointer=checkpointer,
            eval_step=eval_step,
        )

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

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        return _pipeline(
            self.config,
            self.eval_source,
            _eval_task(self.task),
            self.tokenizer,
            train=False,
            batch_size=self.config.eval.batch_size,
            sharding_=self.data_sharding,
        )

    def source_text(self, index: int) -> str:
        """The raw source of evaluation record `index` (a label for an image)."""
        if self.captions:
            return f"image {index}"
        return self.task.source_text(self.eval_source[index])

    # --- Evaluation ------------------------------------------------------------

    def _pointing(self, params: Any, batch: dict[str, Any]) -> Any:
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
            self.eval_source,
            rows,
            rows["targets"].shape[1],
            tokenizer=self.config.task.tokenizer,
        )
        if scorer is None:
            return None
        with jax.set_mesh(self.mesh):
            alignment = evaluate.to_host(self._alignment(params, batch))
        return scorer.score(alignment[keep])

    def evaluate(
        self,
        step: int,
        writer: MetricsWriter,
        *,
        plot_dir: str | None,
        params: Any = None,
        prefix: str = "eval",
        eval_config: dict[str, Any] | None = None,
        write_metrics: bool = True,
        **options: Any,
    ) -> dict[str, float]:
        """Evaluates `params` (default: the state's) and logs to `writer`; returns the metrics.

        `eval_config` overrides fields of `config.eval`; `options` go to
        `evaluate.evaluate` (e.g. `predictions_path`).
        """
        params = self.state.params if params is None else params
        if gold.has_gold(self.task, self.config.task.tokenizer):
            options.setdefault("pointing", functools.partial(self._pointing, params))
        merged = ml_collections.ConfigDict(self.config.eval.to_dict())
        merged.update(eval_config or {})
        with jax.set_mesh(self.mesh):
            results, pictures = evaluate.evaluate(
                model=nnx.merge(self.graphdef, params, self.rest),
                params=params,
                eval_step=self.eval_step,
                batches=self.eval_batches(),
                tokenizer=self.tokenizer,
                eval_config=merged,
                max_target_length=self.config.task.max_target_length,
                captions=self.captions,
                plot_dir=plot_dir,
                references_of=lambda index: self.task.references(self.eval_source[index]),
                sources_of=self.source_text,
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
