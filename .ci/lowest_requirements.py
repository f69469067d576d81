"""Print the lowest versions pyproject.toml declares, as pip constraints (``name==version``).

``make test-min`` installs the package's wheel with these constraints, so the minimums that
pyproject.toml promises are the versions the tests run with. Every requirement of the core and
of the extras named on the command line must have a lower bound (``>=``); one without is an
error, since its lowest version is then whatever pip finds.

    python .ci/lowest_requirements.py torch jax tf > lowest.txt

``--replace NAME==VERSION`` installs another version where the declared minimum cannot be
installed here (the project machines carry one CPU build of torch, 2.13.0). ``--check FREEZE``
compares a ``pip freeze`` file with the pins instead, and fails naming every difference.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def lowest(extras: list[str], replace: dict[str, str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    optional = project["optional-dependencies"]
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{PYPROJECT}: no extra {unknown}; the extras are {sorted(optional)}")
    lines = []
    for text in project["dependencies"] + [r for e in extras for r in optional[e]]:
        req = Requirement(text)
        if req.name == project["name"]:  # an extra that names others ("all")
            continue
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if not floors:
            raise SystemExit(f"{PYPROJECT}: {text!r} has no lower bound (>=); give it one")
        version = replace.get(req.name, floors[0])
        lines.append(f"{req.name}=={version}")
    return list(dict.fromkeys(lines))


def check(freeze: Path, pins: list[str]) -> None:
    """Fail unless every pin is installed at its version, as ``freeze`` (pip freeze) lists."""
    installed = {}
    for line in freeze.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            installed[canonicalize_name(name)] = version
    wrong = []
    for pin in pins:
        name, _, version = pin.partition("==")
        found = installed.get(canonicalize_name(name))
        if found is None or not SpecifierSet(f"=={version}").contains(found, prereleases=True):
            wrong.append(f"{name}: want {version}, installed {found}")
    if wrong:
        raise SystemExit(f"{freeze}: not at the lowest versions: {'; '.join(wrong)}")
    print(f"{len(pins)} packages at their lowest declared versions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--replace", action="append", default=[], metavar="NAME==VERSION")
    parser.add_argument("--check", type=Path, default=None, metavar="FREEZE")
    args = parser.parse_args()
    replace = {}
    for item in args.replace:
        name, sep, version = item.partition("==")
        if not sep or not version:
            raise SystemExit(f"--replace {item!r}: write NAME==VERSION")
        replace[name] = version
    pins = lowest(args.extras, replace)
    if args.check is not None:
        check(args.check, pins)
    else:
        sys.stdout.write("".join(line + "\n" for line in pins))


if __name__ == "__main__":
    main()
