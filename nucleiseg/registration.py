"""Whether a pipeline run may add a version to the model registry: plain runs do, DVC experiments only if asked.

Definitions
-----------
DVC experiment
    A pipeline run started by ``dvc exp run`` (in the workspace, with ``--temp``, or from the queue). DVC puts
    ``DVC_EXP_NAME`` (the experiment's name) and ``DVC_EXP_BASELINE_REV`` (the commit it starts from) in the
    environment of every stage command of such a run (``dvc/repo/experiments/queue/base.py``, DVC 3), and in
    neither of a plain ``dvc repro``. :func:`dvc_experiment` reads them.
register mode
    ``promote.registration`` in params.yaml (:data:`RegisterMode`): ``auto`` registers every run except a DVC
    experiment, so that ablations and sweeps (``dvc exp run -S train.beta=0``) neither add versions nor take
    ``@champion``; ``always`` registers experiments too (the opt-in: ``dvc exp run -S promote.registration=always``);
    ``never`` registers nothing.
registration decision
    :class:`RegistrationDecision`: register or not, and why, in words that the register stage prints and
    records in ``reports/registry.json`` when it skips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

RegisterMode = Literal["auto", "always", "never"]
REGISTER_MODES: tuple[str, ...] = get_args(RegisterMode)

EXPERIMENT_NAME_VAR = "DVC_EXP_NAME"
EXPERIMENT_BASELINE_VAR = "DVC_EXP_BASELINE_REV"
OPT_IN = "dvc exp run -S promote.registration=always"


@dataclass(frozen=True)
class RegistrationDecision:
    """Whether to register the trained model; ``experiment`` names the DVC experiment, None outside one."""

    register: bool
    mode: str
    experiment: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dvc_experiment(environ: Mapping[str, str]) -> str | None:
    """The name of the DVC experiment a stage command runs in (from its environment), or None outside one.

    An experiment whose name DVC did not pass (only its baseline) is named by its baseline commit.
    """
    name = environ.get(EXPERIMENT_NAME_VAR, "").strip()
    baseline = environ.get(EXPERIMENT_BASELINE_VAR, "").strip()
    if name:
        return name
    return f"baseline {baseline[:7]}" if baseline else None


def registration_decision(mode: RegisterMode, environ: Mapping[str, str]) -> RegistrationDecision:
    """Decide, from ``promote.registration`` and the environment of the command, whether to register the model."""
    if mode not in REGISTER_MODES:
        raise ValueError(f"promote.registration: {mode!r} is not one of {', '.join(REGISTER_MODES)}")
    experiment = dvc_experiment(environ)
    where = f"DVC experiment {experiment!r}" if experiment else "a plain run (not a DVC experiment)"
    if mode == "never":
        return RegistrationDecision(False, mode, experiment, f"skipped: promote.registration is never ({where})")
    if mode == "always" or experiment is None:
        return RegistrationDecision(True, mode, experiment, f"registered: promote.registration is {mode} ({where})")
    return RegistrationDecision(
        False,
        mode,
        experiment,
        f"skipped (experiment): {where} does not touch the registry under promote.registration auto; "
        f"`{OPT_IN}` registers it",
    )


class RegistrationRecordError(ValueError):
    """A registration record (``reports/registry.json``) that cannot say which model a pipeline run produced."""


def model_from_record(record: Mapping[str, Any], where: str = "registry record") -> str:
    """The model URI the rest of a pipeline run should use, from the register stage's record.

    A registered run uses the version that holds ``@champion`` after the gate, pinned by number
    (``models:/<name>/<version>``, so the stage's outputs depend on the record and not on an alias that can move
    later); a run whose registration was skipped (a DVC experiment under ``promote.registration: auto``) uses
    its own logged model (``source``), so an experiment's batch outputs are its model's, and a fresh clone's
    first experiment needs no champion.
    """
    name = record.get("model_name")
    if record.get("version") is not None:
        champion = (record.get("aliases") or {}).get("champion")
        if not name or champion is None:
            raise RegistrationRecordError(f"{where}: a registered run without model_name or a champion alias")
        return f"models:/{name}/{champion}"
    source = record.get("source")
    if not source:
        raise RegistrationRecordError(f"{where}: registration skipped and no source model recorded")
    return str(source)
