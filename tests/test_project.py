"""Where the project lives is one setting (``mlperf_tutor/project.py``); everything that names
the location derives from it: pyproject.toml's URLs, the README's install lines, the book's
repository button and launch buttons (_config.yml)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from mlperf_tutor import frameworks, project

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_urls_and_name_follow_project_py():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert data["name"] == project.DISTRIBUTION
    urls = data["urls"]
    assert urls["Homepage"] == project.REPOSITORY
    assert urls["Source"] == project.REPOSITORY
    assert urls["Issues"] == project.REPOSITORY + "/issues"


def test_readme_install_lines_are_project_requirements():
    text = (ROOT / "README.md").read_text()
    # Every pip line that installs the package, whatever its extras.
    lines = re.findall(r"pip install \"(" + re.escape(project.DISTRIBUTION) + r"[^\"]*)\"", text)
    assert lines, "README.md has no install line for the package"
    for line in lines:
        extras = re.match(re.escape(project.DISTRIBUTION) + r"\[([^\]]+)\]", line)
        assert extras, f"README.md installs {line!r} without extras"
        assert line == project.requirement(tuple(extras.group(1).split(","))), line
    # The two runtimes' lines are there.
    assert project.requirement(("all",)) in lines


def test_book_config_names_the_repository_and_branch():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == project.REPOSITORY
    assert config["repository"]["branch"] == project.BRANCH


def test_install_hint_installs_from_the_project():
    for name in frameworks.NAMES:
        assert project.requirement((name,)) in frameworks.install_hint(name)


def test_requirement_and_colab_url_forms():
    # The form pip needs for a repository, and Colab's address scheme for a GitHub notebook.
    assert project.requirement(("jax",)) == (
        f"{project.DISTRIBUTION}[jax] @ git+{project.REPOSITORY}@{project.BRANCH}"
        if not project.PUBLISHED
        else f"{project.DISTRIBUTION}[jax]"
    )
    owner_repo = project.REPOSITORY.removeprefix("https://github.com/")
    assert project.colab_url("book/intro.ipynb") == (
        f"https://colab.research.google.com/github/{owner_repo}/blob/{project.BRANCH}/"
        "book/intro.ipynb"
    )
