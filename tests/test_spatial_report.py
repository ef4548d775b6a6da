"""The spatial report and `nucleiseg spatial`: real synthetic tiles in, a strict JSON and an offline HTML out."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.io import write_image
from nucleiseg.labels import write_label
from nucleiseg.measure import nuclei_table
from nucleiseg.palette import CLASS_HEX
from nucleiseg.spatial import SpatialSettings
from nucleiseg.spatial_report import make_window, report_paths, table_points, write_spatial_report
from nucleiseg.synth import synth_tile

FAST = SpatialSettings(simulations=9, permutations=19, r_steps=20)
FAST_SET = ["--set", "spatial.simulations=9", "--set", "spatial.permutations=19", "--set", "spatial.r_steps=20"]


@pytest.fixture(scope="module")
def tile() -> tuple[np.ndarray, np.ndarray]:
    return synth_tile(7, 384)


def strict_json(path) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_report_is_self_contained_and_its_figures_match_the_table(tmp_path, tile):
    image, label = tile
    table = nuclei_table(label, image, mpp=0.5, image_name="tile_7")
    paths = write_spatial_report(
        table, tmp_path / "r", mpp=0.5, thumbnail=image, label=label, settings=FAST, name="tile_7"
    )
    assert paths == report_paths(tmp_path / "r", "tile_7") and paths["html"].name == "tile_7_spatial.html"
    figures = strict_json(paths["json"])
    counts = table["class"].value_counts()
    assert figures["counts"] == {c: int(counts.get(c, 0)) for c in ("tumor", "lymphocyte", "stroma")}
    assert figures["image"] == "tile_7" and figures["mpp_um_per_px"] == 0.5
    area_mm2 = (384 * 0.5) ** 2 * 1e-6  # the whole image: no tissue mask
    assert figures["area_mm2"] == pytest.approx(area_mm2)
    assert figures["density_per_mm2"]["tumor"] == pytest.approx(counts.get("tumor", 0) / area_mm2)
    assert figures["l_function"]["simulations"] == 9 and len(figures["l_function"]["radii_um"]) == 20
    assert figures["l_function"]["radii_um"][-1] == pytest.approx(0.25 * 384 * 0.5), "capped at a quarter window"
    page = paths["html"].read_text()
    # Offline: no external resource of any kind; five embedded PNG plots; the palette's colours with names.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<script" not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 5
    assert all(hex_ in page for hex_ in CLASS_HEX)
    for heading in ("Nuclei by class", "Density maps", "Nearest-neighbour distances", "L functions",
                    "Neighbourhood enrichment", "Morisita"):  # fmt: skip
        assert heading in page
    assert "µm" in page and "mm²" in page


def test_tissue_mask_sets_the_density_area_and_a_wrong_mpp_is_refused(tile):
    image, label = tile
    table = nuclei_table(label, image, mpp=0.25)
    with pytest.raises(ValueError, match=r"measured at \[0.25\] um/px, not at --mpp 0.5"):
        table_points(table, 0.5)
    xy, _ = table_points(table, 0.25)
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    window = make_window(xy, 0.25, image_shape=label.shape, tissue_mask=mask)
    assert window.area == pytest.approx((384 * 0.25) ** 2 / 2)
    with pytest.raises(ValueError, match="image shape"):
        make_window(xy, 0.25, tissue_mask=mask)


def test_nucleiseg_spatial_on_a_label_and_on_a_table(tmp_path, tile):
    image, label = tile
    write_image(tmp_path / "t.png", image)
    write_label(tmp_path / "t_label.png", label)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    write_image(tmp_path / "tissue.png", mask)
    runner = CliRunner()
    result = runner.invoke(app, ["spatial", str(tmp_path / "t_label.png"), "--image", str(tmp_path / "t.png"),
                                 "--tissue-mask", str(tmp_path / "tissue.png"), "--mpp", "0.25",
                                 "--out", str(tmp_path / "a"), *FAST_SET])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = strict_json(tmp_path / "a" / "spatial.json")
    assert figures["window"]["tissue_mask"] and figures["area_mm2"] == pytest.approx((96 * 0.75) ** 2 * 1e-6)
    table = pd.read_csv(tmp_path / "a" / "nuclei.csv")
    assert len(table) == figures["nuclei"] and (table["image"] == "t").all()
    # The table it wrote is an INPUT too; its um_per_px sets the scale, and another --mpp is refused.
    result = runner.invoke(
        app, ["spatial", str(tmp_path / "a" / "nuclei.csv"), "--out", str(tmp_path / "b"), *FAST_SET]
    )
    assert result.exit_code == 0, result.output
    assert strict_json(tmp_path / "b" / "spatial.json")["counts"] == figures["counts"]
    result = runner.invoke(
        app, ["spatial", str(tmp_path / "a" / "nuclei.csv"), "--mpp", "0.5", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 1 and "not at --mpp 0.5" in result.output
    result = runner.invoke(app, ["spatial", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and "missing.csv" in result.output


@pytest.mark.parametrize("nuclei", [0, 1])
def test_an_image_without_pairs_of_nuclei_still_gets_a_report(tmp_path, nuclei):
    label = np.zeros((64, 64), np.int32)
    if nuclei:
        label[10:13, 10:13] = 3
    table = nuclei_table(label, np.full((64, 64, 3), 200, np.uint8), mpp=0.25)
    paths = write_spatial_report(
        table, tmp_path, mpp=0.25, label=label, settings=SpatialSettings(simulations=3, permutations=3)
    )
    figures = strict_json(paths["json"])
    assert figures["nuclei"] == nuclei and figures["tumor_with_lymphocyte_within"]["fraction"] is None
    assert "no tumour or no lymphocyte" in paths["html"].read_text()
