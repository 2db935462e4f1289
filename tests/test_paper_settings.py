"""The paper settings' model sizes against the papers, and `--mode=summary` on every experiment.

Parameters are counted from abstract shapes (`run.model_summary`, as
`--mode=summary` does: `nnx.eval_shape`, nothing compiled or allocated), with
the vocabulary each experiment sets (`config.task.vocab_size`, the paper's
where it used one) or, for the character tasks, the placeholder summary uses.
"""

import importlib.util
import math
import pathlib
import sys

import preloaded
import pytest
from command_env import cpu_env

from attnx.training.run import model_summary, vocab_without_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))
# Vaswani et al. (2017), Table 3, "params x 10^6": base 65, big 213, both with a
# shared source-target vocabulary of about 37,000 BPE tokens. The papers of the
# other settings (Gehring et al. 2017 on WMT'14 En-De, Bahdanau et al. 2014,
# Luong et al. 2015, Xu et al. 2015) give no parameter count.
PAPER_PARAMETERS = {
    "wmt14_transformer_base.py": 65e6,
    "wmt14_transformer_big.py": 213e6,
}
# Counts differ by what a paper rounds and by details such as biases and layer
# norms; attnx's base model has 63.1M (-2.9%), the big one 214.2M (+0.6%).
TOLERANCE = 0.04


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"paper_{name[:-3]}", ROOT / "experiments" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parameter_count(config) -> int:
    vocab, _ = vocab_without_data(config, None)
    return sum(size for _, _, size in model_summary(config, vocab))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_transformer_sizes_match_the_paper(name):
    config = load_config(name)
    assert config.task.vocab_size == 37000, "the paper's vocabulary"
    count = parameter_count(config)
    assert abs(count / PAPER_PARAMETERS[name] - 1) < TOLERANCE, f"{name}: {count:,}"


def test_the_big_model_is_the_base_model_scaled_up():
    # An independent check of the counts: the embedding table is d_model x vocab,
    # shared by the encoder, decoder and softmax (Vaswani et al. sec. 3.4), so a
    # vocabulary one token larger adds exactly d_model parameters.
    for name, d_model in (("wmt14_transformer_base.py", 512), ("wmt14_transformer_big.py", 1024)):
        config = load_config(name)
        count = parameter_count(config)
        config.task.vocab_size += 1
        assert parameter_count(config) - count == d_model, name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_a_parameter_table_without_data(name):
    rows = model_summary(load_config(name), vocab_without_data(load_config(name), None)[0])
    assert rows and all(size == math.prod(shape) > 0 for _, shape, size in rows)


def test_summary_of_a_paper_setting_on_the_command_line(tmp_path):
    env = cpu_env()
    result = preloaded.run(
        [
            sys.executable,
            "-m",
            "attnx.main",
            "--config=experiments/wmt14_luong.py",
            "--mode=summary",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.splitlines()[-1]
    # 4 + 4 LSTM layers of 1000 cells, embeddings and softmax over 50,000 pieces.
    assert last.startswith("total: ") and "vocabulary 50000" in last
    total = int(last.split()[1].replace(",", ""))
    lstm = 8 * 4 * (1000 * 1000 + 1000 * 1000 + 1000)  # input, recurrent kernels and bias
    assert total > lstm + 3 * 50000 * 1000
