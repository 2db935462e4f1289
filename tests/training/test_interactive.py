"""`--mode=decode --config.decode.input=FILE|-`: your own inputs to a trained run, from the shell.

The tiny dates experiment is trained once for the test run, in a subprocess on
a 2-device mesh with its parameters sharded (fsdp=2, conftest's
`dates_tiny_run`); every decode runs as a user would run it (`python -m
attnx.main`, one CPU device) or in this process through `attnx.load` (onto one
of its 8 devices). The tiny model's hypotheses
are wrong; what is checked is the output's structure, the handling of awkward
inputs, and that both routes give the same hypotheses and scores.
"""

import os
import pathlib
import pty
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import preloaded
import pytest
from command_env import cpu_env

import attnx
from attnx.interpret import alignment_output

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENT = f"--config={ROOT}/experiments/dates_transformer.py:tiny"
DATES = ["3 March 1974", "Sonntag, 3. März 1974", "1974-03-03", "12/31/99"]


def attnx_main(*argv: str, stdin: str | None = None, ok: bool = True, devices: int = 1):
    result = preloaded.run(
        [sys.executable, "-m", "attnx.main", *argv],
        cwd=ROOT,
        env=cpu_env(devices),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def decode(workdir, *overrides: str, stdin: str | None = None, ok: bool = True):
    return attnx_main(
        EXPERIMENT, f"--workdir={workdir}", "--mode=decode", *overrides, stdin=stdin, ok=ok
    )


def parse(stdout: str) -> dict[int, dict[str, list]]:
    """{i: {'S': [source], 'H': [(score, text), ...], 'A': [pairs, ...]}} of the output."""
    out: dict[int, dict[str, list]] = {}
    for line in stdout.splitlines():
        tag, _, rest = line.partition("\t")
        kind, _, index = tag.partition("-")
        entry = out.setdefault(int(index), {"S": [], "H": [], "A": []})
        if kind == "H":
            score, _, text = rest.partition("\t")
            entry["H"].append((float(score) if score else None, text))
        else:
            entry[kind].append(rest)
    return out


@pytest.fixture(scope="module")
def trained(dates_tiny_run) -> pathlib.Path:
    return dates_tiny_run  # Decoding one's own inputs writes nothing into it.


@pytest.fixture(scope="module")
def loaded(trained):
    return attnx.load(trained)


def test_standard_input_gives_one_hypothesis_per_line_as_the_api_does(trained, loaded):
    result = decode(trained, "--config.decode.input=-", stdin="".join(d + "\n" for d in DATES))
    out = parse(result.stdout)
    assert sorted(out) == list(range(len(DATES)))
    api = loaded.translate(DATES)
    for i, date in enumerate(DATES):
        assert out[i]["S"] == [date]
        assert len(out[i]["H"]) == 1 and out[i]["A"] == []
        score, text = out[i]["H"][0]
        [best] = api[i].hypotheses
        assert text == best.text
        assert score == pytest.approx(best.score, abs=1e-5)
    assert "FATAL" not in result.stderr


def test_one_line_from_echo(trained):
    result = decode(
        trained, "--config.decode.input=-", "--config.eval.alpha=1.5", stdin="3 March 1974\n"
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "S-0\t3 March 1974"
    assert [line.split("\t")[0] for line in lines] == ["S-0", "H-0"]
    assert len(lines[1].split("\t")) == 3
    # The run's own config decides; a command-line value that it overrules is named.
    assert "eval.alpha: 1.5 (command line) vs 0.6 (run)" in result.stderr


def test_awkward_lines_of_a_file_with_nbest_and_alignments(trained, loaded, tmp_path):
    long_line = "3 March 1974 " * 10  # 130 characters; max_source_length is 40
    lines = ["3 March 1974", "", "Zürich ☃ 1974", long_line]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    result = decode(
        trained,
        f"--config.decode.input={inputs}",
        "--config.decode.nbest=3",
        "--config.decode.beam_size=3",
        "--config.decode.print_alignment=hard",
    )
    out = parse(result.stdout)
    assert [out[i]["S"] for i in range(4)] == [[line] for line in lines]
    # The empty line: one empty hypothesis, no score, no alignment.
    assert out[1]["H"] == [(None, "")] and out[1]["A"] == []
    api = loaded.translate(lines, nbest=3, beam_size=3, alignment="hard")
    for i in (0, 2, 3):
        assert len(out[i]["H"]) == 3 and len(out[i]["A"]) == 3
        scores = [score for score, _ in out[i]["H"]]
        assert scores == sorted(scores, reverse=True)
        assert [text for _, text in out[i]["H"]] == [h.text for h in api[i].hypotheses]
        np.testing.assert_allclose(scores, [h.score for h in api[i].hypotheses], atol=1e-5)
        for pairs, hypothesis in zip(out[i]["A"], api[i].hypotheses, strict=True):
            printed = [tuple(map(int, pair.split("-"))) for pair in pairs.split()]
            assert printed == hypothesis.alignment
            # Source indices count the tokens without eos, as alignments.pharaoh does.
            assert all(0 <= s < len(api[i].source_tokens) - 1 for s, _ in printed)
    # Warnings on stderr name the line; nothing on stdout but results.
    warnings = [line for line in result.stderr.splitlines() if "inputs.txt" in line]
    assert any(f"line 3 of {inputs}" in w and "'☃' (U+2603)" in w for w in warnings)
    assert any(f"line 4 of {inputs}" in w and "max_source_length=40" in w for w in warnings)
    assert api[3].truncated and len(api[3].source_tokens) == 40
    assert api[2].unknown_characters == ["Z", "☃"]


def test_soft_alignment_lines_are_the_weights_of_the_hard_ones(trained, loaded):
    # One decode per kind: the soft line's argmax per target token is the hard line's link.
    hard = parse(
        decode(
            trained,
            "--config.decode.input=-",
            "--config.decode.print_alignment=hard",
            stdin="".join(d + "\n" for d in DATES),
        ).stdout
    )
    soft = parse(
        decode(
            trained,
            "--config.decode.input=-",
            "--config.decode.print_alignment=soft",
            stdin="".join(d + "\n" for d in DATES),
        ).stdout
    )
    api = loaded.translate(DATES, alignment="soft")
    for i, date in enumerate(DATES):
        [hypothesis] = api[i].hypotheses
        [line] = soft[i]["A"]
        weights = alignment_output.parse_soft(line)
        real_targets = len(hypothesis.tokens) - (1 if hypothesis.finished else 0)
        assert weights.shape == (real_targets, len(date))  # eos row and column left out
        np.testing.assert_allclose(weights, hypothesis.soft_alignment, atol=1e-4)
        full = hypothesis.attention[:real_targets]  # with the eos column
        np.testing.assert_allclose(weights, full[:, : len(date)], atol=1e-4)
        assert np.all(weights.sum(axis=1) <= 1 + 1e-3)
        [pairs] = hard[i]["A"]
        links = [tuple(map(int, p.split("-"))) for p in pairs.split()]
        assert sorted(t for _, t in links) == list(range(real_targets))
        for source, target in links:  # a most attended real source token (ties: 1e-6)
            assert full[target, source] >= full[target, : len(date)].max() - 1e-6


def test_print_alignment_of_another_kind_is_one_fatal_line(trained):
    result = decode(
        trained,
        "--config.decode.input=-",
        "--config.decode.print_alignment=yes",
        stdin="3 March 1974\n",
        ok=False,
    )
    _one_fatal_line(result, "config.decode.print_alignment", "'yes'")


def _one_fatal_line(result, *needles: str) -> None:
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("FATAL "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0]


def test_workdir_without_config_json_is_one_fatal_line(trained, tmp_path):
    old = tmp_path / "old_run"
    shutil.copytree(trained, old, ignore=shutil.ignore_patterns("config.json"))
    result = decode(old, "--config.decode.input=-", stdin="3 March 1974\n", ok=False)
    _one_fatal_line(result, str(old), "config.json")
    assert result.stdout == ""


def test_missing_input_file_is_one_fatal_line(trained, tmp_path):
    missing = tmp_path / "no_such_inputs.txt"
    result = decode(trained, f"--config.decode.input={missing}", ok=False)
    _one_fatal_line(result, f"config.decode.input={missing}", "No such file")


def test_a_terminal_gets_an_answer_per_line(trained):
    """Standard input a terminal: each line is decoded as soon as it is typed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "attnx.main", EXPERIMENT, f"--workdir={trained}", "--mode=decode"]
        + ["--config.decode.input=-"],
        cwd=ROOT,
        env=cpu_env(),
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    os.close(terminal)

    def read_until(prefix: bytes, timeout: float = 600) -> bytes:
        seen = b""
        deadline = time.time() + timeout
        while prefix not in seen:
            assert time.time() < deadline, f"no {prefix!r} in {seen!r}"
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, f"output ended before {prefix!r}: {seen!r}"
                seen += chunk
        return seen

    try:
        os.write(controller, b"3 March 1974\n")
        assert b"S-0\t3 March 1974\n" in read_until(b"H-0\t")
        # The first answer came while the input is still open; the second line follows.
        os.write(controller, b"1 May 2001\n")
        assert b"S-1\t1 May 2001\n" in read_until(b"H-1\t")
        os.write(controller, b"\x04")  # Ctrl-D: end of input.
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
