"""DVC as a user meets it: a fresh clone of this repository, and `dvc exp run` experiments in a real DVC repo.

A fresh clone (of HEAD, so the committed state) resolves ``data.dvc`` from the committed default remote, keeps
the pipeline's metrics and plots committable, and declares the model as a DVC artifact. The register stage adds
no registry version inside a DVC experiment unless ``promote.registration`` is ``always``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from nucleiseg.params import load_params
from nucleiseg.plots_template import TEMPLATE_NAME, template_html
from nucleiseg.registration import (
    EXPERIMENT_BASELINE_VAR,
    EXPERIMENT_NAME_VAR,
    RegistrationRecordError,
    dvc_experiment,
    model_from_record,
    registration_decision,
)

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
}


def _env() -> dict[str, str]:
    """The tools of this venv first on PATH, offline, and outside any DVC experiment of the caller."""
    env = {**os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for var in (EXPERIMENT_NAME_VAR, EXPERIMENT_BASELINE_VAR, "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _ok(args: list[str], cwd: Path) -> str:
    done = _run(args, cwd)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``git clone`` of this repository's HEAD, as a new user gets it (pending edits in the checkout are not in it)."""
    root = tmp_path_factory.mktemp("clone") / "nucleiseg"
    _ok(["git", "clone", "-q", str(REPO), str(root)], REPO)
    return root


def test_fresh_clone_pulls_the_versioned_data(fresh_clone: Path):
    """``data.dvc`` resolves on a fresh clone: its objects are in the committed default remote, no network."""
    before = _run(["dvc", "status", "data.dvc"], fresh_clone)
    assert "not in cache" in before.stdout  # nothing fetched yet: the state the README's `dvc pull` fixes
    _ok(["dvc", "fetch", "data.dvc"], fresh_clone)
    pulled = _ok(["dvc", "pull", "data.dvc"], fresh_clone)
    assert "data" in pulled
    outs = yaml.safe_load((fresh_clone / "data.dvc").read_text())["outs"]
    files = [p for p in (fresh_clone / "data").rglob("*") if p.is_file()]
    assert len(files) == outs[0]["nfiles"] and sum(p.stat().st_size for p in files) == outs[0]["size"]
    assert "Data and pipelines are up to date" in _ok(["dvc", "status", "data.dvc"], fresh_clone)
    assert "in sync" in _ok(["dvc", "status", "--cloud", "data.dvc"], fresh_clone)
    # Pulling leaves git clean: data/ and the local cache are ignored.
    assert _ok(["git", "status", "--porcelain", "--untracked-files=all"], fresh_clone) == ""


def test_fresh_clone_metrics_and_plots_are_committable(fresh_clone: Path):
    """What a run leaves for git (dvc.lock, uncached metrics, plots and reports) is not ignored by git."""
    from dvc.repo import Repo

    with Repo(str(fresh_clone)) as repo:
        uncached = sorted(str(out.fs_path) for out in repo.index.outs if not out.use_cache)
        metrics = {str(out.fs_path) for out in repo.index.outs if out.metric}
    assert metrics and metrics <= set(uncached)
    paths = [str(fresh_clone / "dvc.lock"), *uncached]
    ignored = _run(["git", "check-ignore", *paths], fresh_clone)
    assert ignored.returncode == 1 and ignored.stdout == "", f"ignored by git: {ignored.stdout}"


def test_fresh_clone_declares_the_model_artifact(fresh_clone: Path):
    """dvc.yaml's ``artifacts:`` names the train stage's checkpoint as a DVC model artifact."""
    from dvc.repo import Repo

    settings = load_params(fresh_clone / "params.yaml")
    with Repo(str(fresh_clone)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
        train_outs = {str(Path(out.def_path)) for out in repo.stage.collect("train")[0].outs}
    model = artifacts["nucleiseg"]
    assert model.type == "model" and model.desc and model.labels
    assert model.path == f"{settings.train.out_dir}/best.pt" and model.path in train_outs


# ----------------------------------------------------------------------------------------------------------
# Plots offline
# ----------------------------------------------------------------------------------------------------------


class _Resources(HTMLParser):
    """Every URL a page would load: the src and href of its tags (an inline script's text is not a tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]


def _external(page: str) -> list[str]:
    parser = _Resources()
    parser.feed(page)
    return [url for url in parser.urls if "://" in url or url.startswith("//")]


def test_plots_template_is_configured_current_and_self_contained(fresh_clone: Path):
    """``dvc plots show`` uses the committed page, which inlines the installed Vega bundle and loads nothing."""
    from dvc.repo import Repo

    with Repo(str(fresh_clone)) as repo:
        assert repo.config["plots"]["html_template"] == TEMPLATE_NAME
    committed = (fresh_clone / ".dvc" / TEMPLATE_NAME).read_text()
    assert committed == template_html(), "stale: run scripts/plots_template.py (vl-convert-python changed?)"
    assert "{plot_divs}" in committed and "{scripts}" not in committed  # no CDN scripts for DVC to add
    assert _external(committed) == []


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dvc plots show`` in a real DVC repo with this project's plots settings and plot templates."""
    root = tmp_path_factory.mktemp("plots")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        _ok(cmd, root)
    shutil.copy2(REPO / ".dvc" / TEMPLATE_NAME, root / ".dvc" / TEMPLATE_NAME)
    _ok(["dvc", "config", "plots.html_template", TEMPLATE_NAME], root)
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_f1": e / 10} for e in range(5)]
    (root / "history.json").write_text(json.dumps(history))
    classes = ("tumor", "lymphocyte", "stroma")
    (root / "confusion.json").write_text(json.dumps([{"actual": a, "predicted": p} for a in classes for p in classes]))
    plots = [
        {"history.json": {"x": "epoch", "y": ["train_loss", "val_f1"]}},
        {"confusion.json": {"template": "confusion", "x": "actual", "y": "predicted"}},
    ]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    _ok(["dvc", "plots", "show", "-o", "out"], root)
    return root / "out" / "index.html"


def test_dvc_plots_page_loads_nothing(plots_page: Path):
    page = plots_page.read_text()
    assert page.count("vegaEmbed(") == 2 and _external(page) == []


def test_dvc_plots_render_offline_in_a_browser(plots_page: Path):
    """Headless Chromium draws both Vega plots from the page alone (this machine reaches no CDN)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom"]
    dom = subprocess.run([*args, plots_page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="marks"') == 2  # vega's rendered <svg>/<canvas>, one per plot


# ----------------------------------------------------------------------------------------------------------
# Experiments and the registry
# ----------------------------------------------------------------------------------------------------------


def test_registration_decision_from_the_environment():
    plain: dict[str, str] = {}
    experiment = {EXPERIMENT_NAME_VAR: "beta-zero", EXPERIMENT_BASELINE_VAR: "0123456789abcdef"}
    assert dvc_experiment(plain) is None
    assert dvc_experiment(experiment) == "beta-zero"
    assert dvc_experiment({EXPERIMENT_BASELINE_VAR: "0123456789abcdef"}) == "baseline 0123456"

    assert registration_decision("auto", plain).register
    skipped = registration_decision("auto", experiment)
    assert not skipped.register and skipped.experiment == "beta-zero"
    assert skipped.reason.startswith("skipped (experiment)") and "promote.registration=always" in skipped.reason
    assert registration_decision("always", experiment).register
    assert not registration_decision("never", plain).register
    with pytest.raises(ValueError, match=r"promote\.registration"):
        registration_decision("sometimes", plain)  # type: ignore[arg-type]


def test_batch_stage_model_follows_the_registry_record():
    """The batch stage predicts with the champion the gate left, pinned by version; in an experiment (not
    registered) with the experiment's own model, so it needs no champion and shows that model's outputs."""
    registered = {"model_name": "nucleiseg", "version": "4", "aliases": {"challenger": "4", "champion": "3"}}
    assert model_from_record(registered) == "models:/nucleiseg/3"
    skipped = {"model_name": "nucleiseg", "version": None, "source": "models:/m-0123abcd"}
    assert model_from_record(skipped) == "models:/m-0123abcd"
    with pytest.raises(RegistrationRecordError, match="champion"):
        model_from_record({"model_name": "nucleiseg", "version": "1", "aliases": {}}, "reports/registry.json")
    with pytest.raises(RegistrationRecordError, match="no source"):
        model_from_record({"model_name": "nucleiseg", "version": None}, "reports/registry.json")


def test_batch_names_a_bad_registry_record(tmp_path: Path):
    record = tmp_path / "registry.json"
    record.write_text("[1, 2]")
    (tmp_path / "in").mkdir()
    result = _run(["nucleiseg", "batch", "in", "out", "--model-from", str(record)], tmp_path)
    assert result.returncode == 1 and f"{record}: not a registry record" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def register_repo(tmp_path: Path) -> Path:
    """A real git + DVC repo whose one stage is this project's ``nucleiseg register`` (no model trained)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    stage = {
        "cmd": "nucleiseg register --out reports/registry.json",
        "params": ["promote"],
        "outs": [{"reports/registry.json": {"cache": False}}],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": stage}}, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "c"]):
        _ok(cmd, root)
    return root


def test_dvc_experiments_do_not_register_unless_asked(register_repo: Path):
    """``dvc exp run`` records a skipped registration and never opens the registry; opting in does register (here:
    tries to, and stops at the missing trained model); a plain ``dvc repro`` registers too."""
    root = register_repo
    _ok(["dvc", "exp", "run", "-n", "ablation-1"], root)
    report = json.loads((root / "reports" / "registry.json").read_text())
    assert report["version"] is None and report["registration"]["register"] is False
    assert report["registration"]["experiment"] == "ablation-1"
    assert report["registration"]["reason"].startswith("skipped (experiment)")
    assert not (root / "mlruns").exists()  # the registry's store was never opened

    opted_in = _run(["dvc", "exp", "run", "-S", "promote.registration=always"], root)
    assert opted_in.returncode != 0 and "model_uri: not found" in opted_in.stdout + opted_in.stderr

    plain = _run(["dvc", "repro", "--force"], root)
    assert plain.returncode != 0 and "model_uri: not found" in plain.stdout + plain.stderr
