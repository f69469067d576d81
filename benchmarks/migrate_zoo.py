"""Which zoo models migrate: ``verify`` for 10 steps on every model of tests/zoo/, one table.

Each model trains with its own recipe (optimizer, scheduler, label smoothing, clipping,
accumulation, autocast; see tests/zoo/). The table gives pass / fail / refused and, for the rest,
the exception's type and the first line of its message. ``refused`` means the recipe needs a
``verify`` option that does not exist (the step would differ from the recipe's, so it is not
run); for those, the ``torch_to_jax`` column says whether the migration itself (no step) gets
through, and if not, why.

    python benchmarks/migrate_zoo.py                 # every model
    python benchmarks/migrate_zoo.py --only gpt2 vit  # some
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="zoo names (default: all)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a shared CPU runs faster)"
    )
    parser.add_argument("--width", type=int, default=140, help="message column width")
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
