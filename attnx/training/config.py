"""The fields every experiment has, with defaults, and checks that run before anything compiles.

Experiment files (`experiments/NAME.py`) start from `base_config()` and set
what they change. ml_collections already rejects an unknown key or a value
of the wrong type on the command line (`--config.train.stepz=1`); `validate`
checks what types cannot: sizes, choices, the mesh against the devices.
"""

import jax
import ml_collections
from ml_collections import config_dict

from attnx.data import tasks
from attnx.interpret import alignment_output
from attnx.models import MODELS, make_model_config, model_section, spec_of
from attnx.training.config_overrides import model_config_dict
from attnx.training.metrics import BLEU_TOKENIZERS

# config.task keys that say which record fields a TFDS task reads.
TASK_KEYS = tasks.TASK_KEYS

TOKENIZERS = ("char", "byte", "sentencepiece")


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by all experiments (each experiment overrides what it needs)."""
    c = ml_collections.ConfigDict()
    c.task = dict(
        dataset="dates",
        data_dir=config_dict.placeholder(str),
        tokenizer="char",
        vocab_size=config_dict.placeholder(int),
        max_source_length=config_dict.placeholder(int),
        max_target_length=16,
        packing=False,
        worker_count=0,
        eval_split="validation",
        source_key=config_dict.placeholder(str),
        target_key=config_dict.placeholder(str),
        image_key=config_dict.placeholder(str),
        caption_key=config_dict.placeholder(str),
        # Images with several captions (COCO): train on 'first', or on a
        # 'random' one, drawn anew for every image and epoch. Evaluation
        # scores against all of them either way.
        caption_choice=config_dict.placeholder(str),
        image_size=config_dict.placeholder(tuple),
        # A TFDS builder of your own: a module path or a .py file, imported
        # before `dataset` is looked up, so that `dataset` can name its builder.
        builder_module=config_dict.placeholder(str),
        # dataset='files': your own files (attnx/data/files_kind.py). Paths or
        # globs per split, relative to the directory the command starts in.
        files=dict(
            train=config_dict.placeholder(str),
            validation=config_dict.placeholder(str),
            test=config_dict.placeholder(str),
            # 'tsv', 'jsonl', 'text_pairs' (train.en + train.de) or 'jsonl_images'.
            format="tsv",
            header=False,
            source_field="source",
            target_field="target",
            source_suffix=config_dict.placeholder(str),
            target_suffix=config_dict.placeholder(str),
            image_field="image",
            caption_field="caption",
            image_channels=3,
        ),
    )
    # Every field of the architecture, so that any of them can be set from the
    # command line or a sweep (the Transformer's defaults are the paper's base model).
    c.model = model_config_dict(model_section("transformer"))
    c.train = dict(
        steps=1000,
        batch_size=64,
        seed=0,
        optimizer="adam",
        learning_rate=1e-3,
        schedule="constant",
        warmup_steps=0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.9,
        rho=0.95,
        rsqrt_scale=0.0,
        clip_grad_norm=0.0,
        grad_accum_steps=1,
        label_smoothing=0.0,
        attention_penalty=0.0,
        # Hard attention's REINFORCE (Xu et al. 2015, eq. 12): lambda_r, lambda_e
        # (the authors' code's 1/10 and 0.002; the paper gives none) and the
        # baseline's moving-average decay (the paper's 0.9).
        reward_weight=0.1,
        entropy_weight=0.002,
        baseline_decay=0.9,
        plateau_factor=0.1,
        plateau_patience=0,
        plateau_metric="eval/perplexity",
        log_every_steps=50,
        # Fine-tuning: another run's workdir whose parameters start this run (its
        # best step by its own best_metric, or warm_start_step when > 0); the
        # optimizer, step and data start fresh. A resumed run ignores it.
        warm_start_dir="",
        warm_start_step=0,
    )
    c.checkpoint = dict(
        every_steps=500,
        keep=3,
        best_metric="eval/exact_match",
        best_mode="max",
        keep_best=1,
        average_last=0,
        async_save=True,
    )
    c.eval = dict(
        every_steps=500,
        batch_size=64,
        max_examples=512,
        beam_size=4,
        length_penalty="gnmt",
        alpha=0.6,
        num_plots=4,
        # sacrebleu tokenizer: '13a' (WMT), 'intl', 'zh', 'char' (digit strings), 'none'.
        bleu_tokenize="13a",
        # Also eval/tokenized_bleu: BLEU on tokenised text with compound splitting, as
        # papers before sacreBLEU reported it (attnx.training.string_metrics.tokenized_bleu).
        tokenized_bleu=False,
        # The split --mode=eval, decode and visualize read (default task.eval_split);
        # metrics of another split are named after it (test/bleu). Training evaluates
        # on task.eval_split, and the best checkpoint once on 'test' at its end.
        split=config_dict.placeholder(str),
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=())
    # --mode=decode on your own inputs (attnx.training.interactive); beam_size and
    # batch_size unset take the run's eval.* values (batch 1 on a terminal).
    c.decode = dict(
        input=config_dict.placeholder(str),  # a file of one input a line, or '-' (stdin)
        beam_size=config_dict.placeholder(int),
        nbest=1,
        # 'hard' (Pharaoh i-j) or 'soft' (the weights): A-i lines for your inputs, and
        # decode/alignments_step_N.{pharaoh,soft} for the evaluation split.
        print_alignment=config_dict.placeholder(str),
        batch_size=config_dict.placeholder(int),
    )
    # --mode=compile (attnx.training.compile_mode): the TPU topology to compile for
    # without a TPU (e.g. 'v5e:4x4', 'v4:2x2x2'), and which steps.
    c.compile = dict(topology=config_dict.placeholder(str), steps="train,eval,decode")
    # --mode=interpret (attnx.training.interpret_mode): the examples it reads and
    # scores, and the metric that ranks the (layer, head) maps against gold.
    c.interpret = dict(
        split=config_dict.placeholder(str),  # default: task.eval_split
        max_examples=256,
        head_metric="accuracy",  # 'accuracy', 'mass' or 'worst_field_accuracy'
        page_examples=32,  # examples browsable in index.html
        figures=4,  # examples drawn as PNG and SVG figures
        faithfulness_examples=32,  # examples of the erasure and intervention tests (0: none)
    )
    return c


def parse_options(arg: str | None, allowed: tuple[str, ...], experiment: str) -> set[str]:
    """An experiment's comma-separated arg, 'luong,tiny' -> {'luong', 'tiny'}.

    Raises:
      ValueError: naming the first unknown option, the experiment and the choices.
    """
    options = {part.strip() for part in (arg or "").split(",") if part.strip()}
    unknown = sorted(options - set(allowed))
    if unknown:
        raise ValueError(
            f"{experiment}: unknown arg {unknown[0]!r} in {arg!r}; "
            f"use a comma-separated subset of {list(allowed)}"
        )
    return options


def smoke_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks the schedule of `config` in place to a CPU smoke run (an experiment's `tiny`).

    20 steps of batch 16, logs every 10, a checkpoint every 10, one evaluation
    at the end on 32 examples with beam 2 and 2 plots; a warmup shrinks to 10
    steps. The experiment shrinks its model and data itself, and may change
    any of these afterwards.
    """
    config.train.steps = 20
    config.train.batch_size = 16
    config.train.log_every_steps = 10
    if config.train.warmup_steps:
        config.train.warmup_steps = 10
    config.checkpoint.every_steps = 10
    config.eval.every_steps = 20
    config.eval.batch_size = 16
    config.eval.max_examples = 32
    config.eval.beam_size = 2
    config.eval.num_plots = 2
    return config


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"config.{key}={value!r}; choose one of {list(choices)}")


def _positive(key: str, value) -> None:
    if value is None or value < 1:
        raise ValueError(f"config.{key} must be >= 1, got {value!r}")


def make_task(config: ml_collections.ConfigDict) -> tasks.Task:
    """The task of config.task: the dataset and the record fields it reads."""
    try:
        return tasks.task_from_config(config.task)
    except ValueError as error:
        raise ValueError(f"config.task: {error}") from None


def task_source_kind(task: tasks.Task) -> str:
    """'image' for a captioning task, else 'text': what a model's encoder must read."""
    return "image" if isinstance(task, tasks.CaptionTask) else "text"


def check_model(config: ml_collections.ConfigDict, task: tasks.Task) -> None:
    """The model section against its architecture and the task, before any data is read.

    Builds the architecture's config dataclass with a stand-in vocabulary (the
    tokenizer's comes later), so every field and attention check runs now.
    """
    spec = spec_of(config.model.name)
    kind = task_source_kind(task)
    if spec.source_kind != kind:
        fitting = sorted(name for name, s in MODELS.items() if s.source_kind == kind)
        raise ValueError(
            f"config.model.name={config.model.name!r} reads {spec.source_kind} sources, but "
            f"config.task.dataset={config.task.dataset!r} gives {kind}; use one of {fitting}"
        )
    defaults = base_config().train
    for name, other in MODELS.items():
        for key in set(other.train_keys) - set(spec.train_keys):
            value = config.train.get(key, defaults.get(key))
            if value != defaults.get(key):
                raise ValueError(
                    f"config.train.{key}={value!r} is read by the {name}'s loss terms; "
                    f"config.model.name={config.model.name!r} has none (leave it at "
                    f"{defaults.get(key)!r})"
                )
    stand_in = config.task.get("vocab_size") or 260
    make_model_config(
        config.model.to_dict(), source_vocab_size=stand_in, target_vocab_size=stand_in
    )


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ValueError naming the first bad key; cheap (no data, no compilation).

    `device_count` is the number of devices the mesh must cover: default
    `jax.device_count()`; `--mode=compile` gives its topology's.
    """
    for section in ("task", "model", "train", "checkpoint", "eval", "mesh"):
        if section not in config:
            raise ValueError(f"config.{section} is missing (start from base_config())")
    _choice("model.name", config.model.name, sorted(MODELS))
    _choice("task.tokenizer", config.task.tokenizer, TOKENIZERS)
    task = make_task(config)
    check_model(config, task)
    tasks.check_task_config(config.task)
    for key in (
        "train.steps",
        "train.batch_size",
        "train.log_every_steps",
        "train.grad_accum_steps",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "eval.every_steps",
        "eval.batch_size",
        "eval.beam_size",
        "task.max_target_length",
    ):
        section, name = key.split(".")
        _positive(key, config[section][name])
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by "
            f"config.train.grad_accum_steps={config.train.grad_accum_steps}"
        )
    if config.train.get("warm_start_step", 0) < 0:
        raise ValueError(
            f"config.train.warm_start_step must be >= 0 (0: the source's best step), "
            f"got {config.train.warm_start_step!r}"
        )
    for key in ("train.attention_penalty", "train.reward_weight", "train.entropy_weight"):
        value = config.train[key.split(".")[1]]
        if value < 0:
            raise ValueError(f"config.{key} must be >= 0, got {value!r}")
    if not 0.0 <= config.train.baseline_decay < 1.0:
        raise ValueError(
            f"config.train.baseline_decay must be in [0, 1), got {config.train.baseline_decay!r}"
        )
    _choice("eval.length_penalty", config.eval.length_penalty, ("gnmt", "power"))
    _choice("eval.bleu_tokenize", config.eval.bleu_tokenize, BLEU_TOKENIZERS)
    if config.eval.get("split") is not None and not config.eval.split.strip():
        raise ValueError("config.eval.split is empty; name a split (e.g. 'test') or leave it unset")
    if "interpret" in config:
        _choice(
            "interpret.head_metric",
            config.interpret.head_metric,
            ("accuracy", "mass", "worst_field_accuracy"),
        )
        _positive("interpret.max_examples", config.interpret.max_examples)
        for key in ("page_examples", "figures", "faithfulness_examples"):
            if config.interpret[key] < 0:
                raise ValueError(
                    f"config.interpret.{key} must be >= 0, got {config.interpret[key]!r}"
                )
    if config.checkpoint.average_last > config.checkpoint.keep:
        raise ValueError(
            f"config.checkpoint.average_last={config.checkpoint.average_last} needs "
            f"config.checkpoint.keep >= it (keep={config.checkpoint.keep})"
        )
    _choice("checkpoint.best_mode", config.checkpoint.best_mode, ("max", "min"))
    if config.task.packing and not spec_of(config.model.name).packing:
        packers = sorted(name for name, spec in MODELS.items() if spec.packing)
        raise ValueError(
            f"config.task.packing=True: the {config.model.name} takes one sequence per row; "
            f"packed rows need model.name in {packers}"
        )
    devices = jax.device_count() if device_count is None else device_count
    sizes = {axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor")}
    fixed = 1
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{axis} must be a positive size or -1, got {size}")
        if size != -1:
            fixed *= size
    if -1 in sizes.values():
        if devices % fixed:
            raise ValueError(
                f"config.mesh {sizes} does not fit {devices} devices: the fixed sizes "
                f"multiply to {fixed}"
            )
    elif fixed != devices:
        raise ValueError(f"config.mesh {sizes} needs {fixed} devices, but there are {devices}")
    _validate_decode(config)


def _validate_decode(config: ml_collections.ConfigDict) -> None:
    """The config.decode keys (a config without the section, from an older attnx, passes)."""
    if "decode" not in config:
        return
    decode = config.decode
    for key in ("beam_size", "batch_size"):
        if decode[key] is not None:
            _positive(f"decode.{key}", decode[key])
    _positive("decode.nbest", decode.nbest)
    if decode.beam_size is not None and decode.nbest > decode.beam_size:
        raise ValueError(
            f"config.decode.nbest={decode.nbest} is more than config.decode.beam_size="
            f"{decode.beam_size}: beam search keeps only that many hypotheses"
        )
    alignment_output.check_kind(decode.get("print_alignment"))
    if decode.input is not None and not decode.input:
        raise ValueError("config.decode.input is empty; give a file, or - for standard input")
