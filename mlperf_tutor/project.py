"""Where the project lives: the one setting the book and the packaging derive from.

The book's launch and repository buttons (``_config.yml``), the notebooks' install cell, the
README's install lines and ``pyproject.toml``'s URLs are all written from :data:`REPOSITORY`,
:data:`BRANCH` and :data:`DISTRIBUTION`; ``tests/test_project.py`` checks that they agree.
Change the location here, then run ``make twins`` (it rewrites the install cells).
"""

from __future__ import annotations

REPOSITORY = "https://github.com/mlperf-tutor/mlperf_tutor"
BRANCH = "main"
# The distribution name on a package index. The project is not published on one yet, so the
# install cell and the README install from the repository (``pip install "NAME @ git+URL"``).
DISTRIBUTION = "mlperf-tutor"
PUBLISHED = False

# What the book's install cell installs on each runtime. A TPU runtime has no TensorFlow (and
# TensorFlow's wheel would drag in its own jax pins), so it gets the others only.
EXTRAS_GPU = ("torch", "jax", "tf", "hf", "data", "book")
EXTRAS_TPU = ("torch", "jax", "hf", "data", "book")


def source() -> str:
    """What pip installs the package from: the index name once published, else the repository."""
    return DISTRIBUTION if PUBLISHED else f"git+{REPOSITORY}@{BRANCH}"


def requirement(extras: tuple[str, ...] = ("all",)) -> str:
    """A pip requirement for the package with ``extras``, e.g. ``mlperf-tutor[jax] @ git+...``."""
    named = f"{DISTRIBUTION}[{','.join(extras)}]"
    return named if PUBLISHED else f"{named} @ {source()}"


def colab_url(path: str) -> str:
    """The Colab address that opens the notebook at ``path`` (relative to the repository root)."""
    owner_repo = REPOSITORY.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{BRANCH}/{path}"
