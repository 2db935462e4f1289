"""Runs `attnx.main` with a fault injected, for the fault-injection tests.

  python tests/training/fault_runner.py FAULT STEP MARKER -- --config=... --workdir=...

FAULT says where the save of checkpoint step STEP stops: the process touches
MARKER and then hangs there, until the test SIGKILLs it.

  in_flight     while the asynchronous save is being written: in the
                background thread, as the `state` item is committed inside
                the step's temporary directory (training goes on meanwhile);
  before_commit after the step's temporary directory is complete, with its
                checksums, and before Orbax commits it (marker and rename).

attnx itself has no hooks for this: the patches below replace Orbax's and
attnx's own functions in this process only.
"""

import os
import sys
import time

from orbax.checkpoint.path import atomicity

from attnx.training import checkpoint_integrity


def _hang(marker: str) -> None:
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(60)


def main() -> None:
    fault, step, marker = sys.argv[1:4]
    assert sys.argv[4] == "--", sys.argv
    sys.argv = [sys.argv[0], *sys.argv[5:]]
    tmp_step = f"{step}.orbax-checkpoint-tmp"

    if fault == "in_flight":
        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self.get_final().name == "state" and self.get_final().parent.name == tmp_step:
                _hang(marker)
            await original(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif fault == "before_commit":
        original_manifest = checkpoint_integrity.write_manifest

        def write_manifest(step_dir: str) -> None:
            original_manifest(step_dir)
            if os.path.basename(step_dir) == tmp_step:
                _hang(marker)

        checkpoint_integrity.write_manifest = write_manifest
    else:
        raise SystemExit(f"unknown fault {fault!r}")

    from attnx import main as attnx_main

    attnx_main.run()


if __name__ == "__main__":
    main()
