"""Every experiment file builds a valid config and model config; config errors name the key.

No data, no compilation: configs are checked with `validate` and
`make_model_config`, and `--mode=summary` in an `attnx.main` subprocess (the
command line's errors are in test_command_line.py).
"""

import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import preloaded
import pytest
from command_env import cpu_env

from attnx.models import make_model_config
from attnx.training.config import make_task, validate
from attnx.training.optimizers import RECIPES

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))
BUNDLED = {
    "dates_transformer.py",
    "dates_rnn.py",
    "numbers_convs2s.py",
    "numbers_transformer.py",
    "digits_spatial.py",
}
PAPER = {
    "wmt14_transformer_base.py",
    "wmt14_transformer_big.py",
    "wmt14_convs2s.py",
    "wmt14_rnnsearch.py",
    "wmt14_luong.py",
    "coco_spatial.py",
}
# The fields a sweep or a launch script may rely on in every experiment.
REQUIRED = (
    "train.steps",
    "train.batch_size",
    "train.seed",
    "checkpoint.every_steps",
    "eval.every_steps",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "mesh.rules",
    "model.name",
)


def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"experiment_{name[:-3]}", ROOT / "experiments" / name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config(config, vocab: int = 40):
    """The model dataclass, with the task's vocabulary size or a small stand-in."""
    vocab = config.task.vocab_size or vocab
    captions = config.model.name == "captioner"
    return make_model_config(
        config.model.to_dict(),
        source_vocab_size=None if captions else vocab,
        target_vocab_size=vocab,
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    env = cpu_env()  # one device is enough for a summary
    return preloaded.run(
        [sys.executable, "-m", "attnx.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_all_experiments_exist():
    assert BUNDLED | PAPER <= set(EXPERIMENTS)


def _variants():
    for name in EXPERIMENTS:
        yield name, None
        yield name, "tiny"
    for arg in ("luong", "luong_local", "luong,tiny", "luong_local,tiny", "adadelta"):
        yield "dates_rnn.py", arg
    for arg in ("hard", "hard,scratch", "hard,tiny"):
        yield "digits_spatial.py", arg


@pytest.mark.parametrize(("name", "arg"), list(_variants()))
def test_config_validates_and_builds_its_model(name, arg):
    module = load(name)
    config = module.get_config(arg)
    validate(config)
    for key in REQUIRED:
        section, field = key.split(".")
        assert field in config[section], f"{name}:{arg} lacks {key}"
    doc = module.__doc__
    assert f"--config=experiments/{name}" in doc, "the docstring holds the exact command"
    assert "Expected" in doc
    if name in PAPER:
        assert "paper:" in doc, "paper settings state the paper's number"
    built = model_config(config)
    assert dataclasses.is_dataclass(built)
    if arg is not None and "tiny" in arg:
        # A CPU smoke run: a few steps of a small model.
        assert config.train.steps <= 50
        assert config.train.batch_size <= 16
        width = getattr(built, "d_model", None) or built.embed_dim
        assert width <= 32


def test_tiny_is_smaller_than_full():
    for name in EXPERIMENTS:
        module = load(name)
        full, tiny = module.get_config(), module.get_config("tiny")
        assert tiny.train.steps < full.train.steps, name
        assert tiny.eval.max_examples < full.eval.max_examples, name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_unknown_arg_is_named(name):
    with pytest.raises(ValueError, match="bogus"):
        load(name).get_config("bogus")


def test_dates_rnn_variants():
    module = load("dates_rnn.py")
    bahdanau = model_config(module.get_config())
    assert (bahdanau.variant, bahdanau.mechanism.score, bahdanau.cell) == (
        "bahdanau",
        "additive",
        "gru",
    )
    default, paper = module.get_config().train, module.get_config("adadelta").train
    assert (default.optimizer, default.schedule, default.steps) == ("adam", "cosine", 1500)
    assert (paper.optimizer, paper.rho, paper.clip_grad_norm, paper.steps) == (
        "adadelta",
        0.95,
        1.0,
        3000,
    )
    assert paper.label_smoothing == 0.0
    assert model_config(module.get_config("adadelta")) == bahdanau
    luong = model_config(module.get_config("luong"))
    assert (luong.variant, luong.mechanism.score, luong.input_feeding) == ("luong", "general", True)
    assert luong.mechanism.local == "none"
    local = model_config(module.get_config("luong_local,tiny"))
    assert (local.variant, local.mechanism.local, local.mechanism.window) == ("luong", "local_p", 2)
    # Only the attention changes between variants.
    for key in ("cell", "hidden_dim", "embed_dim", "bidirectional"):
        assert getattr(luong, key) == getattr(bahdanau, key)
    with pytest.raises(ValueError, match="'lstm'"):
        module.get_config("luong,lstm")


def test_transformer_paper_numbers():
    base_config = load("wmt14_transformer_base.py").get_config()
    big_config = load("wmt14_transformer_big.py").get_config()
    base, big = model_config(base_config), model_config(big_config)
    # Table 3 rows "base" and "big".
    assert (base.d_model, base.d_ff, base.num_heads, base.num_encoder_layers) == (512, 2048, 8, 6)
    assert (big.d_model, big.d_ff, big.num_heads, big.num_decoder_layers) == (1024, 4096, 16, 6)
    assert (base.dropout_rate, big.dropout_rate) == (0.1, 0.3)
    assert base.src_vocab_size == big.src_vocab_size == 37000
    for config, steps, averaged in ((base_config, 100_000, 5), (big_config, 300_000, 20)):
        assert config.task.dataset == "wmt14_translate/de-en"
        assert (config.task.tokenizer, config.task.vocab_size) == ("sentencepiece", 37000)
        # About 25,000 source and target tokens a step (sec. 5.1).
        tokens = config.train.batch_size * config.task.max_source_length
        assert config.task.packing and 24_000 <= tokens <= 26_000
        assert config.train.steps == steps
        assert config.checkpoint.average_last == averaged <= config.checkpoint.keep
        assert config.train.label_smoothing == 0.1
        assert (config.eval.beam_size, config.eval.alpha) == (4, 0.6)
        assert config.eval.length_penalty == "gnmt"
        for key, value in RECIPES["transformer"].items():
            assert config.train[key] == value, key
        assert (config.train.b2, config.train.warmup_steps) == (0.98, 4000)


def test_convs2s_paper_numbers():
    config = load("wmt14_convs2s.py").get_config()
    built = model_config(config)
    assert len(built.encoder_layers) == len(built.decoder_layers) == 15
    assert built.encoder_layers[0] == (512, 3) and built.encoder_layers[-1] == (2048, 1)
    assert (built.embed_dim, built.dropout_rate, built.src_vocab_size) == (512, 0.2, 40000)
    train = config.train
    assert (train.optimizer, train.momentum, train.learning_rate) == ("nesterov", 0.99, 0.25)
    assert (train.clip_grad_norm, train.schedule, train.plateau_factor) == (0.1, "plateau", 0.1)
    assert train.plateau_metric == "eval/perplexity" and config.task.eval_split == "validation"
    assert train.batch_size == 64
    assert (config.eval.beam_size, config.eval.alpha) == (5, 1.0)
    assert config.eval.length_penalty == "power"


def test_numbers_convs2s_uses_the_papers_optimizer_with_a_cosine_schedule():
    config = load("numbers_convs2s.py").get_config()
    assert config.task.dataset == "number_words/en_de"
    # The paper's Nesterov recipe; a cosine replaces its plateau cuts (see the docstring).
    assert config.train.optimizer == "nesterov"
    assert (config.train.momentum, config.train.learning_rate) == (0.99, 0.25)
    assert config.train.clip_grad_norm == 0.1
    assert config.train.schedule == "cosine" and config.train.steps > config.train.warmup_steps
    # Positions must cover the longest sequences.
    assert model_config(config).max_length >= config.task.max_source_length


@pytest.mark.parametrize("name", ["dates_transformer.py", "numbers_transformer.py"])
def test_bundled_transformers_use_rotary_positions_without_dropout(name):
    for arg in (None, "tiny"):  # the smoke run takes the same path as the full one
        config = load(name).get_config(arg)
        assert config.model.attention.positions == "rotary", (name, arg)
        assert config.model.dropout_rate == 0.0, (name, arg)
        assert config.train.schedule == "cosine", (name, arg)


def test_numbers_transformer_translates_into_french_in_packed_rows():
    config = load("numbers_transformer.py").get_config()
    assert config.task.dataset == "number_words/en_fr"
    assert config.task.packing
    # The longest numbers of either language (73 characters) fit unclipped.
    assert min(config.task.max_source_length, config.task.max_target_length) >= 73


def test_rnnsearch_paper_numbers():
    config = load("wmt14_rnnsearch.py").get_config()
    built = model_config(config)
    assert (built.cell, built.hidden_dim, built.embed_dim) == ("gru", 1000, 620)
    assert (built.attention_dim, built.maxout_units) == (1000, 500)
    assert built.src_vocab_size == built.tgt_vocab_size == 30000
    assert config.task.dataset == "wmt14_translate/fr-en"
    assert (config.task.source_key, config.task.target_key) == ("en", "fr")
    assert (config.train.optimizer, config.train.eps, config.train.rho) == ("adadelta", 1e-6, 0.95)
    assert (config.train.batch_size, config.eval.beam_size) == (80, 12)


def test_luong_paper_numbers():
    config = load("wmt14_luong.py").get_config()
    built = model_config(config)
    # Sec. 4.1: 4 stacked LSTM layers of 1000 cells, embeddings 1000, dropout 0.2, the
    # source reversed; local-p attention with the general score, D = 10, input feeding.
    assert (built.cell, built.encoder_layers, built.decoder_layers) == ("lstm", 4, 4)
    assert (built.hidden_dim, built.embed_dim, built.dropout_rate) == (1000, 1000, 0.2)
    assert built.reverse_source and built.input_feeding and not built.bidirectional
    assert (built.variant, built.mechanism.score) == ("luong", "general")
    assert (built.mechanism.local, built.mechanism.window) == ("local_p", 10)
    assert built.src_vocab_size == built.tgt_vocab_size == 50000
    train = config.train
    assert (train.optimizer, train.momentum, train.learning_rate) == ("sgd", 0.0, 1.0)
    assert (train.clip_grad_norm, train.batch_size, train.plateau_factor) == (5.0, 128, 0.5)
    assert config.task.dataset == "wmt14_translate/de-en"


def test_tokenized_bleu_where_the_paper_used_compound_splitting():
    for name in EXPERIMENTS:
        expected = name.startswith("wmt14_transformer")  # Vaswani et al.'s En-De scores
        assert bool(load(name).get_config().eval.tokenized_bleu) == expected, name


def test_captioner_settings():
    digits = load("digits_spatial.py").get_config()
    assert (digits.task.dataset, digits.task.tokenizer) == ("digit_captions", "char")
    assert digits.model.preset == "digits_small"
    # Measured on this task (the experiment's docstring): coordinates in, no penalty.
    assert digits.train.attention_penalty == 0.0 and digits.model.coord_channels
    coco = load("coco_spatial.py").get_config()
    built = model_config(coco)
    assert coco.task.dataset == "coco_captions/2014"
    assert tuple(coco.task.image_size) == (224, 224)
    assert (built.encoder, built.image_channels, built.hidden_dim) == ("conv", 3, 1800)
    assert built.vocab_size == coco.task.vocab_size == 10000
    assert (coco.train.optimizer, coco.train.attention_penalty) == ("adam", 1.0)
    # Training draws one of the five-odd captions per image and epoch.
    assert make_task(coco).caption_choice == "random"


def test_bad_task_keys_are_named():
    coco = load("coco_spatial.py").get_config("tiny")
    coco.task.caption_choice = "sometimes"
    with pytest.raises(ValueError, match="config.task: .*caption_choice"):
        validate(coco)
    dates = load("dates_transformer.py").get_config("tiny")
    dates.task.caption_key = "caption"
    with pytest.raises(ValueError, match="config.task: Dataset 'dates' is text to text"):
        validate(dates)


# --------------------------------------------------------------------------- config errors


def test_mesh_that_does_not_fit_the_devices():
    import jax

    config = load("dates_transformer.py").get_config("tiny")
    config.mesh.data = 3
    assert jax.device_count() % 3  # 1 or 8 devices
    with pytest.raises(ValueError, match=r"config\.mesh.*devices"):
        validate(config)


def test_model_that_does_not_fit_its_vocabulary():
    config = load("dates_transformer.py").get_config("tiny")
    config.model.src_vocab_size = 20
    config.model.tgt_vocab_size = 20
    with pytest.raises(ValueError, match=r"config\.model\.src_vocab_size=20 is smaller .* 57"):
        make_model_config(config.model.to_dict(), source_vocab_size=57, target_vocab_size=57)


def test_unknown_model_field_is_named():
    config = load("numbers_transformer.py").get_config("tiny")
    config.model.d_modle = 8
    with pytest.raises(ValueError, match=r"config\.model\.d_modle"):
        make_model_config(config.model.to_dict(), source_vocab_size=40, target_vocab_size=40)


def test_summary_prints_the_parameter_table_without_data(tmp_path):
    result = run_main(
        "--config=experiments/numbers_convs2s.py:tiny",
        f"--workdir={tmp_path}",
        "--mode=summary",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["parameter", "shape", "size"]
    rows = [line.split() for line in lines[1:-1]]
    total = int(lines[-1].split()[1].replace(",", ""))
    assert lines[-1].startswith("total:")
    assert total == sum(int(row[-1].replace(",", "")) for row in rows) > 0
    assert not any(tmp_path.iterdir()), "summary wrote into the workdir"


def test_hard_attention_variant_and_its_settings_are_checked():
    hard = load("digits_spatial.py").get_config("hard,tiny")
    assert hard.model.attention.kind == "hard" and hard.train.attention_penalty == 0.0
    assert (hard.train.reward_weight, hard.train.entropy_weight) == (0.1, 0.002)
    assert hard.train.baseline_decay == 0.9
    validate(hard)
    for key, value, message in (
        ("reward_weight", -1.0, "config.train.reward_weight must be >= 0"),
        ("entropy_weight", -0.1, "config.train.entropy_weight must be >= 0"),
        ("baseline_decay", 1.0, r"config.train.baseline_decay must be in \[0, 1\)"),
    ):
        bad = load("digits_spatial.py").get_config("hard,tiny")
        bad.train[key] = value
        with pytest.raises(ValueError, match=message):
            validate(bad)


def test_hard_attention_fine_tunes_the_soft_run_unless_from_scratch():
    digits = load("digits_spatial.py")
    soft, hard, scratch = (digits.get_config(a) for a in (None, "hard", "hard,scratch"))
    # The soft run's model exactly (its parameters load), and a source to name.
    assert hard.model.coord_channels == soft.model.coord_channels is True
    assert hard.train.warm_start_dir is None  # Required: see tests/training/test_warm_start.py.
    assert (scratch.model.coord_channels, scratch.train.warm_start_dir) == (False, "")
    assert digits.get_config("hard,tiny").train.warm_start_dir == ""  # Smoke runs from scratch.
    with pytest.raises(ValueError, match="option 'scratch' is for hard attention"):
        digits.get_config("scratch")
