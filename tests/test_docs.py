"""The documentation: every public name documented, the README's Python snippet runs, and
(when mkdocs is installed) ``.ci/docs`` builds pages whose notebook figures are images.

The full build executes every notebook in docs/notebooks and takes a few minutes on a CPU;
it runs only when ``JAXSPEC_TEST_DOCS=1`` (``.ci/docs`` runs the same build directly).
"""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxspec

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", [n for n in jaxspec.__all__ if n != "__version__"])
def test_public_name_has_docstring_and_api_entry(name):
    """Every name of jaxspec.__all__ is rendered in the API page and has a real docstring."""
    rendered = _load("gen_api").render()
    assert f"::: jaxspec.{name}\n" in rendered
    obj = getattr(jaxspec, name)
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):  # not just the inherited one
        assert "__doc__" in vars(obj) and vars(obj)["__doc__"], name
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    assert len(summary) > 10, f"{name}: no one-line summary"
    if inspect.isfunction(obj):
        params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        if len(params) > 1 and not name.startswith("read_"):
            assert "Args:" in doc or "Returns:" in doc, f"{name}: arguments not documented"


def test_version_is_documented_in_text():
    assert "`jaxspec.__version__`" in (DOCS / "api.md").read_text()


def test_cli_reference_lists_every_subcommand():
    md = _load("gen_cli").render()
    from jaxspec._cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"## `jaxspec {name}`" in md
    assert "usage: jaxspec plot" in md


def test_nav_pages_exist_or_are_known():
    """Every page of mkdocs.yml's nav is in docs/ (pages of other work in progress are listed)."""
    import re

    nav = re.findall(r":\s+([\w/.-]+\.(?:md|ipynb))\s*$", (REPO / "mkdocs.yml").read_text(), re.M)
    assert "notebooks/quickstart.ipynb" in nav and "api.md" in nav
    missing = [p for p in nav if not (DOCS / p).exists()]
    assert not missing, f"pages in mkdocs.yml nav but not in docs/: {missing}"


def _docs_tools():
    """Skip unless the docs extra is installed (``.ci/docs`` would install it otherwise)."""
    for mod in ("mkdocs", "material", "mkdocs_jupyter", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod)


def _figures(html: str) -> list[str]:
    """The PNG images of a built page's cell outputs (the theme's CSS holds data: URLs too)."""
    import re

    return re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,', html)


def _ci_docs(env_extra, timeout):
    """Run ``.ci/docs`` with this interpreter; the repository's jaxspec comes first on the path."""
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MPLBACKEND"] = "Agg"  # as a user's shell may have it: .ci/docs must still give figures
    return subprocess.run([str(REPO / ".ci" / "docs")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # compiles one extraction (about 15 s of CPU)
def test_readme_python_snippet_runs():
    """The README's Python snippet runs as written (it once raised NameError: 'wave')."""
    import re

    import numpy as np

    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    snippet = [b for b in blocks if "jaxspec.extract(" in b]
    assert len(snippet) == 1, f"{len(blocks)} python blocks, {len(snippet)} with jaxspec.extract"
    ns: dict = {"__name__": "__readme__"}
    exec(compile(snippet[0], str(REPO / "README.md"), "exec"), ns)
    ex, wave = ns["ex"], ns["wave"]
    assert np.shape(ex.flux) == (25, len(wave)) == np.shape(ex.ivar)
    assert np.shape(ex.resolution) == (25, 11, len(wave))  # as the snippet's comment says
    # a flat spectrum of 100 electron / A comes back as 100 within its errors
    flux, ivar = np.asarray(ex.flux), np.asarray(ex.ivar)
    assert abs(np.median(flux) - 100.0) < 1.0
    pull = ((flux - 100.0) * np.sqrt(ivar))[:, 5:-5]
    assert abs(pull.mean()) < 0.1 and 0.85 < pull.std() < 1.15


def test_notebooks_draw_inline():
    """Each tutorial notebook picks the inline backend first, so its figures are images
    wherever it runs (an MPLBACKEND=Agg environment gave pages without any figure)."""
    import json

    for nb in ("quickstart", "decorrelation", "autodiff"):
        cells = json.loads((DOCS / "notebooks" / f"{nb}.ipynb").read_text())["cells"]
        first = next(c for c in cells if c["cell_type"] == "code")
        assert "".join(first["source"]).startswith("%matplotlib inline\n"), nb


@pytest.mark.slow
def test_ci_docs_turns_figures_into_images(tmp_path):
    """``.ci/docs`` on a one-cell notebook that draws a figure: the page holds the PNG.

    The notebook has no ``%matplotlib inline``; the build's environment alone must make the
    kernel draw inline, even with ``MPLBACKEND=Agg`` in the caller's environment.
    """
    import json

    _docs_tools()
    docs = tmp_path / "docs"
    (docs / "notebooks").mkdir(parents=True)
    (docs / "index.md").write_text("# one\n")
    cell = {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
            "source": ["import matplotlib.pyplot as plt\n", "plt.plot([0, 1, 2], [2, 0, 1]);"]}
    nb = {"cells": [cell], "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                       "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (docs / "notebooks" / "one.ipynb").write_text(json.dumps(nb))
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: one\ndocs_dir: docs\nstrict: true\ntheme: {name: material}\n"
        "nav:\n  - Home: index.md\n  - One: notebooks/one.ipynb\n"
        "plugins:\n  - mkdocs-jupyter:\n      execute: true\n      allow_errors: false\n"
        "      kernel_name: python3\n      include: ['notebooks/*.ipynb']\n"
    )
    site = tmp_path / "site"
    proc = _ci_docs({"MKDOCS_CONFIG": str(tmp_path / "mkdocs.yml"), "SITE_DIR": str(site)}, 600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    html = (site / "notebooks" / "one" / "index.html").read_text()
    assert len(_figures(html)) == 1, "the figure did not become an image"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JAXSPEC_TEST_DOCS") != "1", reason="set JAXSPEC_TEST_DOCS=1 to build the docs")
@pytest.mark.parametrize("shared", ["with", "without"])
def test_docs_build_strict(tmp_path, shared):
    """The whole site, as ``.ci/docs`` builds it, with and without ../shared (JAXSPEC_SHARED)."""
    _docs_tools()
    extra = {"SITE_DIR": str(tmp_path / "site")}
    if shared == "without":
        extra["JAXSPEC_SHARED"] = str(tmp_path / "no-shared")
    proc = _ci_docs(extra, 1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    for name in jaxspec.__all__:
        if name != "__version__":
            assert f'id="jaxspec.{name}"' in api, name
    import json

    for nb in ("quickstart", "autodiff", "decorrelation"):
        html = (site / "notebooks" / nb / "index.html").read_text()
        assert "data:image/png;base64" in html, f"{nb}: no figure rendered"
        # every figure the notebook makes is an image of the page
        cells = json.loads((DOCS / "notebooks" / f"{nb}.ipynb").read_text())["cells"]
        made = sum("".join(c["source"]).count("plt.subplots(") for c in cells if c["cell_type"] == "code")
        assert made and len(_figures(html)) >= made, f"{nb}: {len(_figures(html))} images for {made} figures"
