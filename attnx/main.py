r"""The attnx entry point.

  python -m attnx.main --config=experiments/NAME.py[:ARG] --workdir=DIR \
      [--config.any.key=value ...] [--mode=train|eval|decode|visualize|summary]

(also installed as the console script `attnx`). `train` trains and evaluates,
resuming from DIR's newest checkpoint; `summary` prints the parameter table
without touching data. Multi-host: pass --distributed (or set
ATTNX_DISTRIBUTED=1) to call `jax.distributed.initialize()` first; on TPU VMs
and SLURM it finds the coordinator itself, elsewhere give --coordinator_address,
--num_processes and --process_id.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment file: experiments/NAME.py[:ARG].")
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and plots go.")
flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "decode", "visualize", "summary"], "What to do."
)
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host); or ATTNX_DISTRIBUTED=1."
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, where the cluster does not tell JAX."
)
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown --config.* key reported in one line.

    ml_collections raises an unknown key as an AttributeError from deep inside
    flag parsing; a traceback would bury the key it names.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        detail = error
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]  # The KeyError inside the AttributeError.
        message = " ".join(str(detail).split())
        name = re.match(r"'([^']+)'", message)
        offending = [
            arg
            for arg in argv[1:]
            if arg.startswith("--config.") and name and name.group(1) in arg.split("=")[0]
        ]
        where = " ".join(offending) or "a --config.* flag"
        sys.exit(f"FATAL Flags parsing error: {where}: no such config key {message}")


def _summary(config) -> None:
    from attnx.training.train import model_summary

    vocab = config.task.get("vocab_size") or 256
    rows = model_summary(config, vocab)
    width = max(len(path) for path, _, _ in rows)
    print(f"{'parameter':<{width}}  {'shape':<22} {'size':>12}")
    for path, shape, size in rows:
        print(f"{path:<{width}}  {str(shape):<22} {size:>12,}")
    print(f"total: {sum(size for _, _, size in rows):,} parameters (vocabulary {vocab})")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed or os.environ.get("ATTNX_DISTRIBUTED") == "1":
        import jax

        # CPU devices of different processes exchange collectives through gloo
        # (only the CPU client reads this; it must be set before the backend starts).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )

    from attnx.training.config import validate

    config = FLAGS.config
    try:
        validate(config)
    except ValueError as error:
        # A config error is the user's to fix, not a crash: one line, no traceback.
        sys.exit(f"FATAL Config error: {error}")
    if FLAGS.mode == "summary":
        _summary(config)
        return
    if not FLAGS.workdir:
        raise app.UsageError(f"--workdir is required for --mode={FLAGS.mode}")
    if "://" in FLAGS.workdir:
        # os.makedirs('gs://b/run') would quietly make a local 'gs:' directory.
        sys.exit(
            f"FATAL --workdir={FLAGS.workdir}: attnx writes its workdir with ordinary file "
            "I/O; mount the bucket (gcsfuse, BUILD.md) and pass the mounted path"
        )
    from attnx.training.train import train_and_evaluate

    logging.info("Config:\n%s", config)
    results = train_and_evaluate(config, FLAGS.workdir, mode=FLAGS.mode)
    logging.info("Final metrics: %s", results)


def run() -> None:
    """Console-script entry point (`attnx`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
