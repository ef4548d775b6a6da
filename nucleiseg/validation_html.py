"""A self-contained HTML page of a dataset validation, readable offline beside Great Expectations' Data Docs.

Definitions
-----------
validation page
    ``report.html`` in the folder ``nucleiseg validate`` writes (:func:`nucleiseg.validation.validate_manifest`):
    the verdict, then one row per expectation of the suite, in the suite's order, with its result (pass, FAIL
    for a critical expectation that failed, warning for a warning one), what it checks, the manifest column,
    what was observed (the value of a table-level check; for a per-tile check, how many tiles broke it out of
    how many), and the offending files with their values. It is made from GX's validation result (passed and
    failed expectations) and the :class:`nucleiseg.validation.ValidationReport` (the files named), with inline
    styles only: no script, stylesheet, font or image is loaded. GX's Data Docs (``data_docs/index.html``)
    load Bootstrap, jQuery and Vega from CDNs and are blank without a network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nucleiseg.validation import ExpectationFailure, ValidationReport

MAX_FILES_SHOWN = 25  # per expectation; the rest is counted (report.json lists every file)

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #f0f0f0; }
.pass { color: #1a7f37; } .fail { color: #b3261e; font-weight: bold; } .warning { color: #8a5a00; font-weight: bold; }
.verdict-valid { color: #1a7f37; } .verdict-invalid { color: #b3261e; }
code { font-size: 13px; }
"""


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _observed(result: Mapping[str, Any]) -> str:
    """What a check saw: a table-level value, or how many tiles broke a per-tile check."""
    res = result.get("result") or {}
    exception = result.get("exception_info") or {}
    if exception.get("raised_exception"):
        return f"the check raised: {exception.get('exception_message')}"
    if "observed_value" in res:
        return _value(res["observed_value"])
    if "unexpected_count" in res and "element_count" in res:
        return f"{res['unexpected_count']} of {res['element_count']} tiles fail"
    return ""


def _files(failure: ExpectationFailure | None) -> str:
    if failure is None:
        return ""
    shown = [
        f"{escape(name)} (<code>{escape(_value(value))}</code>)"
        for name, value in zip(failure.files[:MAX_FILES_SHOWN], failure.values, strict=False)
    ]
    more = len(failure.files) - len(shown)
    if more > 0:
        shown.append(f"and {more} more (report.json)")
    shown += [escape(detail) for detail in failure.details[:MAX_FILES_SHOWN]]
    return "<br>".join(shown)


def _failure_for(config: Mapping[str, Any], failures: Sequence[ExpectationFailure]) -> ExpectationFailure | None:
    """The report's entry for a failed expectation (same GX type, column and description)."""
    column = (config.get("kwargs") or {}).get("column")
    description = config.get("description") or config["type"]
    for failure in failures:
        if (failure.expectation, failure.column, failure.description) == (config["type"], column, description):
            return failure
    return None


def validation_html(gx_result: Mapping[str, Any], report: ValidationReport) -> str:
    """The validation page (see the module's definitions) of one GX result and its report, as a string."""
    failures = [*report.failures, *report.warnings]
    rows = []
    for result in gx_result.get("results", []):
        config = result["expectation_config"]
        severity = str(config.get("severity") or "critical")
        if result["success"]:
            status = '<span class="pass">pass</span>'
        elif severity == "critical":
            status = '<span class="fail">FAIL</span>'
        else:
            status = '<span class="warning">warning</span>'
        column = (config.get("kwargs") or {}).get("column") or ""
        cells = [
            status,
            escape(severity),
            escape(config.get("description") or config["type"]) + f"<br><code>{escape(config['type'])}</code>",
            f"<code>{escape(column)}</code>" if column else "",
            escape(_observed(result)),
            "" if result["success"] else _files(_failure_for(config, failures)),
        ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    verdict, css = ("valid", "verdict-valid") if report.success else ("INVALID", "verdict-invalid")
    stats = gx_result.get("statistics") or {}
    header = "".join(
        f"<th>{h}</th>" for h in ("result", "severity", "check", "column", "observed", "offending files (value)")
    )
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>Dataset validation: {escape(report.dataset or "(manifest)")}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Dataset validation: <span class="{css}">{verdict}</span></h1>
<p><code>{escape(report.dataset or "(manifest)")}</code>: {report.n_images} tiles;
{stats.get("evaluated_expectations", report.n_expectations)} expectations of the suite
<code>{escape(str(gx_result.get("suite_name", "")))}</code>, {len(report.failures)} critical failed,
{len(report.warnings)} warning(s). A critical failure makes the dataset invalid; a warning is reported only.</p>
<table>
<tr>{header}</tr>
{chr(10).join(rows)}
</table>
<p>Files beside this page: <code>report.json</code> (every offending file), <code>manifest.csv</code> (one row per
tile), <code>validation_result.json</code> (Great Expectations' result), <code>data_docs/index.html</code>
(Great Expectations' Data Docs, which need a network for their styles and scripts).</p>
</body>
</html>
"""
