"""Write the book's install cells and its self-contained ``.ipynb`` twins (``make twins``).

The book's chapters are MyST Markdown notebooks (``book/**/*.md``). Colab opens the ``.ipynb``
twin of each, and Colab does not understand MyST: a ``literalinclude`` would show as raw text and
a ``tab-set`` as colons. So the twin is generated, never edited:

- each ``literalinclude`` becomes the code it includes, as a fenced Python block (the included
  definitions are shown for reading; the chapter's code cells import them from the package, and
  running a class body out of its module would fail on its missing imports);
- each ``tab-item`` of a ``tab-set`` becomes a headed section, one heading level below the
  section the tab set sits in;
- admonitions become block quotes, ``dropdown`` s (an exercise's solution) collapsed
  ``<details>``, ``math`` a ``$$`` block, any other directive its title and text;
- cells tagged ``remove-cell`` (checks only) are dropped; no outputs are stored.

The first code cell of every chapter is the install cell, written here from
``mlperf_tutor/project.py`` into the ``.md`` and its twin alike, so a change of where the
project lives reaches every notebook by rerunning ``make twins``.

Usage: ``python tools/twins.py`` writes; ``python tools/twins.py --check`` lists the files that
are out of date and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from mlperf_tutor import project  # noqa: E402  (framework-free: safe to import here)

BOOK = ROOT / "book"

# Python modules a chapter may import that are not dependencies of the package, and the pip
# name that provides each; the install cell of a chapter that imports one installs it too.
CHAPTER_EXTRAS = {"sklearn": "scikit-learn"}

# The tag that keeps the install cell folded on the HTML pages (the reader of the book has the
# package already; the Colab reader sees the cell in full).
INSTALL_TAG = "hide-input"


class TwinError(ValueError):
    """A chapter cannot be turned into its twin (names the file and what is wrong)."""


# --------------------------------------------------------------------------------------------
# The install cell


# TPU chips as PCI devices of Google (vendor 0x1ae0): the device ids of TPU v3, v4, v5p, v5e,
# v6e and 7x, as listed in JAX's TPU detection (jax/_src/hardware_utils.py, _TPU_PCI_DEVICE_IDS,
# https://github.com/jax-ml/jax/blob/main/jax/_src/hardware_utils.py). Google's network card
# (gVNIC) has the same vendor id, so the device id must be checked too.
TPU_PCI_DEVICE_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")

_INSTALL_TEMPLATE = """\
# Installs the mlperf_tutor package where it is missing (e.g. a fresh Colab runtime).
# Written by `make twins` from mlperf_tutor/project.py: change that file, not this cell.
def _install_mlperf_tutor():
    import glob
    import importlib
    import importlib.metadata as metadata
    import importlib.util
    import os
    import pathlib
    import subprocess
    import sys

    if importlib.util.find_spec("mlperf_tutor") is not None:
        return
    runtime = os.environ.get("MLPERF_TUTOR_RUNTIME", "").strip().lower()
    if runtime not in ("", "cpu", "gpu", "tpu"):
        raise ValueError(f"MLPERF_TUTOR_RUNTIME={{runtime!r}}: use cpu, gpu or tpu, or unset it")
    if not runtime:
        # A TPU, found without importing a framework. Colab's TPU runtimes are TPU VMs: chips
        # v2-v4 appear as /dev/accel*, later ones only as PCI devices of Google (vendor 0x1ae0)
        # with a TPU device id (the ids JAX checks, jax/_src/hardware_utils.py); COLAB_TPU_ADDR
        # and TPU_NAME are set by Colab's older, remote TPU runtime.
        def pci(device, name):
            try:
                return (device / name).read_text().strip()
            except OSError:
                return ""

        devices = pathlib.Path("/sys/bus/pci/devices")
        tpu_ids = {tpu_ids}
        tpu = (
            os.environ.get("COLAB_TPU_ADDR")
            or os.environ.get("TPU_NAME")
            or glob.glob("/dev/accel*")
            or any(
                pci(d, "vendor") == "0x1ae0" and pci(d, "device") in tpu_ids
                for d in (devices.iterdir() if devices.is_dir() else ())
            )
        )
        runtime = "tpu" if tpu else "gpu"
    # A TPU runtime has no TensorFlow, and TensorFlow's wheel would pull its own jax pins.
    extras = {extras}[runtime == "tpu"]
    # MLPERF_TUTOR_SOURCE: a local checkout or a URL to install from instead.
    default = {source}
    source = os.environ.get("MLPERF_TUTOR_SOURCE") or default
    if source and os.path.exists(source):
        source = pathlib.Path(source).resolve().as_uri()
    requirement = f"{distribution}[{{extras}}]" + (f" @ {{source}}" if source else "")

    # Distributions whose modules are already imported: pip replacing one needs a restart.
    top = {{name.partition(".")[0] for name in sys.modules}}
    loaded = {{d for m, ds in metadata.packages_distributions().items() if m in top for d in ds}}

    def versions():
        found = {{}}
        for dist in loaded:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                found[dist] = None
        return found

    before = versions()
    print(f"Installing {{requirement}} ...")
    command = [sys.executable, "-m", "pip", "install", "-q", requirement{more}]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-5000:], sep="\\n")
        raise RuntimeError(
            f"pip could not install {{requirement}} (exit {{result.returncode}}; its messages "
            "are above); the notebook needs the package"
        )
    importlib.invalidate_caches()
    after = versions()
    changed = sorted(dist for dist in loaded if after[dist] != before[dist])
    if changed:
        print(
            f"pip replaced {{', '.join(changed)}}, already imported in this session: restart the "
            "runtime (Colab: Runtime > Restart session), then run the notebook again."
        )
    else:
        print("mlperf_tutor is installed.")


_install_mlperf_tutor()
del _install_mlperf_tutor"""


def install_cell(extra_requirements: tuple[str, ...] = ()) -> str:
    """The source of the install cell, from ``mlperf_tutor/project.py``'s values.

    Args:
        extra_requirements: pip names the chapter needs beyond the package (e.g. scikit-learn).
    """
    source = None if project.PUBLISHED else project.source()
    return _INSTALL_TEMPLATE.format(
        tpu_ids="(" + ", ".join(json.dumps(i) for i in TPU_PCI_DEVICE_IDS) + ")",
        extras=json.dumps([",".join(project.EXTRAS_GPU), ",".join(project.EXTRAS_TPU)]),
        source=json.dumps(source),
        distribution=project.DISTRIBUTION,
        more="".join(f", {json.dumps(r)}" for r in extra_requirements),
    )


def extra_requirements(md_text: str) -> tuple[str, ...]:
    """The pip names of the modules outside the package that a chapter imports."""
    found = []
    for module, requirement in CHAPTER_EXTRAS.items():
        if re.search(rf"^\s*(from|import)\s+{module}\b", md_text, flags=re.MULTILINE):
            found.append(requirement)
    return tuple(found)


_CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)


def install_cell_block(md_text: str) -> str:
    """The MyST code cell that must open the chapter ``md_text``."""
    source = install_cell(extra_requirements(md_text))
    return f"```{{code-cell}} ipython3\n:tags: [{INSTALL_TAG}]\n\n{source}\n```"


def with_install_cell(md_text: str, md_path: Path) -> str:
    """``md_text`` opening with the generated install cell: it replaces the first code cell when
    that one installs the package (an older install cell), else goes before it."""
    first = _CODE_CELL.search(md_text)
    if first is None:
        raise TwinError(f"{_rel(md_path)} has no code cell to put the install cell before")
    block = install_cell_block(md_text)
    if "install" in first.group(0) and "mlperf" in first.group(0):
        return md_text[: first.start()] + block + md_text[first.end() :]
    return md_text[: first.start()] + block + "\n\n" + md_text[first.start() :]


# --------------------------------------------------------------------------------------------
# MyST directives -> plain Markdown

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\{(?P<name>[A-Za-z][\w:-]*)\}\s*(?P<arg>.*)$")
_HEADING = re.compile(r"^(#{1,6})\s")
_ROLE = re.compile(r"(?<!`)\{(?P<name>[A-Za-z][\w:-]*)\}`(?P<text>[^`]+)`")
_ADMONITIONS = {
    "note",
    "tip",
    "hint",
    "important",
    "warning",
    "caution",
    "attention",
    "danger",
    "error",
    "seealso",
    "admonition",
}
_CODE_DIRECTIVES = {"code", "code-block", "sourcecode"}


@dataclass
class _Fence:
    char: str
    length: int

    def closes(self, line: str) -> bool:
        stripped = line.strip()
        return (
            len(line) - len(line.lstrip(" ")) <= 3
            and len(stripped) >= self.length
            and set(stripped) == {self.char}
        )


@dataclass
class _Converter:
    """Turns one chapter's Markdown into plain Markdown; remembers the heading level across
    cells (a tab set's sections go one level below the section that holds it)."""

    md_path: Path
    level: int = 2
    errors: list[str] = field(default_factory=list)

    def convert(self, text: str) -> str:
        return "\n".join(self._lines(text.split("\n")))

    def _lines(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            match = _FENCE.match(line)
            if match is None:
                heading = _HEADING.match(line)
                if heading:
                    self.level = len(heading.group(1))
                out.append(self._roles(line))
                i += 1
                continue
            fence = _Fence(match["fence"][0], len(match["fence"]))
            end = self._close(lines, i + 1, fence)
            directive = _DIRECTIVE.match(match["info"].strip())
            if directive is None:  # a plain code block (or a bare colon fence): kept as it is
                out.extend(lines[i : end + 1])
            else:
                body = lines[i + 1 : end]
                out.extend(self._directive(directive["name"], directive["arg"].strip(), body))
            i = end + 1
        return out

    def _close(self, lines: list[str], start: int, fence: _Fence) -> int:
        """The index of the line that closes ``fence``, skipping fences nested inside it."""
        i = start
        while i < len(lines):
            if fence.closes(lines[i]):
                return i
            nested = _FENCE.match(lines[i])
            if nested and nested["info"].strip():
                inner = _Fence(nested["fence"][0], len(nested["fence"]))
                i = self._close(lines, i + 1, inner)
            i += 1
        raise TwinError(f"{_rel(self.md_path)}: a {fence.char * fence.length} fence never closes")

    def _roles(self, line: str) -> str:
        def plain(match: re.Match) -> str:
            name, text = match["name"], match["text"]
            if name == "math":
                return f"${text}$"
            if name in {"ref", "doc", "numref", "term", "abbr", "download", "eq"}:
                return re.sub(r"\s*<[^>]*>$", "", text)  # "title <target>" -> "title"
            return f"`{text}`"

        return _ROLE.sub(plain, line)

    def _directive(self, name: str, arg: str, body: list[str]) -> list[str]:
        options, body = _options(body)
        if name == "literalinclude":
            return self._include(arg, options)
        if name == "tab-set":
            return self._lines(body)
        if name == "tab-item":
            self.level = min(self.level, 5)
            heading = "#" * (self.level + 1) + f" {arg}"
            saved = self.level
            inner = self._lines(body)
            self.level = saved  # a tab's own headings do not move its siblings' level
            return [heading, "", *inner, ""]
        if name == "dropdown":
            title = arg or "Details"
            inner = self._lines(body)
            return ["<details>", f"<summary>{title}</summary>", "", *inner, "", "</details>"]
        if name in _ADMONITIONS:
            title = arg if name == "admonition" else " ".join(filter(None, [name.title(), arg]))
            quoted = [f"> {line}".rstrip() for line in self._lines(body)]
            return [f"> **{title}**", ">", *quoted]
        if name == "math":
            return ["$$", *body, "$$"]
        if name in _CODE_DIRECTIVES:
            return [f"```{arg}", *body, "```"]
        if name in {"figure", "image"}:
            alt = options.get("alt", "")
            return [f"![{alt}]({arg})", "", *self._lines(body)]
        # Any other directive: its title in bold, then its text.
        return ([f"**{arg}**", ""] if arg else []) + self._lines(body)

    def _include(self, arg: str, options: dict[str, str]) -> list[str]:
        where = f"{_rel(self.md_path)}: literalinclude {arg}"
        path = (ROOT / arg.lstrip("/")) if arg.startswith("/") else (self.md_path.parent / arg)
        code = include_text(path.resolve(), options, where)
        language = options.get("language", "python" if path.suffix == ".py" else "")
        caption = [f"*{options['caption']}*", ""] if options.get("caption") else []
        ticks = "````" if "```" in code else "```"
        return [*caption, f"{ticks}{language}", *code.rstrip("\n").split("\n"), ticks]


def _options(body: list[str]) -> tuple[dict[str, str], list[str]]:
    """A directive's options (``:key: value`` lines or a ``---`` YAML block) and its content."""
    options: dict[str, str] = {}
    i = 0
    if body and body[0].strip() == "---":
        end = next((j for j in range(1, len(body)) if body[j].strip() == "---"), None)
        if end is not None:
            for line in body[1:end]:
                key, _, value = line.partition(":")
                options[key.strip()] = value.strip()
            i = end + 1
    else:
        while i < len(body) and re.match(r"^\s*:[\w-]+:", body[i]):
            key, value = re.match(r"^\s*:([\w-]+):\s*(.*)$", body[i]).groups()
            options[key] = value.strip()
            i += 1
    while i < len(body) and not body[i].strip():
        i += 1
    return options, body[i:]


def include_text(path: Path, options: dict[str, str], where: str) -> str:
    """What a ``literalinclude`` of ``path`` with ``options`` shows, filtered in Sphinx's order:
    pyobject, start, end, lines, dedent, prepend, append.

    Args:
        path: the included file.
        options: the directive's options (``pyobject``, ``start-after``, ``start-at``,
            ``end-before``, ``end-at``, ``lines``, ``dedent``, ``prepend``, ``append``; display
            options such as ``emphasize-lines``, ``caption`` and ``linenos`` do not change it).
        where: the chapter and directive, for error messages.
    """
    if not path.is_file():
        raise TwinError(f"{where}: no file {path}")
    lines = path.read_text().split("\n")
    if "pyobject" in options:
        first, last = _pyobject_span(path, options["pyobject"], where)
        lines = lines[first - 1 : last]
    for key in ("start-after", "start-at"):
        if key in options:
            found = next((n for n, line in enumerate(lines) if options[key] in line), None)
            if found is None:
                raise TwinError(f"{where}: :{key}: {options[key]!r} is not in the file")
            lines = lines[found + 1 :] if key == "start-after" else lines[found:]
    for key in ("end-before", "end-at"):
        if key in options:
            found = next((n for n, line in enumerate(lines) if options[key] in line), None)
            if found is None:
                raise TwinError(f"{where}: :{key}: {options[key]!r} is not in the file")
            lines = lines[:found] if key == "end-before" else lines[: found + 1]
    if "lines" in options:
        lines = [lines[n] for n in _line_numbers(options["lines"], len(lines), where)]
    if "dedent" in options:
        if options["dedent"]:
            width = int(options["dedent"])
            lines = [line[width:] for line in lines]
        else:
            lines = textwrap.dedent("\n".join(lines)).split("\n")
    if "prepend" in options:
        lines = [options["prepend"], *lines]
    if "append" in options:
        lines = [*lines, options["append"]]
    return "\n".join(lines)


def _pyobject_span(path: Path, dotted: str, where: str) -> tuple[int, int]:
    """First and last line (1-based) of the class or function ``dotted`` in ``path``, its
    decorators included."""
    scope: list[ast.stmt] = ast.parse(path.read_text()).body
    node = None
    for part in dotted.split("."):
        node = next(
            (
                n
                for n in scope
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.name == part
            ),
            None,
        )
        if node is None:
            raise TwinError(f"{where}: :pyobject: {dotted} is not defined in {path.name}")
        scope = node.body
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return first, node.end_lineno


def _line_numbers(spec: str, count: int, where: str) -> list[int]:
    """0-based indices for a ``:lines:`` spec such as ``1-3,5,8-``."""
    chosen: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, _, high = part.partition("-")
                chosen.extend(range(int(low or 1) - 1, int(high) if high else count))
            else:
                chosen.append(int(part) - 1)
        except ValueError:
            raise TwinError(f"{where}: :lines: {spec!r} is not a list of numbers") from None
    if any(not 0 <= n < count for n in chosen):
        raise TwinError(f"{where}: :lines: {spec!r} goes past the file's {count} lines")
    return chosen


# --------------------------------------------------------------------------------------------
# Chapters -> twins


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def is_notebook(page: Path) -> bool:
    """A MyST notebook starts with front matter holding a jupytext section."""
    text = page.read_text()
    return text.startswith("---") and "jupytext:" in text.split("---")[1]


def chapters() -> list[Path]:
    """The book's MyST notebooks."""
    return sorted(p for p in BOOK.rglob("*.md") if is_notebook(p))


def twin(md_path: Path, md_text: str | None = None) -> str:
    """The ``.ipynb`` twin of the chapter ``md_path`` (its text, as written to disk)."""
    text = md_path.read_text() if md_text is None else md_text
    notebook = jupytext.reads(text, fmt="md:myst")
    converter = _Converter(md_path)
    cells = []
    for cell in notebook.cells:
        metadata = dict(cell.metadata)
        if "remove-cell" in metadata.get("tags", ()):
            continue
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=metadata)
        elif cell.cell_type == "markdown":
            source = converter.convert(cell.source).strip("\n")
            if not source.strip():
                continue
            new = nbformat.v4.new_markdown_cell(source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        new["id"] = f"cell-{len(cells):03d}"  # stable ids: regenerating changes nothing
        cells.append(new)
    jupytext_meta = {k: v for k, v in notebook.metadata.get("jupytext", {}).items()}
    # The twin is generated from the .md: it must not be paired back (jupytext would overwrite
    # the .md with the expanded text on a save).
    jupytext_meta.pop("formats", None)
    jupytext_meta.pop("text_representation", None)
    metadata = {
        "kernelspec": notebook.metadata.get(
            "kernelspec", {"display_name": "Python 3", "language": "python", "name": "python3"}
        ),
        "language_info": {"name": "python"},
        # Colab opens the notebook on a GPU runtime (the chapters pick their size from it).
        "accelerator": "GPU",
        "colab": {"provenance": []},
    }
    if jupytext_meta:
        metadata["jupytext"] = jupytext_meta
    nb = nbformat.v4.new_notebook(cells=cells, metadata=metadata)
    nb.nbformat_minor = 5
    return nbformat.writes(nb) + "\n"


def with_repository(config_text: str) -> str:
    """``_config.yml``'s text with its ``repository`` url and branch (the launch and repository
    buttons) set from ``mlperf_tutor/project.py``."""
    block = re.search(r"^repository:\n((?:[ \t]+.*\n)+)", config_text, flags=re.MULTILINE)
    if block is None:
        raise TwinError("_config.yml has no repository: section")
    body = block.group(1)
    for key, value in (("url", project.REPOSITORY), ("branch", project.BRANCH)):
        body, count = re.subn(rf"^(\s+{key}:).*$", rf"\g<1> {value}", body, flags=re.MULTILINE)
        if count != 1:
            raise TwinError(f"_config.yml's repository: section has no single {key}: line")
    return config_text[: block.start(1)] + body + config_text[block.end(1) :]


def generate(paths: list[Path] | None = None, check: bool = False) -> list[Path]:
    """Rewrite each chapter's install cell and its twin (and, for the whole book,
    ``_config.yml``'s repository); return the files that changed (with ``check``, only list
    them)."""
    stale = []
    if paths is None:
        config = ROOT / "_config.yml"
        text = config.read_text()
        if with_repository(text) != text:
            stale.append(config)
            if not check:
                config.write_text(with_repository(text))
    for md in paths if paths is not None else chapters():
        text = md.read_text()
        new_text = with_install_cell(text, md)
        ipynb = md.with_suffix(".ipynb")
        new_twin = twin(md, new_text)
        for path, content in ((md, new_text), (ipynb, new_twin)):
            if not path.exists() or path.read_text() != content:
                stale.append(path)
                if not check:
                    path.write_text(content)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="only list files out of date")
    parser.add_argument("chapters", nargs="*", type=Path, help="default: every chapter")
    args = parser.parse_args(argv)
    for path in args.chapters:
        if not path.is_file() or not is_notebook(path):
            parser.error(f"{path} is not a MyST notebook of the book")
    try:
        stale = generate([p.resolve() for p in args.chapters] or None, check=args.check)
    except TwinError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {_rel(path)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
