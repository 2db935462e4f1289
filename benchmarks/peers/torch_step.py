"""Times the PyTorch peers' training step, eager or under `torch.compile`; one JSON line.

One step = zero_grad, forward, loss (`torch_models.LossModule`), backward,
Adam(1e-3) step, on one fixed cpu-small batch (`settings.make_batch`). On the
CPU every op is synchronous, so the wall time around the step is the step.
'compile' compiles the model and its loss with `torch.compile` (inductor,
default mode); the optimizer step stays eager, as in most training scripts.
By default torch.compile gets a fresh, empty inductor cache, so `warmup_s` is a
cold compile like attnx's (`--warm-cache` reuses the on-disk cache).

  python -m benchmarks.peers.torch_step --model transformer --mode eager

The line: model, framework 'torch', mode, params, batch, steps,
step_ms_median, step_ms_min, tokens_per_s (target tokens per second at the
median), warmup_s (compilation and the warm-up steps), peak_rss_mb,
loss_first / loss_last, other_load (cores other processes used while timing).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.peers import machine, settings  # noqa: E402

MODES = ("eager", "compile")


def make_step(model: str, setting: dict, batch: dict, mode: str = "eager", seed: int = 0):
    """Builds the model and returns `(step, params)`; `step()` trains once and returns the loss."""
    import torch

    from benchmarks.peers import torch_models

    if mode not in MODES:
        raise ValueError(f"torch_step: mode must be one of {MODES}, got {mode!r}")
    torch.manual_seed(seed)
    loss_module, inputs = torch_models.build(model, setting, batch)
    loss_module.train()
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=1e-3)
    loss_fn = torch.compile(loss_module) if mode == "compile" else loss_module

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*inputs)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, torch_models.count_params(loss_module)


def time_step(model: str, mode: str, steps: int, warmup: int, seed: int) -> dict:
    """Builds, warms up and times one (model, mode); returns the JSON record."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    setting = settings.SETTINGS[model]
    start = time.perf_counter()
    step, params = make_step(model, setting, settings.make_batch(model, seed), mode, seed)
    losses = [step() for _ in range(warmup)]  # the first call compiles under 'compile'
    warmup_s = time.perf_counter() - start
    times_ms = []
    with machine.LoadWindow() as window:
        for _ in range(steps):
            begin = time.perf_counter()
            losses.append(step())
            times_ms.append((time.perf_counter() - begin) * 1e3)
    median = statistics.median(times_ms)
    return dict(
        model=model,
        framework="torch",
        mode=mode,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        params=params,
        batch=setting["batch"],
        steps=steps,
        step_ms_median=round(median, 2),
        step_ms_min=round(min(times_ms), 2),
        tokens_per_s=round(settings.tokens_per_step(model) / (median / 1e3), 1),
        warmup_s=round(warmup_s, 2),
        peak_rss_mb=machine.peak_rss_mb(),
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        other_load=window.other_load,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=settings.MODELS, required=True)
    parser.add_argument("--mode", choices=MODES, default="eager")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-cache", action="store_true", help="reuse inductor's disk cache")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")
    cache = None
    if args.mode == "compile" and not args.warm_cache:
        # Set before torch is imported: inductor reads it at import.
        cache = tempfile.mkdtemp(prefix="attnx_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        record = time_step(args.model, args.mode, args.steps, args.warmup, args.seed)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
