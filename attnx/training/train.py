"""The training loop: `train_and_evaluate(config, workdir)`.

It reads top to bottom in sections: mesh, data, model and optimizer,
sharding, restore, step, evaluation, loop. Everything a run writes goes to
`workdir`: the vocabulary (`vocab/`), checkpoints (`checkpoints/`),
`metrics.jsonl`, TensorBoard events (`tensorboard/`) and attention plots
(`plots/step_N/`). Restarting the same command resumes from the newest good
checkpoint, data iterator included; SIGTERM saves and exits cleanly.
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from attnx.data import pipeline, tasks
from attnx.models import build_model, make_model_config
from attnx.training import checkpoints, evaluate, optimizers, sharding, steps
from attnx.training import config as config_lib
from attnx.training import metrics as metrics_lib
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


MODES = ("train", "eval", "decode", "visualize")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mode: str = "train"
) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last metrics.

    The other modes set everything up the same way, restore the newest
    checkpoint and then, instead of training:
      eval       evaluate it (metrics.jsonl, TensorBoard, plots);
      decode     beam-search the whole evaluation split into
                 WORKDIR/predictions_step_N.tsv (reference, hypothesis);
      visualize  plot the attention of `config.eval.num_plots` examples into
                 WORKDIR/plots/visualize_step_N/.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode != "train" and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        # Fail before building data and compiling anything.
        raise FileNotFoundError(
            f"--mode={mode} needs a checkpoint in {workdir}/checkpoints; there is none"
        )
    os.makedirs(workdir, exist_ok=True)
    captions = config.model.name == "captioner"

    # --- Mesh ----------------------------------------------------------------
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

    # --- Data ----------------------------------------------------------------
    task = config_lib.make_task(config)
    train_source = tasks.open_source(config.task.dataset, "train", config.task.data_dir)
    eval_source = tasks.open_source(
        config.task.dataset, config.task.eval_split, config.task.data_dir
    )
    tokenizer = pipeline.build_or_load_task_tokenizer(
        config.task.tokenizer,
        os.path.join(workdir, "vocab"),
        task,
        train_source,
        config.task.get("vocab_size"),
    )

    def make_train_batches(start_batch: int = 0):
        return _pipeline(
            config,
            train_source,
            task,
            tokenizer,
            train=True,
            batch_size=config.train.batch_size,
            sharding_=data_sharding,
            start_batch=start_batch,
        )

    train_batches = make_train_batches()

    def eval_batches():
        return _pipeline(
            config,
            eval_source,
            _eval_task(task),
            tokenizer,
            train=False,
            batch_size=config.eval.batch_size,
            sharding_=data_sharding,
        )

    # --- Model and optimizer -------------------------------------------------
    model_config = make_model_config(
        config.model.to_dict(),
        source_vocab_size=None if captions else tokenizer.vocab_size,
        target_vocab_size=tokenizer.vocab_size,
    )
    seed = config.train.seed

    def create_model():
        return build_model(
            config.model.name, model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1)
        )

    abstract_model = nnx.eval_shape(create_model)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    model_dim = getattr(model_config, "d_model", None)
    optimizer, schedule = optimizers.make_optimizer(config.train, model_dim=model_dim)
    plateau = None
    if config.train.schedule == "plateau":
        # Loss-like metrics improve downwards, the rest (accuracy, BLEU) upwards.
        lower_is_better = config.train.plateau_metric.endswith(("perplexity", "loss"))
        plateau = optimizers.PlateauScheduler.from_config(
            config.train, mode="min" if lower_is_better else "max"
        )

    # --- Sharding ------------------------------------------------------------
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)

    @jax.jit
    def init_rest():
        return nnx.split(create_model(), nnx.Param, ...)[2]

    @jax.jit
    def init_state():
        params = jax.lax.with_sharding_constraint(
            nnx.split(create_model(), nnx.Param, ...)[1], param_shardings
        )
        return steps.TrainState.create(params, optimizer, jax.random.key(seed + 2))

    with jax.set_mesh(mesh):
        state = init_state()
        rest = init_rest()
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    del abstract_rest

    # --- Restore -------------------------------------------------------------
    checkpointer = checkpoints.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        best_metric=config.checkpoint.get("best_metric") or None,
        best_mode=config.checkpoint.best_mode,
        keep_best=config.checkpoint.keep_best,
        every_steps=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save,
        config_hash=checkpoints.config_hash(config),
    )
    restored = checkpointer.restore(target=state)
    if restored is not None:
        state, data_state = restored
        if data_state is not None:
            train_batches.set_state(data_state["iterator"])
            if plateau is not None and data_state.get("plateau"):
                plateau.load_state_dict(data_state["plateau"])
        elif config.task.packing:
            logging.warning(
                "The checkpoint's data positions come from another number of processes and "
                "packed batches cannot be repositioned: the data starts from its beginning."
            )
        else:
            # Written by another number of processes: every global batch is the
            # same for any process count, so the step says where to continue.
            train_batches.close()
            train_batches = make_train_batches(start_batch=int(state.step))
            logging.info("Data repositioned at global batch %d.", int(state.step))
        logging.info("Resumed from step %d.", int(state.step))
    start_step = int(state.step)
    checkpointer.install_sigterm_handler()

    # --- Step ----------------------------------------------------------------
    hard_attention = None
    if captions and config.model.get("attention") == "hard":
        hard_attention = steps.HardAttention(
            reward_weight=float(config.train.reward_weight),
            entropy_weight=float(config.train.entropy_weight),
            baseline_decay=float(config.train.baseline_decay),
        )
    train_step = jax.jit(
        steps.make_train_step(
            graphdef,
            rest,
            optimizer,
            label_smoothing=float(config.train.label_smoothing),
            grad_accum_steps=config.train.grad_accum_steps,
            attention_penalty=float(config.train.get("attention_penalty", 0.0)),
            hard_attention=hard_attention,
        ),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        steps.make_eval_step(graphdef, rest, label_smoothing=float(config.train.label_smoothing)),
        in_shardings=(state_shardings.params, data_sharding),
    )

    # --- Evaluation ----------------------------------------------------------
    writer = MetricsWriter(workdir, total_steps=config.train.steps, start_step=start_step)

    def run_evaluation(
        step: int, params=None, prefix: str = "eval", plots: str | None = None, **overrides
    ) -> dict[str, float]:
        params = state.params if params is None else params
        eval_config = ml_collections.ConfigDict(config.eval.to_dict())
        eval_config.update(overrides.pop("eval_config", {}))
        with jax.set_mesh(mesh):
            results, pictures = evaluate.evaluate(
                model=nnx.merge(graphdef, params, rest),
                params=params,
                eval_step=eval_step,
                batches=eval_batches(),
                tokenizer=tokenizer,
                eval_config=eval_config,
                max_target_length=config.task.max_target_length,
                captions=captions,
                plot_dir=os.path.join(workdir, "plots", plots or f"step_{step}"),
                references_of=lambda index: task.references(eval_source[index]),
                **overrides,
            )
        results = {k.replace("eval/", f"{prefix}/", 1): v for k, v in results.items()}
        writer.write(step, results)
        for name, picture in pictures:
            writer.write_image(step, f"attention/{name}", picture)
        return results

    if mode != "train":
        if restored is None:
            raise FileNotFoundError(
                f"--mode={mode} needs a checkpoint in {workdir}/checkpoints; there is none"
            )
        if mode == "eval":
            results = run_evaluation(start_step)
        elif mode == "decode":
            path = os.path.join(workdir, f"predictions_step_{start_step}.tsv")
            results = run_evaluation(
                start_step,
                eval_config={"max_examples": 2**31 - 1, "num_plots": 0},
                predictions_path=path,
            )
            logging.info("Wrote %s", path)
        else:
            results = run_evaluation(
                start_step,
                plots=f"visualize_step_{start_step}",
                eval_config={"max_examples": config.eval.num_plots},
            )
        writer.close()
        train_batches.close()
        checkpointer.close()
        return results

    def average_and_evaluate(step: int) -> dict[str, float]:
        """Evaluates the mean parameters of the last N checkpoints (Vaswani et al. sec. 6.1)."""
        last = sorted(checkpointer.all_steps())[-config.checkpoint.average_last :]
        trees = [checkpointer.restore(s, target=state)[0].params for s in last]
        averaged = jax.jit(optimizers.average_checkpoints, out_shardings=state_shardings.params)(
            trees
        )
        logging.info("Averaged the parameters of steps %s.", last)
        return run_evaluation(
            step, params=averaged, prefix="eval_averaged", plots=f"averaged_{step}"
        )

    # --- Loop ----------------------------------------------------------------
    logging.info(
        "Training %s on %s: steps %d -> %d, mesh %s.",
        config.model.name,
        config.task.dataset,
        start_step,
        config.train.steps,
        dict(mesh.shape),
    )
    results: dict[str, float] = {}
    train_sums: dict[str, Any] = {}
    step = start_step
    while step < config.train.steps:
        batch = next(train_batches)
        with jax.set_mesh(mesh):
            state, sums = train_step(state, batch)
        step += 1
        train_sums = metrics_lib.add_metric_sums(train_sums, sums)
        last = step == config.train.steps
        if step % config.train.log_every_steps == 0 or last:
            logged = metrics_lib.compute_metrics(train_sums)
            logged = {f"train/{k}": v for k, v in logged.items()}
            logged["train/learning_rate"] = float(schedule(step - 1)) * optimizers.get_lr_scale(
                state.opt_state
            )
            if hard_attention is not None:
                logged["train/baseline"] = float(state.baseline)  # b after this step
            writer.write(step, logged)
            writer.progress(step, logged["train/loss"])
            results.update(logged)
            train_sums = {}
        eval_metrics = None
        if step % config.eval.every_steps == 0 or last:
            eval_metrics = run_evaluation(step)
            results.update(eval_metrics)
            if plateau is not None:
                metric = eval_metrics[config.train.plateau_metric]
                state = state.replace(
                    opt_state=optimizers.set_lr_scale(state.opt_state, plateau.update(metric))
                )
        stop = checkpointer.should_stop(step)
        host_state = {
            "iterator": train_batches.get_state(),
            "plateau": None if plateau is None else plateau.state_dict(),
        }
        checkpointer.save(
            step,
            state,
            host_state,
            metrics=eval_metrics,
            force=last or stop,
        )
        if stop:
            logging.warning("Preempted: saved step %d, exiting.", step)
            break
    checkpointer.wait()
    if config.checkpoint.average_last > 1 and step == config.train.steps:
        results.update(average_and_evaluate(step))
    checkpointer.close()
    train_batches.close()
    writer.close()
    return results


def model_summary(
    config: ml_collections.ConfigDict, vocab_size: int
) -> list[tuple[str, tuple, int]]:
    """(path, shape, size) of every parameter of `config.model`, without data or memory."""
    captions = config.model.name == "captioner"
    model_config = make_model_config(
        config.model.to_dict(),
        source_vocab_size=None if captions else vocab_size,
        target_vocab_size=vocab_size,
    )
    abstract = nnx.eval_shape(
        lambda: build_model(config.model.name, model_config, rngs=nnx.Rngs(0))
    )
    rows = []
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value()
        rows.append(("/".join(map(str, path)), tuple(value.shape), int(np.prod(value.shape))))
    return rows
