"""Build the book as `jupyter-book build --warningiserror --nitpick --keep-going .` does, with
Sphinx's parallel reading on: the chapters execute in several processes at once.

Executing the chapters is almost all of a build's time, and one chapter's kernel keeps about one
core busy, so on the two-core CI machine a serial build leaves a core idle. `jupyter-book build`
has no option for Sphinx's ``-j``; its own ``build_sphinx`` takes ``jobs``, and this script calls
it with the configuration the CLI would make for a book (``_config.yml``, ``_toc.yml``).

Usage: python tools/build_book.py [--jobs N] [--strict]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that read (execute) chapters at once (default: the CPU count)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="warnings are errors, nitpicky references"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    import click
    from jupyter_book.cli.main import builder_specific_actions
    from jupyter_book.sphinx import build_sphinx

    output = ROOT / "_build" / "html"
    overrides = {
        "external_toc_path": (ROOT / "_toc.yml").as_posix(),
        "latex_individualpages": False,
    }
    if args.strict:
        overrides["nitpicky"] = True
    result = build_sphinx(
        ROOT,
        output,
        use_external_toc=True,
        noconfig=True,
        path_config=ROOT / "_config.yml",
        confoverrides=overrides,
        builder="html",
        warningiserror=args.strict,
        keep_going=True,
        jobs=args.jobs,
    )
    builder_specific_actions(result, "html", output, "book", None, click.echo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
