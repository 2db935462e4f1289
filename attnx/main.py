r"""The attnx entry point.

  python -m attnx.main --config=experiments/NAME.py[:ARG] --workdir=DIR \
      [--config.any.key=value ...] [--mode=train|eval|decode|visualize|interpret|summary|compile]
      [-v 1]

(also installed as the console script `attnx`). `train` trains and evaluates,
resuming from DIR's newest whole checkpoint; `eval`, `decode` and `visualize`
read the trained run and write only under DIR/<mode>/ (`read_modes.py`);
`summary` prints the parameter table without touching data; `compile`
compiles the steps for the TPU topology `config.compile.topology` on this
machine and prints their memory and roofline bound, one JSON line each
(`compile_mode.py`; needs libtpu, no TPU, no data; like `summary` it reads
--workdir only for its vocabulary and writes nothing). Paths are
resolved once, against the directory the command starts in. A mistake on the
command line, in the workdir or with a checkpoint save ends the run with one
line, `FATAL ...`, naming it. Logs hold attnx's own lines and the warnings of
the libraries under it; `--verbosity=1` (`-v 1`) shows everything.

Multi-host: pass --distributed (or set ATTNX_DISTRIBUTED=1) to call
`jax.distributed.initialize()` first; on TPU VMs and SLURM it finds the
coordinator itself, elsewhere give --coordinator_address, --num_processes and
--process_id.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from attnx import cli, host_memory

FLAGS = flags.FLAGS
MODES = ("train", "eval", "decode", "visualize", "interpret", "summary", "compile")
config_flags.DEFINE_config_file("config", None, "Experiment file: experiments/NAME.py[:ARG].")
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and plots go (any path; resolved).")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host); or ATTNX_DISTRIBUTED=1."
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, where the cluster does not tell JAX."
)
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")


def _summary(config, workdir: str | None) -> None:
    from attnx.training.run import model_summary, vocab_without_data

    vocab, source = vocab_without_data(config, workdir)
    rows = model_summary(config, vocab)
    width = max(len(path) for path, _, _ in rows)
    print(f"{'parameter':<{width}}  {'shape':<22} {'size':>12}")
    for path, shape, size in rows:
        print(f"{path:<{width}}  {str(shape):<22} {size:>12,}")
    print(f"total: {sum(size for _, _, size in rows):,} parameters (vocabulary {vocab}: {source})")


def main(argv: list[str]) -> None:
    del argv  # cli.parse_flags refused anything but flags.
    from attnx.training import workdir as workdir_lib
    from attnx.training.config import validate

    mode = FLAGS.mode
    config = FLAGS.config
    if FLAGS.distributed or os.environ.get("ATTNX_DISTRIBUTED") == "1":
        import jax

        # CPU devices of different processes exchange collectives through gloo
        # (only the CPU client reads this; it must be set before the backend starts,
        # which validate's device count does).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    device_count = None
    if mode == "compile":
        from attnx.training import compile_mode

        # The mesh is checked against the topology's devices, not this machine's.
        device_count = len(compile_mode.topology_devices(config.compile.topology))
    try:
        validate(config, device_count)
        workdir_lib.resolve_config_paths(config)
    except ValueError as error:
        # A config error is the user's to fix, not a crash: one line, no traceback.
        cli.fatal(f"Config error: {error}")
    if mode in ("summary", "compile"):
        workdir = FLAGS.workdir and workdir_lib.resolve(FLAGS.workdir, what="--workdir")
        if mode == "summary":
            _summary(config, workdir)
        else:
            compile_mode.compile_run(config, workdir)
        return
    if FLAGS.workdir is None:
        cli.fatal(f"--workdir is required for --mode={mode}")
    # Every check on the workdir comes before any data is read or anything compiles.
    # Decoding the user's own inputs prints them and writes nothing into the workdir.
    prints_only = mode == "decode" and config.get("decode", {}).get("input") is not None
    workdir = workdir_lib.prepare_workdir(FLAGS.workdir, mode, writes=not prints_only)
    logging.debug("Config:\n%s", config)
    if mode == "train":
        from attnx.training.train import train_and_evaluate

        results = train_and_evaluate(config, workdir)
    else:
        from attnx.training.read_modes import read_run

        results = read_run(config, workdir, mode)
    final = {k: v for k, v in sorted(results.items()) if k.startswith("eval")}
    if final:
        logging.info("Done: %s", ", ".join(f"{k} {v:.4g}" for k, v in final.items()))


def run() -> None:
    """Console-script entry point (`attnx`)."""
    # Before JAX starts its threads: a step's temporaries are reused, not re-faulted.
    host_memory.keep_freed_memory()
    cli.run(main)


if __name__ == "__main__":
    run()
