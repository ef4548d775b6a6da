"""The page template of ``dvc plots show``, self-contained so that the plots render offline.

Definitions
-----------
DVC plots template
    An HTML page with the placeholder ``{plot_divs}``, where ``dvc plots show`` puts one ``<div>`` per plot;
    each Vega plot's ``<div>`` calls the global ``vegaEmbed`` on its Vega-Lite specification, and each image
    plot is an ``<img>`` of a file copied beside the page. DVC's own page loads Vega, Vega-Lite and Vega-Embed
    from a CDN through a ``{scripts}`` placeholder, so without a network every Vega plot is blank. This page has
    no ``{scripts}`` placeholder and carries the three libraries inline instead: vl-convert-python's bundle
    (the Vega project's own build, which exposes ``vega``, ``vegaLite`` and ``vegaEmbed`` on ``window``) for
    the Vega-Lite major version that DVC's plot templates declare.
where it lives
    :data:`TEMPLATE_NAME` in ``.dvc/``, named by ``plots.html_template`` in ``.dvc/config``, so a plain
    ``dvc plots show`` (and ``dvc plots diff``) uses it. It is committed, because a fresh clone has to render
    plots without a step of its own; :func:`write_template` regenerates it (``scripts/plots_template.py``)
    and the tests check that it matches the installed bundle.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from nucleiseg.io import write_text_atomic

TEMPLATE_NAME = "plots_offline.html"
# DVC's plot templates (dvc_render.vega_templates) declare the Vega-Lite v5 schema; 5.21 is the newest
# 5.x that vl-convert bundles.
VEGA_LITE_VERSION = "5.21"
PLACEHOLDER = "{plot_divs}"

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC plots (nucleiseg)</title>
    <!-- {provenance}: made by scripts/plots_template.py; Vega, Vega-Lite and Vega-Embed are
         BSD-3-Clause, (c) the Vega project (https://vega.github.io). -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def provenance() -> str:
    """The versions inlined: vl-convert-python's, and the Vega, Vega-Lite and Vega-Embed it bundles."""
    from importlib.metadata import version

    import vl_convert as vlc

    return (
        f"vl-convert-python {version('vl-convert-python')}: Vega {vlc.get_vega_version()}, "
        f"Vega-Lite {VEGA_LITE_VERSION}, Vega-Embed {vlc.get_vega_embed_version()}"
    )


def template_html() -> str:
    """The self-contained page: the Vega bundle inline, DVC's ``{plot_divs}`` and ``{refresh_tag}`` placeholders."""
    import vl_convert as vlc

    bundle = vlc.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    if "</script" in bundle.lower():  # would end the inline <script> early
        raise ValueError("the Vega bundle contains '</script'; it cannot be inlined as it is")
    # Not str.format: the bundle and the CSS hold braces, and DVC fills {refresh_tag} and {plot_divs} itself.
    return PAGE.replace("{provenance}", html.escape(provenance())).replace("{bundle}", bundle)


def write_template(dvc_dir: str | os.PathLike[str]) -> Path:
    """Write :func:`template_html` to ``dvc_dir/TEMPLATE_NAME`` (atomically); returns the path."""
    path = Path(dvc_dir) / TEMPLATE_NAME
    write_text_atomic(path, template_html())
    return path
