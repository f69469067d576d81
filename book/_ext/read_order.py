"""Order the chapters so that a parallel build (`make book-strict`, `tools/build_book.py`)
gives its processes equal shares of the execution time.

Sphinx reads (here: executes) documents in parallel in contiguous chunks of its sorted list of
names, one chunk per process at a time. Sorted by name, the six workload chapters, which take
most of the time, fall into one chunk and the build is barely faster than a serial one. Before
the read, this extension deals the chapters into Sphinx's chunks, slowest first, each to the
chunk with the least time so far. The order changes only which process executes a chapter,
never what it executes; a chapter missing from ``SECONDS`` counts as instant.
"""

from __future__ import annotations

from typing import Any

from sphinx.util.parallel import make_chunks

# Seconds to execute each chapter, measured in `make book-strict` with two processes on the
# 2-core CI machine (2026-12-07); only their proportions matter.
SECONDS = {
    "book/migration/torch_to_jax": 108,
    "book/mlperf/results_v4": 19,
    "book/mlperf_in_one_page": 12,
    "book/optimizers": 27,
    "book/scaling": 80,
    "book/workloads/bert": 141,
    "book/workloads/dlrm_dcnv2": 152,
    "book/workloads/gpt3": 343,
    "book/workloads/gptj": 76,
    "book/workloads/llama2_70b_lora": 129,
    "book/workloads/stable_diffusion": 572,
}


def balanced_order(docnames: list[str], nproc: int) -> list[str]:
    """The names reordered so that Sphinx's chunks for ``nproc`` processes hold equal seconds."""
    sizes = [len(chunk) for chunk in make_chunks(list(range(len(docnames))), nproc)]
    chunks: list[list[str]] = [[] for _ in sizes]
    totals = [0.0] * len(sizes)
    for name in sorted(docnames, key=lambda n: (-SECONDS.get(n, 0), n)):
        open_chunks = [i for i, size in enumerate(sizes) if len(chunks[i]) < size]
        i = min(open_chunks, key=lambda j: totals[j])
        chunks[i].append(name)
        totals[i] += SECONDS.get(name, 0)
    return [name for chunk in chunks for name in chunk]


def _reorder(app, env, docnames: list[str]) -> None:
    if app.parallel > 1:
        docnames[:] = balanced_order(docnames, app.parallel)


def _declare_toc_numbering_parallel_safe(app) -> None:
    # sphinx_external_toc always loads sphinx_multitoc_numbering, which replaces the method by
    # which the toctree collector numbers sections. That runs in the main process after the
    # chapters are read and keeps no state per chapter, but the extension declares nothing, and
    # Sphinx then reads and writes serially. Declared here, for what its code does.
    extension = app.extensions.get("sphinx_multitoc_numbering")
    if extension is not None:
        extension.parallel_read_safe = extension.parallel_read_safe is not False
        extension.parallel_write_safe = extension.parallel_write_safe is not False


def setup(app) -> dict[str, Any]:
    app.connect("builder-inited", _declare_toc_numbering_parallel_safe)
    app.connect("env-before-read-docs", _reorder)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
