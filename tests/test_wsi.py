"""Slide readers, the view at a model's resolution, the synthetic slide writer, tissue detection and the slide-level
stain normaliser, on small slides written by nucleiseg.slidegen (real files, read by OpenSlide and tiffslide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nucleiseg.slidegen import tissue_blocks, write_mosaic_slide, write_slide
from nucleiseg.synth import synth_tile
from nucleiseg.wsi import (
    ArraySlide,
    ScaledView,
    SlideError,
    open_slide,
    read_thumbnail,
    rescale,
    resize_label,
    resolve_mpp,
)


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return synth_tile(7, (600, 700))[0]


def test_a_written_slide_reads_back_in_openslide_and_tiffslide(tmp_path: Path, tile: np.ndarray) -> None:
    from nucleiseg.wsi import _TiffSlideReader

    path = write_slide(tmp_path / "s.tif", tile, 0.25, tile=128)
    slide = open_slide(path)
    assert slide.backend == "openslide:generic-tiff" and slide.mpp == (0.25, 0.25)
    assert slide.level_dimensions == ((700, 600), (175, 150), (44, 38))
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (700, 600)), tile)  # deflate: lossless
    np.testing.assert_array_equal(slide.read_region((100, 50), 0, (30, 20)), tile[50:70, 100:130])
    other = _TiffSlideReader(path)
    assert other.mpp == (0.25, 0.25) and other.level_dimensions == slide.level_dimensions
    np.testing.assert_array_equal(other.read_region((64, 32), 1, (40, 30)), slide.read_region((64, 32), 1, (40, 30)))

    ome = open_slide(write_slide(tmp_path / "s.ome.tif", tile, 0.5, ome=True, tile=128))
    assert ome.backend == "tiffslide" and ome.mpp == (0.5, 0.5) and len(ome.level_dimensions) == 3
    np.testing.assert_array_equal(ome.read_region((0, 0), 0, (700, 600)), tile)


def test_unknown_resolution_is_refused_with_how_to_give_it(tmp_path: Path, tile: np.ndarray) -> None:
    slide = open_slide(write_slide(tmp_path / "nompp.tif", tile, None))
    assert slide.mpp is None
    with pytest.raises(SlideError, match=r"nompp\.tif: the resolution .* --mpp \(e\.g\. --mpp 0\.25"):
        resolve_mpp(slide)
    assert resolve_mpp(slide, 0.5) == ((0.5, 0.5), "--mpp")
    assert resolve_mpp(open_slide(write_slide(tmp_path / "known.tif", tile, 0.25)))[1] == "metadata"


def test_corrupt_and_truncated_slides_give_errors_naming_the_file(tmp_path: Path, tile: np.ndarray) -> None:
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(SlideError, match=r"junk\.svs: not a readable slide"):
        open_slide(junk)
    with pytest.raises(SlideError, match="slide file not found"):
        open_slide(tmp_path / "missing.svs")
    whole = write_slide(tmp_path / "whole.tif", tile, 0.25, compression="jpeg")
    data = whole.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"cut\.tif"):
        slide = open_slide(cut)  # the directories are at the end: usually already here
        slide.read_region((0, 0), 0, slide.level_dimensions[0])


def test_the_view_at_a_model_resolution_is_the_same_read_whole_or_in_pieces(tmp_path: Path, tile: np.ndarray) -> None:
    slide40 = open_slide(write_slide(tmp_path / "s40.tif", tile, 0.25, tile=128))
    # Same resolution (within tolerance): level 0 as it is.
    same = ScaledView(slide40, (0.252, 0.252), 0.25)
    assert not same.resampled and same.shape == (600, 700) and same.scale == (1.0, 1.0)
    # 4x coarser: the pyramid's level 1 as it is; 2x coarser: level 0 reduced with anti-aliasing.
    level1 = ScaledView(slide40, (0.25, 0.25), 1.0)
    assert (level1.level, level1.resampled, level1.shape) == (1, False, (150, 175))
    for view in (ScaledView(slide40, (0.25, 0.25), 0.5), ScaledView(slide40, (0.25, 0.25), 0.13)):
        assert view.resampled and view.level == 0
        rows, cols = view.shape
        whole = view.read(0, 0, rows, cols)
        for r0, c0, h, w in ((0, 0, rows // 2 + 3, cols // 3), (rows // 3, cols // 2, rows - rows // 3, 11)):
            np.testing.assert_array_equal(view.read(r0, c0, h, w), whole[r0 : r0 + h, c0 : c0 + w])
    half = ScaledView(slide40, (0.25, 0.25), 0.5).read(0, 0, 300, 350).astype(float)
    import cv2

    assert np.abs(half - cv2.resize(tile, (350, 300), interpolation=cv2.INTER_AREA)).mean() < 4  # grey levels
    with pytest.raises(SlideError, match="outside the view"):
        same.read(590, 0, 20, 10)


def test_tiles_at_another_resolution_are_rescaled_and_labels_brought_back(tile: np.ndarray) -> None:
    assert rescale(tile, 0.25, 0.25) is tile
    up = rescale(tile[::2, ::2].copy(), 0.5, 0.25)
    assert up.shape == (600, 700, 3)
    label = np.zeros((600, 700), np.int32)
    label[100:140, 200:260] = 7
    back = resize_label(label[::2, ::2], (600, 700))
    assert back.shape == (600, 700) and set(np.unique(back)) == {0, 7}
    assert abs(int((back == 7).sum()) - 40 * 60) <= 2 * (40 + 60)
    with pytest.raises(SlideError, match="RGB uint8"):
        ArraySlide(np.zeros((4, 4)), 0.25)


def test_tissue_is_found_on_a_mosaic_and_nowhere_on_glass(tmp_path: Path, tile: np.ndarray) -> None:
    from nucleiseg.tissue import TissueSettings, detect_tissue, outline, read_mask

    sources = [synth_tile(s, 512)[0] for s in (1, 2)]
    path = write_mosaic_slide(tmp_path / "m.tif", (4096, 3072), 0.25, sources, block=512, tissue_fraction=0.4)
    slide = open_slide(path)
    assert slide.mpp == (0.25, 0.25) and slide.level_dimensions[0] == (3072, 4096)
    thumbnail = read_thumbnail(slide, slide.mpp, 8.0)
    assert thumbnail.shape == (128, 96, 3)
    settings = TissueSettings(dilation_um=0.0, min_area_um2=1000.0)
    mask = detect_tissue(thumbnail, 8.0, settings)
    truth = np.kron(tissue_blocks(8, 6, 0.4, 0), np.ones((16, 16), bool))  # 512 px blocks at 8 um/px
    assert (mask & truth).sum() / (mask | truth).sum() > 0.85
    assert outline(thumbnail, mask).shape == thumbnail.shape

    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 2, (96, 128, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(glass, 8.0).any()
    all_tissue = read_thumbnail(ArraySlide(synth_tile(3, 1024)[0], 0.25), (0.25, 0.25), 8.0)
    assert detect_tissue(all_tissue, 8.0).mean() > 0.95

    from nucleiseg.io import write_image

    write_image(tmp_path / "mask.png", np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((40, 30), np.uint8)))
    assert read_mask(tmp_path / "mask.png", (128, 96)).sum() == 2 * 64 * 48
    write_image(tmp_path / "wide.png", np.full((10, 40), 255, np.uint8))
    with pytest.raises(ValueError, match=r"--mask .*wide\.png: aspect ratio"):
        read_mask(tmp_path / "wide.png", (128, 96))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_slide_stain_measured_once_maps_every_region_alike(method: str) -> None:
    from nucleiseg.stain import fit_normalizer, fixed_source

    reference = fit_normalizer(synth_tile(11, 256)[0], method)
    image = synth_tile(12, (300, 256))[0]
    fixed = fixed_source(reference, image)
    whole = fixed.transform(image)
    # Measured on the image itself, it is the tile method; applied in pieces, it gives the same pixels.
    assert np.abs(whole.astype(int) - reference.transform(image).astype(int)).max() <= 1
    pieces = np.concatenate([fixed.transform(image[:77]), fixed.transform(image[77:])])
    assert np.abs(pieces.astype(int) - whole.astype(int)).max() <= 1


def test_synth_slide_command_writes_a_readable_slide(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nucleiseg.cli import app

    out = tmp_path / "synthetic.tif"
    args = ["synth-slide", str(out), "--size", "1500", "--block", "256", "--sources", "2", "--tissue", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    slide = open_slide(out)
    assert slide.level_dimensions[0] == (1500, 1500) and slide.mpp == (0.25, 0.25)
    assert "1500x1500 px at 0.25 um/px" in result.output
    result = CliRunner().invoke(app, [*args[:2], "--size", "1500", "--block", "100"])
    assert result.exit_code == 2 and "block (100) must be divisible by 16" in result.output
    result = CliRunner().invoke(app, [*args, "--no-mpp"])
    assert result.exit_code == 0 and open_slide(out).mpp is None
