"""What a study writes: metric tables (CSV, Markdown) with bootstrap CIs, the ROC-AUC of every model against the
reference model (DeLong's test), predictions, figures, the LASSO selection, and one self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.records import json_safe
from VertebralFractureLib.io.csv_tables import csv_text
from VertebralFractureLib.research.evaluation import (
    METRICS,
    auc_comparison,
    binary_metrics,
    bootstrap_ci,
    holm,
    patient_level,
)
from VertebralFractureLib.research.study.comparison import ModelRun
from VertebralFractureLib.research.study.data import CohortData, StudyOptions


@dataclass
class StudyResult:
    """What :func:`run_study` wrote, in memory."""

    table1: list[dict[str, Any]]
    table2: list[dict[str, Any]]
    table1_vertebra: list[dict[str, Any]]
    table2_vertebra: list[dict[str, Any]]
    train_cases: list[str]
    test_cases: list[str]
    timings_s: dict[str, float]
    warnings: list[str]
    cv_table: list[dict[str, Any]] = field(default_factory=list)
    table3: list[dict[str, Any]] = field(default_factory=list)

def _round(value: float, digits: int = 4) -> float | str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A study table; case names spreadsheet-safe (:mod:`~VertebralFractureLib.io.csv_tables`)."""
    # p-values keep 4 significant digits: rounded to 4 decimals a p of 3e-6 would read 0.0
    path.write_text(csv_text(({k: (float(f"{v:.4g}") if k in ("p", "p_holm") and math.isfinite(v) else _round(v))
                               if isinstance(v, float) else v for k, v in row.items()} for row in rows), columns))


def _cell(value: Any) -> str:
    """A table cell: floats with 3 decimals (NaN: n/a), anything else as text."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _p_values_as_text(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 3's rows with its p-values written as a reader expects them: 3 decimals, "<0.001" below."""
    def text(p: float) -> str:
        return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
    return [{**r, "p": text(r["p"]), "p_holm": text(r["p_holm"])} for r in rows]


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=2))


def _metric_tables(runs: dict[str, ModelRun], data: CohortData, test: np.ndarray, options: StudyOptions,
                   per_patient: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple]]:
    case_test = [data.cases[i] for i in test]
    table1, table2, curves = [], [], {}
    for model, run in runs.items():
        if per_patient:
            groups, y, p = patient_level(case_test, data.y[test], run.p_test)
        else:
            groups, y, p = case_test, data.y[test], run.p_test
        values = binary_metrics(y, p, run.threshold)
        cis = bootstrap_ci(y, p, groups, n_boot=options.n_boot, seed=options.seed, threshold=run.threshold)
        table1.append({"model": model, **values})
        for metric in METRICS:
            table2.append({"model": model, "metric": metric, "ci_low": cis[metric][0], "ci_high": cis[metric][1],
                           "value": values[metric]})
        curves[model] = (y, p)
    return table1, table2, curves


#: the model the others are compared with in table 3: the study's own network, else the first model run
REFERENCE_MODEL = "customcnn"
TABLE3_COLUMNS = ["level", "model", "reference", "n", "roc_auc", "roc_auc_reference", "difference", "ci_low", "ci_high",
                  "p", "p_holm", "note"]


def _comparison_table(runs: dict[str, ModelRun], data: CohortData, test: np.ndarray) -> list[dict[str, Any]]:
    """Table 3: each model's test ROC-AUC against the reference model's on the same rows (DeLong's paired test; per
    vertebra clustered by patient), p-values Holm-adjusted over the comparisons of each level."""
    reference = REFERENCE_MODEL if REFERENCE_MODEL in runs else next(iter(runs), None)
    others = [m for m in runs if m != reference]
    case_test = [data.cases[i] for i in test]
    rows: list[dict[str, Any]] = []
    per_patient = {m: patient_level(case_test, data.y[test], r.p_test) for m, r in runs.items()}
    for level in ("patient", "vertebra"):
        if level == "patient":  # one row per patient: independent rows
            y, groups, scores = per_patient[reference][1], None, {m: per_patient[m][2] for m in runs}
        else:
            y, groups, scores = data.y[test], case_test, {m: r.p_test for m, r in runs.items()}
        block = []
        for model in others:
            c = auc_comparison(y, scores[model], scores[reference], groups)
            block.append({"level": level, "model": model, "reference": reference, "n": c["n"], "roc_auc": c["auc_a"],
                          "roc_auc_reference": c["auc_b"], "difference": c["difference"], "ci_low": c["ci_low"],
                          "ci_high": c["ci_high"], "p": c["p"], "note": c["no_ci"]})
        for row, adjusted in zip(block, holm([r["p"] for r in block]), strict=True):
            row["p_holm"] = adjusted
        rows += block
    return rows


def write_outputs(out: Path, data: CohortData, train_cases: list[str], test_cases: list[str], test: np.ndarray,
                   runs: dict[str, ModelRun], options: StudyOptions, warnings: list[str],
                   cv_rows: list[dict[str, Any]], timings: dict[str, float]) -> StudyResult:
    from VertebralFractureLib.research.evaluation import plot_lasso_cv, plot_lasso_path, plot_roc, plot_training_curves

    cols1 = ["model"] + METRICS
    cols2 = ["model", "metric", "ci_low", "ci_high"]
    t1, t2, curves_p = _metric_tables(runs, data, test, options, per_patient=True)
    t1v, t2v, curves_v = _metric_tables(runs, data, test, options, per_patient=False)
    t3 = _comparison_table(runs, data, test)
    for name, rows, cols in (("table1", t1, cols1), ("table2", t2, cols2), ("table1_vertebra", t1v, cols1),
                             ("table2_vertebra", t2v, cols2), ("table3", t3, TABLE3_COLUMNS)):
        _write_csv(out / f"{name}.csv", rows, cols)
        shown = _p_values_as_text(rows) if name == "table3" else rows
        (out / f"{name}.md").write_text(_markdown(shown, cols + (["value"] if name.startswith("table2") else [])))
    write_json(out / "split.json", {"train": train_cases, "test": test_cases, "seed": options.seed,
                                     "test_fraction": options.test_fraction})
    # per-vertebra test predictions of every model
    pred_rows = []
    for j, i in enumerate(test):
        row = {"case": data.cases[i], "label": data.labels[i], "level": data.levels[i], "genant_grade": int(data.grades[i]),
               "fractured": int(data.y[i]), "partial": int(data.partial[i])}
        row.update({f"p_{m}": float(r.p_test[j]) for m, r in runs.items()})
        pred_rows.append(row)
    _write_csv(out / "predictions.csv", pred_rows, list(pred_rows[0]) if pred_rows else ["case"])
    figures = {"roc_patient.png": plot_roc(curves_p, out / "roc_patient.png", "ROC per patient (test set)"),
               "roc_vertebra.png": plot_roc(curves_v, out / "roc_vertebra.png", "ROC per vertebra (test set)")}
    histories = {m: r.history for m, r in runs.items() if r.history}
    if histories:
        figures["training_curves.png"] = plot_training_curves(histories, out / "training_curves.png")
        write_json(out / "training_history.json", histories)
    lasso = next((r.lasso for r in runs.values() if r.lasso is not None), None)
    lasso_rows = []
    if lasso is not None:
        figures["lasso_path.png"] = plot_lasso_path(lasso.log_lambda_grid, lasso.path_coefs, lasso.feature_names,
                                                    lasso.selected_log_lambda, out / "lasso_path.png")
        figures["lasso_cv_auc.png"] = plot_lasso_cv(lasso.log_lambda_grid, lasso.cv_auc_mean, lasso.cv_auc_sd,
                                                    lasso.n_selected, lasso.selected_log_lambda, out / "lasso_cv_auc.png")
        lasso_rows = [{"feature": f, "coefficient": c} for f, c in lasso.coefficients()]
        _write_csv(out / "selected_features.csv", lasso_rows, ["feature", "coefficient"])
        write_json(out / "lasso.json", {"log_lambda": lasso.log_lambda_grid.tolist(), "cv_auc_mean": lasso.cv_auc_mean.tolist(),
                                         "cv_auc_sd": lasso.cv_auc_sd.tolist(), "n_selected": lasso.n_selected.tolist(),
                                         "selected_log_lambda": lasso.selected_log_lambda, "selected": lasso.selected,
                                         "n_features": len(lasso.feature_names)})
    if cv_rows:
        cv_cols = list(cv_rows[0])
        _write_csv(out / "cv_table.csv", cv_rows, cv_cols)
        (out / "cv_table.md").write_text(_markdown(cv_rows, cv_cols))
    result = StudyResult(t1, t2, t1v, t2v, train_cases, test_cases, timings, warnings, cv_rows, t3)
    _write_report(out / "report.html", result, figures, data, options, lasso_rows, runs)
    return result


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        body.append("<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _with_ci(table1: list[dict[str, Any]], table2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 1 rows with each metric written 'value (low-high)' for the report."""
    ci = {(r["model"], r["metric"]): (r["ci_low"], r["ci_high"]) for r in table2}
    rows = []
    for r in table1:
        row = {"model": r["model"]}
        for m in METRICS:
            lo, hi = ci[(r["model"], m)]
            v = r[m]
            row[m] = "n/a" if math.isnan(v) else (f"{v:.3f} ({lo:.3f}-{hi:.3f})" if not math.isnan(lo) else f"{v:.3f}")
        rows.append(row)
    return rows


def _write_report(path: Path, result: StudyResult, figures: dict[str, Path], data: CohortData, options: StudyOptions,
                  lasso_rows: list[dict[str, Any]], runs: dict[str, ModelRun]) -> None:
    n_p = len(result.train_cases) + len(result.test_cases)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Vertebral fracture classification study</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "img{max-width:100%}.warn{color:#a40}</style></head><body>",
        "<h1>Vertebral fracture classification study</h1>",
        f"<p>{n_p} patients ({len(result.train_cases)} training, {len(result.test_cases)} test, split by patient, "
        f"stratified; seed {options.seed}), {len(data.y)} vertebrae of which {int(data.y.sum())} fractured "
        f"(Genant grade &ge; 1). Crops 32<sup>3</sup> at 2 mm; {options.epochs} epochs per network, same budget for all. "
        f"Patient probability = maximum over its vertebrae. Metrics on the test set at each model's decision "
        f"threshold, chosen on the training vertebrae (Youden J; genant-rule: grade &ge; 1), applied to vertebra and "
        f"patient probabilities alike: "
        + ", ".join(f"{html.escape(m)} {r.threshold:.3f}" for m, r in runs.items()) + "; "
        f"95 % bootstrap CIs over patients ({options.n_boot} resamples).</p>",
        "<h2>Table 1: per patient, test set (value and 95 % CI)</h2>", _html_table(_with_ci(result.table1, result.table2), ["model"] + METRICS),
        "<h2>Per vertebra, test set</h2>", _html_table(_with_ci(result.table1_vertebra, result.table2_vertebra), ["model"] + METRICS),
    ]
    if result.table3:
        parts += [f"<h2>Table 3: ROC-AUC against {html.escape(result.table3[0]['reference'])}, test set</h2>",
                  "<p>Difference of each model's ROC-AUC from the reference model's on the same patients or vertebrae, "
                  "with its 95 % CI and two-sided p by DeLong's test for correlated ROC curves (per vertebra the "
                  "vertebrae of one patient are clustered: Obuchowski's extension); p_holm: Holm-adjusted over the "
                  "comparisons of each level; note: why a row has no CI or p.</p>",
                  _html_table(_p_values_as_text(result.table3), TABLE3_COLUMNS)]
    if result.cv_table:
        parts += [f"<h2>{result.cv_table[0]['folds']}-fold cross-validation (patients)</h2>",
                  _html_table(result.cv_table, list(result.cv_table[0]))]
    for name, title in (("roc_patient.png", "ROC curves per patient"), ("roc_vertebra.png", "ROC curves per vertebra"),
                        ("training_curves.png", "Loss and accuracy per epoch"),
                        ("lasso_path.png", "LASSO coefficient path (figure 9)"),
                        ("lasso_cv_auc.png", "Cross-validated ROC-AUC against log(lambda) (figure 10)")):
        if name in figures:
            parts.append(f"<h2>{title}</h2><img src='{_img(figures[name])}' alt='{name}'>")
    if lasso_rows:
        lasso = next(r.lasso for r in runs.values() if r.lasso is not None)
        parts.append(f"<h2>Selected radiomics features</h2><p>{len(lasso_rows)} of {len(lasso.feature_names)} features at "
                     f"log(lambda) = {lasso.selected_log_lambda:.2f} (1-SE rule on patient-grouped CV inside the training set).</p>")
        parts.append(_html_table(lasso_rows, ["feature", "coefficient"]))
    timing_rows = [{"step": k, "seconds": round(v, 1)} for k, v in result.timings_s.items()]
    parts.append("<h2>Timings</h2>" + _html_table(timing_rows, ["step", "seconds"]))
    if result.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in result.warnings) + "</ul>")
    parts.append(f"<p><small>VertebralFractureLib {__version__}</small></p></body></html>")
    path.write_text("\n".join(parts))
