"""Which zoo models migrate: ``verify`` for 10 steps on every model of tests/zoo/, one table.

Each model trains with its own recipe (optimizer, scheduler, label smoothing, clipping,
accumulation, autocast; see tests/zoo/). The table gives pass / fail / refused and, for the rest,
the exception's type and the first line of its message. ``refused`` means the recipe needs a
``verify`` option that does not exist (the step would differ from the recipe's, so it is not
run); for those, the ``torch_to_jax`` column says whether the migration itself (no step) gets
through, and if not, why.

    python benchmarks/migrate_zoo.py                 # every model
    python benchmarks/migrate_zoo.py --only gpt2 vit  # some
    python benchmarks/migrate_zoo.py --time --only gpt2 resnet lstm-lm

``--time`` times, instead, one training step of the recipe (dropout and the rest as the recipe
has them) in torch eager and migrated (``torch_to_jax``'s jitted step), ms per step after
warm-up. These models have no hand-written Flax twin (transformers dropped Flax in v5); the
package's workloads do, and ``migrate_step.py`` times those three ways.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_steps(entry, steps: int, warmup: int) -> tuple[float, float]:
    """(torch eager, migrated) seconds per recipe step of one zoo entry."""
    import jax
    import zoo
    from timing import timed

    from mlperf_tutor.migrate import torch_to_jax

    batches = entry.batches(1)
    model, optimizer, scheduler = entry.build()
    migrated = torch_to_jax(
        model, optimizer, entry.loss_fn, batches[0], scheduler, **entry.step_options()
    )
    micro = entry.micro_batches(0)
    torch_s = timed(
        lambda: zoo.torch_step(entry, model, optimizer, scheduler, micro), steps, warmup, lambda: 0
    )
    state = [migrated.params, migrated.state, None]

    def jax_step():
        state[0], state[1], state[2] = migrated.step(state[0], state[1], batches[0])

    jax_s = timed(jax_step, steps, warmup, lambda: jax.block_until_ready(state[2]))
    return torch_s, jax_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="zoo names (default: all)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a shared CPU runs faster)"
    )
    parser.add_argument("--width", type=int, default=140, help="message column width")
    parser.add_argument("--time", action="store_true", help="time torch eager vs migrated")
    parser.add_argument("--warmup", type=int, default=3, help="--time: untimed steps first")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import torch
    import zoo

    torch.set_num_threads(args.threads)
    entries = zoo.zoo()
    names = args.only or list(entries)
    unknown = sorted(set(names) - set(entries))
    if unknown:
        parser.error(f"no zoo model {unknown}; choose from {sorted(entries)}")

    if args.time:
        print("| model | torch eager ms/step | migrated ms/step | torch / migrated |")
        print("|---|---|---|---|")
        for name in names:
            torch_s, jax_s = time_steps(entries[name], args.steps, args.warmup)
            print(f"| {name} | {1e3 * torch_s:.2f} | {1e3 * jax_s:.2f} | {torch_s / jax_s:.2f} |")
        return

    rows = []
    for name in names:
        entry = entries[name]
        start = time.perf_counter()
        result = zoo.run(entry, steps=args.steps)
        probe = zoo.probe_migration(entry) if result.status == "refused" else None
        seconds = time.perf_counter() - start
        rows.append((result, probe, seconds))
        print(f"{name}: {result.status} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    print("\n| model | result | error | message | torch_to_jax alone | s |")
    print("|---|---|---|---|---|---|")
    for result, probe, seconds in rows:
        if probe is None:
            alone = ""
        elif probe == ("", ""):
            alone = "migrates"
        else:
            alone = f"{probe[0]}: {probe[1]}"[: args.width]
        message = result.message[: args.width].replace("|", "/")
        print(
            f"| {result.name} | {result.status} | {result.error} | {message} | "
            f"{alone.replace('|', '/')} | {seconds:.1f} |"
        )
    passed = sum(r.status == "pass" for r, _, _ in rows)
    print(f"\n{passed} of {len(rows)} pass verify for {args.steps} steps with their recipes.")


if __name__ == "__main__":
    main()
