"""Post-processing: hand-made maps, and the vectorised steps against slow direct implementations."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import measure, morphology

from nucleiseg.postprocess import dilate_into_background, disk_offsets, nuclei_instances, postprocess

BG, TUMOR, LYMPH, STROMA, CONTOUR = 0, 1, 2, 3, 4


def one_hot(classes: np.ndarray) -> np.ndarray:
    """(5, H, W) 'probabilities' whose argmax is ``classes``."""
    probs = np.full((5, *classes.shape), 0.05, dtype=np.float32)
    np.put_along_axis(probs, classes[None].astype(np.int64), 0.8, axis=0)
    return probs


def square(classes: np.ndarray, y: int, x: int, side: int, value: int) -> None:
    classes[y : y + side, x : x + side] = value


# ----------------------------------------------------------------------------------------------------------
# Hand-made maps
# ----------------------------------------------------------------------------------------------------------


def test_touching_nuclei_split_by_contour_get_their_own_ids_and_classes():
    classes = np.zeros((30, 40), np.uint8)
    square(classes, 5, 5, 8, TUMOR)
    square(classes, 5, 14, 8, LYMPH)
    classes[5:13, 13] = CONTOUR  # the contour between the two nuclei
    square(classes, 18, 25, 6, STROMA)
    label = postprocess(one_hot(classes), min_area=20, radius=0)
    assert label.dtype == np.int32
    # Raster order of first pixels: tumor (5, 5), lymphocyte (5, 14), stroma (18, 25).
    assert set(np.unique(label)) == {0, 3, 1, 2}
    assert (label[5:13, 5:13] == 3).all() and (label[5:13, 14:22] == 1).all() and (label[18:24, 25:31] == 2).all()
    assert (label[classes == CONTOUR] == 0).all()


def test_class_is_the_majority_vote_and_ties_go_to_tumor_then_lymphocyte():
    classes = np.zeros((20, 60), np.uint8)
    square(classes, 2, 2, 6, STROMA)
    classes[2:4, 2:8] = LYMPH  # 12 lymphocyte vs 24 stroma pixels: stroma
    square(classes, 2, 20, 6, LYMPH)
    classes[2:5, 20:26] = TUMOR  # 18 vs 18: tie -> tumor
    square(classes, 2, 40, 6, STROMA)
    classes[2:5, 40:46] = LYMPH  # 18 vs 18: tie -> lymphocyte (before stroma)
    label = postprocess(classes, min_area=1, radius=0)
    assert np.unique(label[2:8, 2:8]) % 3 == [2]
    assert np.unique(label[2:8, 20:26]) % 3 == [0]
    assert np.unique(label[2:8, 40:46]) % 3 == [1]
    assert len(np.unique(label)) == 4  # one id per nucleus, whatever its pixels said


def test_small_objects_are_removed_per_nucleus_at_min_area():
    classes = np.zeros((20, 40), np.uint8)
    classes[2:6, 2:7] = TUMOR  # 20 pixels: kept
    classes[2:6, 12:17] = LYMPH
    classes[5, 12] = BG  # 19 pixels: removed
    classes[10:12, 30:31] = STROMA  # 2 pixels: removed
    label = postprocess(classes, min_area=20, radius=0)
    assert set(np.unique(label)) == {0, 3}
    assert (label[2:6, 2:7] == 3).all()
    assert set(np.unique(postprocess(classes, min_area=2, radius=0))) == {0, 3, 1, 2}


def test_nuclei_are_eight_connected():
    classes = np.zeros((10, 10), np.uint8)
    classes[2, 2] = classes[3, 3] = classes[4, 4] = TUMOR  # a diagonal line: one nucleus
    label = postprocess(classes, min_area=3, radius=0)
    assert len(np.unique(label)) == 2 and label[2, 2] == label[4, 4] == 3


def test_dilation_grows_into_background_only_and_never_merges_neighbours():
    classes = np.zeros((20, 30), np.uint8)
    square(classes, 5, 5, 6, TUMOR)  # columns 5-10
    square(classes, 5, 12, 6, LYMPH)  # columns 12-17: one background column (11) between them
    square(classes, 5, 18, 6, STROMA)  # touching the lymphocyte directly (no contour): merged by CC...
    classes[5:11, 18] = CONTOUR  # ...unless a contour separates them
    label = postprocess(classes, min_area=1, radius=1)
    tumor, lymph, stroma = 3, 1, 2
    # The shared background column goes to the larger id (the reference's grey-dilation choice)...
    assert (label[5:11, 11] == max(tumor, lymph)).all()
    # ...nuclei keep all their own pixels...
    assert (label[5:11, 5:11] == tumor).all() and (label[5:11, 12:18] == lymph).all()
    # ...and the contour column between lymphocyte and stroma goes to the larger id (stroma, 2 > 1).
    assert (label[5:11, 18] == max(lymph, stroma)).all() and (label[5:11, 19:24] == stroma).all()
    assert (label[5:11, 12:18] == lymph).all()
    # Growth is the disk of radius 1 (a cross): the tumor gains its top row and left column, not corners.
    assert (label[4, 5:11] == tumor).all() and (label[5:11, 4] == tumor).all() and label[4, 4] == 0


def test_dilation_takes_the_nearest_nucleus_before_the_largest_id():
    label = np.zeros((1, 9), np.int32)
    label[0, 0] = 6
    label[0, 4] = 3  # pixel 2 is 2 from id 6 and 2 from id 3: tie -> 6; pixel 3 is 1 from id 3: nearest -> 3
    out = dilate_into_background(label, radius=2)
    assert out.tolist() == [[6, 6, 6, 3, 3, 3, 3, 0, 0]]
    assert label.tolist() == [[6, 0, 0, 0, 3, 0, 0, 0, 0]]  # not modified


def test_probabilities_and_class_map_give_the_same_label_and_empty_maps_give_empty_labels():
    rng = np.random.default_rng(0)
    probs = rng.random((5, 40, 50)).astype(np.float32)
    assert np.array_equal(postprocess(probs, 5, 1), postprocess(probs.argmax(0).astype(np.uint8), 5, 1))
    assert not postprocess(np.zeros((30, 30), np.uint8)).any()
    with pytest.raises(ValueError, match="5 maps"):
        postprocess(np.zeros((4, 10, 10), np.float32))
    with pytest.raises(ValueError, match="0-4"):
        postprocess(np.full((10, 10), 7, np.uint8))


def test_disk_offsets_are_skimage_disks():
    for radius in range(1, 5):
        disk = morphology.disk(radius).astype(bool)
        mine = np.zeros_like(disk)
        mine[radius, radius] = True
        for _, offsets in disk_offsets(radius):
            for dy, dx in offsets:
                mine[radius + dy, radius + dx] = True
        assert np.array_equal(mine, disk)


# ----------------------------------------------------------------------------------------------------------
# Against slow direct implementations
# ----------------------------------------------------------------------------------------------------------


def random_class_map(rng: np.random.Generator, shape=(80, 90), n=25, gap=0) -> np.ndarray:
    """Blobs of mixed classes (a dominant one plus noise), some touching, with contour noise."""
    classes = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(1, 7)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if gap:  # keep blobs apart: skip one that comes within `gap` pixels of another
            near = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + gap) ** 2
            if classes[near].any():
                continue
        main = rng.integers(1, 4)
        values = np.where(rng.random(disk.sum()) < 0.7, main, rng.integers(1, 4, disk.sum()))
        classes[disk] = values
    if not gap:
        classes[rng.random(shape) < 0.05] = CONTOUR
    return classes


def slow_instances(classes: np.ndarray, min_area: int) -> tuple[np.ndarray, dict[int, int]]:
    """Steps 2-4 one nucleus at a time."""
    components = measure.label((classes >= 1) & (classes <= 3), connectivity=2)
    out = np.zeros_like(components)
    class_of = {}
    for i in range(1, components.max() + 1):
        pixels = classes[components == i]
        if pixels.size < min_area:
            continue
        counts = [np.sum(pixels == c) for c in (1, 2, 3)]
        out[components == i] = i
        class_of[i] = int(np.argmax(counts))
    return out, class_of


def slow_dilation(label: np.ndarray, radius: int) -> np.ndarray:
    """Every background pixel, one at a time: the nearest nucleus pixel within the disk, ties to the larger id."""
    out = label.copy()
    ys, xs = np.nonzero(label)
    for y, x in zip(*np.nonzero(label == 0), strict=True):
        d2 = (ys - y) ** 2 + (xs - x) ** 2
        within = d2 <= radius * radius
        if within.any():
            nearest = d2 == d2[within].min()
            out[y, x] = label[ys[nearest], xs[nearest]].max()
    return out


def reference_code(classes: np.ndarray, min_area: int, radius: int) -> np.ndarray:
    """The reference test.py's steps (skimage, per class; grey dilation of the label)."""
    inside = np.where(classes == CONTOUR, 0, classes)
    labeled = measure.label(inside > 0)
    n = labeled.max()
    votes = np.zeros((n + 1, 4), int)
    np.add.at(votes, (labeled.ravel(), inside.ravel()), 1)
    cls = np.argmax(votes[:, 1:], axis=1) + 1
    per_class = []
    for c in (1, 2, 3):
        mask = np.isin(labeled, np.flatnonzero((cls == c) & (np.arange(n + 1) > 0)))
        # Objects smaller than min_area go (skimage >= 0.26 spells it max_size = min_area - 1).
        mask = morphology.remove_small_objects(mask, max_size=max(min_area - 1, 0))
        per_class.append(measure.label(mask))
    tumor, lymph, stroma = per_class
    combined = tumor * 3 + (lymph * 3 - 2) * (lymph > 0) + (stroma * 3 - 1) * (stroma > 0)
    return morphology.dilation(combined, morphology.disk(radius))


@pytest.mark.parametrize("seed", range(6))
def test_instances_and_classes_match_the_slow_per_nucleus_loop(seed):
    classes = random_class_map(np.random.default_rng(seed))
    for min_area in (0, 10, 30):
        fast, fast_classes = nuclei_instances(classes, min_area)
        slow, slow_classes = slow_instances(classes, min_area)
        assert np.array_equal(fast, slow)
        assert fast_classes == slow_classes


@pytest.mark.parametrize("seed", range(6))
def test_dilation_matches_the_slow_per_pixel_rule(seed):
    rng = np.random.default_rng(seed)
    label = postprocess(random_class_map(rng), min_area=5, radius=0)
    assert len(np.unique(label)) > 10
    for radius in (1, 2, 3):
        assert np.array_equal(dilate_into_background(label, radius), slow_dilation(label, radius))


def test_dilation_works_across_row_blocks(monkeypatch):
    import nucleiseg.postprocess as pp

    label = postprocess(random_class_map(np.random.default_rng(9), shape=(70, 60), n=40), 3, 0)
    whole = dilate_into_background(label, 2)
    monkeypatch.setattr(pp, "_STRIP_ROWS", 7)  # many blocks, halos crossing block borders
    assert np.array_equal(dilate_into_background(label, 2), whole)
    inplace = label.copy()
    assert dilate_into_background(inplace, 2, inplace=True) is inplace
    assert np.array_equal(inplace, whole)


@pytest.mark.parametrize("seed", range(4))
def test_equals_the_reference_code_when_nuclei_are_apart(seed):
    """Nuclei more than 2 * radius apart: the reference's grey dilation cannot merge them, and the results
    (ids included) must be identical."""
    classes = random_class_map(np.random.default_rng(seed), shape=(120, 120), n=60, gap=4)
    for min_area, radius in ((20, 1), (5, 1), (10, 0)):
        ours = postprocess(classes, min_area=min_area, radius=radius)
        assert ours.any()
        assert np.array_equal(ours, reference_code(classes, min_area, radius))


# ----------------------------------------------------------------------------------------------------------
# Beyond the paper: the watershed and the class by probability
# ----------------------------------------------------------------------------------------------------------


def disc_maps(centres: list[tuple[int, int]], radius: float, shape: tuple[int, int], klass: int = TUMOR) -> np.ndarray:
    """(5, H, W) maps of overlapping discs: inside probability 0.9 in every disc, no contour predicted."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = np.zeros(shape, bool)
    for cy, cx in centres:
        inside |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    probs = np.zeros((5, *shape), np.float32)
    probs[0] = np.where(inside, 0.1, 0.9)
    probs[klass] = np.where(inside, 0.9, 0.1)
    return probs


def test_watershed_splits_touching_nuclei_the_paper_merges():
    # Two discs of radius 8 whose centres are 14 px apart overlap on a narrow neck; the network predicted
    # the contour between them too weakly for the argmax, but the inside-minus-contour cores are cut there.
    probs = disc_maps([(20, 20), (20, 34)], 8, (40, 56))
    # a half-predicted contour across the neck: inside still wins the argmax (0.55 vs 0.4)
    probs[4, 12:29, 27] = 0.4
    probs[TUMOR, 12:29, 27] = 0.55
    probs[0, 12:29, 27] = 0.05
    paper = postprocess(probs, min_area=10, radius=0)
    assert len(np.unique(paper)) - 1 == 1  # the argmax keeps the neck inside: one merged blob
    split = postprocess(probs, min_area=10, radius=0, method="watershed", marker_threshold=0.3)
    ids = np.unique(split)[1:]
    assert len(ids) == 2
    assert split[20, 20] != split[20, 34] and split[20, 20] > 0 and split[20, 34] > 0
    # the cut lies on the neck, and no nucleus pixel is lost
    assert {split[20, 25], split[20, 29]} == {split[20, 20], split[20, 34]}
    assert ((split > 0) == (probs[1:4].sum(0) > 0.5)).all()


def test_watershed_keeps_nuclei_without_a_confident_core():
    probs = disc_maps([(10, 10)], 5, (24, 24))
    probs[TUMOR] = np.where(probs[TUMOR] > 0.5, 0.55, 0.1)  # inside 0.55, contour 0.35: no core above 0.3
    probs[4] = np.where(probs[TUMOR] > 0.5, 0.35, 0.0)
    probs[0] = 1 - probs[TUMOR] - probs[4]
    label = postprocess(probs, min_area=5, radius=0, method="watershed", marker_threshold=0.3)
    assert len(np.unique(label)) == 2 and label[10, 10] > 0


def test_watershed_pools_the_inside_classes_for_the_mask():
    # Each inside class alone is below background (0.3 < 0.4), together they make a nucleus (0.6 > 0.5).
    probs = np.zeros((5, 20, 20), np.float32)
    probs[0] = 1.0
    probs[:, 5:15, 5:15] = np.array([0.4, 0.0, 0.3, 0.3, 0.0], np.float32)[:, None, None]
    assert postprocess(probs, min_area=1, radius=0).max() == 0  # the paper's 5-way argmax: background
    label = postprocess(probs, min_area=1, radius=0, method="watershed")
    assert (label[5:15, 5:15] > 0).all() and len(np.unique(label)) == 2


def test_class_by_probability_follows_the_summed_confidence_not_the_pixel_count():
    # 60 pixels lean lymphocyte by a hair (0.34 vs 0.33), 40 pixels are surely stroma (0.9): the vote says
    # lymphocyte, the summed probability says stroma.
    probs = np.zeros((5, 10, 10), np.float32)
    probs[LYMPH], probs[STROMA], probs[0] = 0.34, 0.33, 0.33
    probs[:, 6:, :] = np.array([0.05, 0.0, 0.05, 0.9, 0.0], np.float32)[:, None, None]
    inside = np.zeros((5, 14, 14), np.float32)
    inside[0] = 1.0
    inside[:, 2:12, 2:12] = probs
    inside[0, 2:12, 2:12] = 0.0  # every nucleus pixel is inside for the argmax (background emptied)
    vote = postprocess(inside, min_area=1, radius=0, classify="vote")
    prob = postprocess(inside, min_area=1, radius=0, classify="probability")
    assert np.unique(vote[vote > 0]) % 3 == [1] and np.unique(prob[prob > 0]) % 3 == [2]
    assert ((vote > 0) == (prob > 0)).all()  # the same nuclei, only the class differs


def test_bad_post_settings_are_named():
    probs = one_hot(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="method"):
        postprocess(probs, method="magic")
    with pytest.raises(ValueError, match="classify"):
        postprocess(probs, classify="guess")
    with pytest.raises(ValueError, match="probability maps"):
        postprocess(np.zeros((8, 8), np.uint8), method="watershed")
