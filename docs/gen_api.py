"""MkDocs hook: render the API reference from ``jaxspec.__all__`` into ``api.md``.

``api.md`` holds the marker ``<!-- jaxspec-api -->``; at build time it becomes one
mkdocstrings block (``::: jaxspec.NAME``) per public name, grouped by topic.  A name
of ``jaxspec.__all__`` that no group lists lands in "More", so a new public name is
documented (and its docstring checked) without editing this file; a group entry that
is not (or not yet) public is skipped, so the page never lists what does not exist.
"""

from __future__ import annotations

MARKER = "<!-- jaxspec-api -->"

GROUPS: list[tuple[str, str, list[str]]] = [
    ("Extraction", "Spectra, errors and resolution from an image and a PSF.",
     ["extract", "Extraction", "apply_resolution", "patch_geometry", "PatchGeometry"]),
    ("PSF models", "Where each fiber's light lands and how it spreads (also in `jaxspec.psf`).",
     ["PSF", "GaussHermitePSF", "TraceGaussianPSF", "GaussianPSF", "desi_like_psf", "read_psf", "write_psf"]),
    ("Forward model", "Spectra to pixels.", ["project", "simulate"]),
    ("DESI files", "Preproc images in, frames out (plain NumPy and astropy).",
     ["read_preproc", "write_preproc", "Preproc", "read_frame", "write_frame", "Frame"]),
    ("PSF fitting", "Arc and flat calibration, PSF uncertainties.",
     ["fit_psf", "fit_psf_ccd", "FitResult", "flux_jacobian", "propagate_psf_uncertainty",
      "simulate_arc", "simulate_flat", "arc_lines", "LineList"]),
]
SUBMODULES: list[tuple[str, str]] = [
    ("psf", "The PSF models above, and their interface."),
    ("solve", "The linear algebra of one patch: normal equations (dense, or as their block band "
              "over fibers with a block Cholesky and the inverse's diagonal blocks by recurrence), "
              "decorrelation, matrix square roots with custom derivatives, resolution diagonals. "
              "Every function acts on one patch; `jax.vmap` batches them."),
]
SKIP = {"__version__"}  # documented in the page's text


def render() -> str:
    """Markdown (with mkdocstrings blocks) for every name in ``jaxspec.__all__``."""
    import jaxspec

    public = list(jaxspec.__all__)
    listed = set(SKIP) | {name for name, _ in SUBMODULES}
    parts: list[str] = []
    for title, blurb, names in GROUPS:
        present = [n for n in names if n in public]
        listed.update(names)
        if not present:
            continue
        parts += [f"## {title}", "", blurb, ""]
        parts += [f"::: jaxspec.{n}\n" for n in present]
    rest = [n for n in public if n not in listed]
    if rest:
        parts += ["## More", ""] + [f"::: jaxspec.{n}\n" for n in rest]
    parts += ["## Submodules", ""]
    for name, blurb in SUBMODULES:
        if name not in public:
            continue
        if name == "psf":
            parts += ["### `jaxspec.psf`", "", blurb, "",
                      "::: jaxspec.psf", "    options:", "      members: false", "      show_root_heading: false", ""]
        else:
            parts += [f"### `jaxspec.{name}`", "", blurb, "",
                      f"::: jaxspec.{name}", "    options:", "      show_root_heading: false",
                      "      heading_level: 4", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render())
    return markdown


if __name__ == "__main__":
    print(render())
