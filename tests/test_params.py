"""params.yaml is the single source of settings: validated once, errors name the key."""

from pathlib import Path

import pytest

from nucleiseg.params import Params, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.name == "resunet34"
    assert params.loss.w0 == 10.0 and params.loss.sigma == 5.0
    assert params.train.lr == 2e-3 and params.train.batch_size == 8 and params.train.schedule == "onecycle"


def test_paper_preset_restores_the_papers_method_over_the_demo_settings(tmp_path):
    """The demo deviates from the paper (one-cycle lr, no perceptual loss, watershed); the paper preset sets
    every one of those keys back, so applying it to this params.yaml gives the paper's recipe."""
    import shutil

    from nucleiseg.presets import apply_settings

    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    apply_settings(REPO / "presets" / "paper.yaml", target)
    params = load_params(target)
    assert (params.train.epochs, params.train.lr, params.train.schedule) == (300, 1e-4, "constant")
    assert params.train.beta == 0.1 and params.train.select == "best"
    assert (params.post.method, params.post.classify) == ("paper", "vote")


def test_overrides_are_parsed_as_yaml(tmp_path):
    params = load_params(REPO / "params.yaml", ["train.beta=0", "augmentation.scale=[1.0, 1.25]", "stain.method=none"])
    assert params.train.beta == 0.0
    assert params.augmentation.scale == (1.0, 1.25)
    assert params.stain.method == "none"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.name=segformer", "model.name"),
        ("train.beta=-0.5", "train.beta"),
        ("augmentation.crop=320", "patches.size"),
        ("augmentation.crop=100", "augmentation.crop"),
        ("train.lr=0", "train.lr"),
        ("infer.overlap=300", "overlap"),
        ("nonsense.key=1", "nonsense"),
        ("train.epoch=3", "train.epoch"),
    ],
)
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", [override])
    assert key in str(err.value)


def test_missing_or_malformed_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml"):
        load_params(bad)


def test_flat_and_digest_are_stable():
    a, b = Params(), Params()
    assert a.flat()["train.lr"] == 1e-4
    assert a.digest() == b.digest()
    assert load_params(None, ["train.seed=1"]).digest() != a.digest()


@pytest.mark.parametrize("override", ["loss.w0=.inf", "train.lr=.nan", "augmentation.scale=[1.0, .inf]"])
def test_non_finite_settings_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ParamsError, match=rf"{key}.*finite"):
        load_params(None, [override])


def test_duplicate_keys_are_refused_naming_the_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("loss:\n  w0: 10.0\n  sigma: 5.0\n  w0: 1.0\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: duplicate key 'w0' on line 4 \(first on line 2\)"):
        load_params(path)
    with pytest.raises(ParamsError, match="duplicate key 'w0'"):
        load_params(None, ["loss={w0: 1, w0: 2}"])


@pytest.mark.parametrize(
    "metric", ["all.fp", "all.n_pred", "tumor.tp", "n_images", "all.f2", "classification.confusion"]
)
def test_promotion_metric_needs_a_known_direction(metric):
    with pytest.raises(ParamsError, match=rf"promote\.metric.*{metric}.*known direction"):
        load_params(None, [f"promote.metric={metric}"])


def test_promotion_metric_of_either_direction_is_accepted():
    params = load_params(None, ["promote.metric=all.hausdorff", "promote.tie_breaker=mpq_plus"])
    assert (params.promote.metric, params.promote.tie_breaker) == ("all.hausdorff", "mpq_plus")
