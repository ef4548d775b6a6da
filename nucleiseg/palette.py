"""The one colour per nucleus class used everywhere: overlays, QuPath GeoJSON classifications, the spatial report.

Colours are from Okabe & Ito's colour-universal-design palette (2008), chosen to stay distinct under the
common colour-vision deficiencies (protanopia, deuteranopia), unlike pure red and green:

============  ======================  ===========  =================================================
class         Okabe-Ito name          RGB          why
============  ======================  ===========  =================================================
tumor         orange                  230 159 0    bright; against the blue classes on the yellow-blue
                                                   axis, which red-green deficient readers keep
lymphocyte    sky blue                86 180 233   bright, so it shows on the dark purple of lymphocytes
stroma        bluish green            0 158 115    darker than sky blue: told apart by lightness too
============  ======================  ===========  =================================================

All three are visible on haematoxylin-purple nuclei, on eosin-pink tissue and on a white page.
"""

from __future__ import annotations

from nucleiseg.labels import CLASS_NAMES

#: RGB (0-255) of each class, indexed by class = id % 3 (:data:`nucleiseg.labels.CLASS_NAMES`).
CLASS_COLORS: tuple[tuple[int, int, int], ...] = ((230, 159, 0), (86, 180, 233), (0, 158, 115))
#: The same colours as ``#rrggbb`` (matplotlib, HTML).
CLASS_HEX: tuple[str, ...] = tuple("#{:02x}{:02x}{:02x}".format(*rgb) for rgb in CLASS_COLORS)
#: Class names as QuPath shows them (GeoJSON ``classification.name``).
QUPATH_NAMES: tuple[str, str, str] = ("Tumor", "Lymphocyte", "Stroma")


def class_color(name_or_index: str | int) -> tuple[int, int, int]:
    """RGB of a class given by name (``tumor``) or index (0-2)."""
    index = CLASS_NAMES.index(name_or_index) if isinstance(name_or_index, str) else int(name_or_index)
    return CLASS_COLORS[index]


def legend_html() -> str:
    """A one-line HTML legend of the class colours (swatch and name per class)."""
    items = "".join(
        f'<span class="swatch" style="background:{hex_}"></span>{name}&nbsp;&nbsp;'
        for name, hex_ in zip(CLASS_NAMES, CLASS_HEX, strict=True)
    )
    return f'<div class="legend">{items}</div>'


__all__ = ["CLASS_COLORS", "CLASS_HEX", "QUPATH_NAMES", "class_color", "legend_html"]
