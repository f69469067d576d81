"""A Sphinx extension that writes each inline ``<script>`` of a page once.

Sphinx 7.4 lists a body-only script registered after the builder started (sphinx-thebe's
``const THEBE_JS_URL = ...``, sphinx-togglebutton's selector) twice: once with the file name
``None`` and once, when it re-adds the registry's scripts before writing, with ``''``. The two do
not compare equal, so every page declared ``const THEBE_JS_URL`` twice and the browser stopped that
script with "Identifier 'THEBE_JS_URL' has already been declared" (``make book-check`` saw it on
every page). This keeps the first of any scripts that differ only by ``None`` against ``''``.
"""

from __future__ import annotations

from typing import Any


def _drop_repeated_scripts(app, pagename, templatename, context: dict[str, Any], doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen = set()
    unique = []
    for script in scripts:
        attributes = getattr(script, "attributes", {})
        key = (
            getattr(script, "filename", script) or "",
            getattr(script, "priority", 0),
            tuple(sorted(attributes.items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app) -> dict[str, Any]:
    app.connect("html-page-context", _drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
