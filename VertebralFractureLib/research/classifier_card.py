"""The classifier's ``MODEL_CARD.md``, rendered from its ``card.json`` and ``fusion.json`` by
:func:`model_card_markdown` (called by :func:`.classifier_fusion.train_realct_classifier`; the shipped card must
come out of its JSON byte for byte)."""

from __future__ import annotations

import math
from typing import Any

from VertebralFractureLib.research.classifier_operating import MAX_FALSE_POSITIVE_RATE
from VertebralFractureLib.stages.classification import FusionModel


def _ci(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    lo, hi = (m.get("ci95", {}) or {}).get(key, (None, None))
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and not math.isnan(lo) else f"{v:.3f}"


def model_card_markdown(card: dict[str, Any], fusion: FusionModel) -> str:
    """``MODEL_CARD.md`` of a classifier trained by :func:`train_realct_classifier` (from its card JSON)."""
    m, tr = card["metrics"], card["training"]
    held = m["held_out"]
    rows = [("this model (fused, held-out patients)", held)]
    if "replaced_model" in m:
        rows.append(("replaced model: max(simulated-only CNN, morphometry)", m["replaced_model"]))
    ops = m.get("operating_points", [])
    lines = _card_intro(card, fusion) + _card_held_out_tables(rows, held, tr)
    if m.get("against_replaced_model"):
        lines += _card_against_replaced(m["against_replaced_model"])
    lines += _card_operating_points(ops, held)
    if m.get("previous_shipped"):
        lines += _card_previous(m["previous_shipped"], held, ops)
    lines += _card_closing(card, held)
    return "\n".join(lines)


def _card_intro(card: dict[str, Any], fusion: FusionModel) -> list[str]:
    """The model card's title, warning and bullet list (networks, rules, training data), as lines."""
    tr = card["training"]
    return [
        f"# {card['name']}", "",
        "**No real fracture has been seen by this model.** Its negatives are real vertebrae (real CTs with the "
        f"project's labels: {len(tr.get('checked_cases', []))} checked by eye, {len(tr.get('unchecked_cases', []))} "
        "automatic proposals); its positives are fractures simulated on those real backgrounds. All metrics below are "
        "on held-out patients of that data (leave-patients-out folds); performance on real fractures is unknown.", "",
        f"- networks: `customcnn` on a {card['input']['crop_size_voxels']}^3 crop at {card['spacing_mm']} mm "
        f"(`model.safetensors`), a radiomics LASSO ({len(fusion.radiomics_features)} features) and morphometry's "
        "probability, fused by logistic stacking fitted on out-of-fold predictions only (`fusion.json`, plain "
        f"numbers); the stacker uses **{fusion.stack_inputs}** (chosen on held-out folds: see *Stacker inputs*)",
        f"- use in `run`: {card['combination']}",
        f"- **patient rule**: fractured when some graded, unflagged vertebra (not cut by the field of view, "
        f"implausible or flagged by the quality check) has a calibrated probability >= {fusion.threshold:.3f}. "
        "**Operating point, specificity first**: the lowest threshold at which at most "
        f"{MAX_FALSE_POSITIVE_RATE:.0%} of the real vertebrae without fracture "
        + ("(checked labels and the automatic segmentation's segments together) " if tr.get("auto_negatives") else "")
        + "reach it, on held-out (nested "
        "out-of-fold) probabilities only, "
        + _floor_text(fusion)
        + "; the case is sent to review (fractured = null) "
        "when segmentation quality flags are raised or a vertebra is out of distribution (Mahalanobis distance > "
        f"{fusion.ood_threshold:.2f}, the {fusion.ood_percentile:g}th percentile of training folds)",
        *_card_calibration(card, fusion),
        f"- training data: {card['training_data']}",
        f"- {tr['n_vertebrae']} vertebrae ({tr['n_fractured']} simulated fractures, {tr['n_real_negatives']} real "
        "negatives" + (f", {tr['n_auto_negatives']} automatic segments" if tr.get("auto_negatives") else "")
        + f"), {len(tr['cases'])} patients, {tr['folds']} folds; {tr['epochs']} epochs, seed {tr['seed']}; "
        f"{tr['training_seconds']} s on the project's 2-core CPU machine",
        f"- radiomics features: {', '.join(f'`{n}`' for n in fusion.radiomics_features)}",
        f"- version {card.get('version')}", "",
        "## Held-out patients (95 % bootstrap CI over patients)", "",
        "Per patient: each CT as it is (no fracture) and once per simulated fracture; probability = max over its "
        "vertebrae.", "",
        "| model | level | n (fractured) | ROC-AUC | sensitivity | specificity | threshold |", "|---|---|---|---|---|---|---|"]


def _card_calibration(card: dict[str, Any], fusion: FusionModel) -> list[str]:
    """The card's bullet on what the probabilities are calibrated to (none for a model without a prior shift)."""
    if fusion.prevalence is None:
        return []
    tr = card["training"]
    return [f"- **calibration**: the stackers are fitted on a mix with {tr['n_fractured'] / tr['n_vertebrae']:.0%} "
            f"fractured vertebrae (simulated); a prior shift (logit {fusion.prior_logit_shift:+.2f}, `fusion.json`) "
            f"calibrates the probabilities to {fusion.prevalence:.1%} fractured vertebrae instead, the share at which "
            "the specificity-first operating point is the equal-cost decision p >= 0.5, so p >= 0.5 means called "
            "fractured. Ranking, sensitivity and specificity do not change; ECE and the reliability diagram are "
            f"measured on the held-out rows reweighted to {fusion.prevalence:.1%} fractured. Where fractures are rarer "
            "(per vertebra typically 2-5 % in screening), the true probability is lower still than the one shown"]


def _card_held_out_tables(rows: list[tuple[str, dict[str, Any]]], held: dict[str, Any], tr: dict[str, Any]) -> list[str]:
    """The held-out tables of ``rows`` (name, evaluation): per vertebra and patient, by grade, on real CTs."""
    lines: list[str] = []
    for name, e in rows:
        for level in ("per_vertebra", "per_patient"):
            x = e[level]
            lines.append(f"| {name} | {level.replace('_', ' ')} | {x['n']} ({x['n_fractured']}) | {_ci(x, 'roc_auc')} "
                         f"| {_ci(x, 'sensitivity')} | {_ci(x, 'specificity')} | {e['threshold']:.3f} |")
    lines += ["", "| model | grade 1 sens. | grade 2 sens. | grade 3 sens. | grade >= 2 sens. "
              "| ECE (95 % CI; at % fractured) | real CTs: vertebrae p >= 0.5 | real CTs called fractured |", "|---|---|---|---|---|---|---|---|"]
    for name, e in rows:
        g, r = e["sensitivity_by_grade"], e["real_ct"]
        ci = e.get("ece_ci95")
        notes = [f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and not math.isnan(ci[0]) else "",
                 f"at {e['ece_prevalence']:.0%}" if "ece_prevalence" in e else ""]
        ece = f"{e['ece']:.3f}" + (f" ({'; '.join(n for n in notes if n)})" if any(notes) else "")
        lines.append(f"| {name} | {g.get('1', math.nan):.3f} | {g.get('2', math.nan):.3f} | {g.get('3', math.nan):.3f} "
                     f"| {e['sensitivity_grade_ge2']:.3f} | {ece} | {r['vertebrae_ge_0_5']} of "
                     f"{r['n_vertebrae']} | {r['patients_called_fractured']} of {r['n_patients']} |")
    lines += ["", "Real CTs by label status (held out, at the operating point): " + "; ".join(
        f"{name}: {r['vertebrae_ge_threshold']} of {r['n_vertebrae']} vertebrae >= threshold, "
        f"{r['patients_called_fractured']} of {r['n_patients']} CTs called fractured "
        f"({', '.join(r.get('cases_called_fractured', [])) or 'none'})"
        for name, r in (("all", held["real_ct"]), ("checked labels only", held.get("real_ct_checked")))
        if r and (name == "all" or tr.get("unchecked_cases"))) + "."]
    auto = held.get("auto_segments")
    if auto:
        lines += ["", "The automatic segmentation's segments of the same CTs (held out, at the operating point; not in "
                  f"the numbers above): {auto['vertebrae_ge_threshold']} of {auto['n_vertebrae']} segments >= "
                  f"threshold (false-positive rate {auto['false_positive_rate']:.3f}), {auto['patients_called_fractured']} of "
                  f"{auto['n_patients']} CTs with one ({', '.join(auto.get('cases_called_fractured', [])) or 'none'})."]
    return lines


def _card_against_replaced(c: dict[str, Any]) -> list[str]:
    """One sentence: this model's per-vertebra ROC-AUC minus the replaced model's, with DeLong's CI and p."""
    if not math.isfinite(c.get("p", math.nan)):
        return ["", f"Per-vertebra ROC-AUC against the replaced model on the same held-out vertebrae: "
                f"{c['difference']:+.3f} (too few patients of a class for a test)."]
    p = "p < 0.001" if c["p"] < 0.001 else f"p = {c['p']:.3f}"
    return ["", f"Per-vertebra ROC-AUC against the replaced model on the same held-out vertebrae: {c['difference']:+.3f} "
            f"(95 % CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, {p}; DeLong's test for correlated ROC curves, the "
            "vertebrae of one CT clustered: Obuchowski 1997)."]


def _floor_text(fusion: FusionModel) -> str:
    """How Genant's grade-1 floor shaped the operating point (:func:`.classifier_fusion.genant_floor`)."""
    op = fusion.operating or {}
    if "genant_floor" not in op:
        return "with no floor"
    if op["raised_to_floor"]:
        return (f"raised to Genant's grade-1 boundary (20 % height loss: the stacker's {op['genant_floor']:.3f}, above "
                f"the budget's {op['budget_threshold']:.3f}), so no vertebra morphometry grades normal is called "
                "fractured on its heights; the budget's own row below is therefore not the shipped point")
    return (f"never below Genant's grade-1 boundary (20 % height loss: the stacker's {op['genant_floor']:.3f}; the "
            f"budget's {op['budget_threshold']:.3f} lies above it)")


def _card_operating_points(ops: list[dict[str, Any]], held: dict[str, Any]) -> list[str]:
    """The operating-points table (the chosen false-positive budget in bold) and the reliability note."""
    lines: list[str] = []
    if ops:
        auto = "auto_false_positive_rate" in ops[0]
        lines += ["", "Operating points on the held-out probabilities (the chosen budget in bold):", "",
                  f"| false-positive budget (real vertebrae{' and automatic segments' if auto else ''}) | threshold "
                  "| real vertebrae >= threshold | grade 1 sens. | grade 2 sens. | grade 3 sens. | grade >= 2 sens. "
                  f"| real CTs called fractured |{' automatic segments >= threshold |' if auto else ''}",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if auto else "")]
        for o in ops:
            g = o["sensitivity_by_grade"]
            b = f"{o['max_false_positive_rate']:.0%}"
            lines.append(f"| {f'**{b}**' if o['max_false_positive_rate'] == MAX_FALSE_POSITIVE_RATE else b} "
                         f"| {o['threshold']:.3f} | {o['false_positive_rate']:.3f} | {g.get('1', math.nan):.3f} "
                         f"| {g.get('2', math.nan):.3f} | {g.get('3', math.nan):.3f} | {o['sensitivity_grade_ge2']:.3f} "
                         f"| {o['real_cts_called_fractured']} of {held['real_ct']['n_patients']} |"
                         + (f" {o['auto_false_positive_rate']:.3f} |" if auto else ""))
        lines += ["", "Measurement reliability: a slice-thickness term in the stacker (slice, or slice x morphometry "
                  "logit) was tried on the out-of-fold predictions of the first run with bridged morphometry and not "
                  "kept: held-out ROC-AUC 0.902-0.906 against 0.907 without it, no fewer real false positives at a "
                  "grade >= 2 sensitivity of 0.95. The real false alarms were mostly on 1.5 mm CTs (segmentation "
                  "errors), not on thick slices."]
    return lines


def _card_previous(prev: dict[str, Any], held: dict[str, Any], ops: list[dict[str, Any]]) -> list[str]:
    """The comparison with the previously shipped fused classifier (its card's ``previous_shipped``)."""
    lines: list[str] = []
    ph, pops = prev["held_out"], {o["max_false_positive_rate"]: o for o in prev["operating_points"]}
    scales = (" Thresholds are on each model's own probability scale: this model's probabilities are prior-shifted "
              "(its operating point is 0.5), the previous model's are not; its ECE is on the rows as sampled, this "
              "model's on the reweighted rows." if "ece_prevalence" in held and "ece_prevalence" not in ph else "")
    lines += ["", "Against the fused classifier shipped before this one (its own card's held-out numbers, on the "
              f"{ph['real_ct']['n_patients']} real CTs, label versions and morphometry it was trained with; its "
              "operating points recomputed from its training_report.json)." + scales, "",
              "| model | vertebra ROC-AUC | patient ROC-AUC | threshold | specificity (vertebrae) | grade >= 2 sens. "
              "| grade 1 sens. | ECE | real CTs called fractured |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in (("this model", held), ("previous", ph)):
        lines.append(f"| {name} | {_ci(e['per_vertebra'], 'roc_auc')} | {_ci(e['per_patient'], 'roc_auc')} "
                     f"| {e['threshold']:.3f} | {e['per_vertebra']['specificity']:.3f} "
                     f"| {e['sensitivity_grade_ge2']:.3f} | {e['sensitivity_by_grade'].get('1', math.nan):.3f} "
                     f"| {e['ece']:.3f} | {e['real_ct']['patients_called_fractured']} of "
                     f"{e['real_ct']['n_patients']} |")
    for o in ops:
        q = pops.get(o["max_false_positive_rate"])
        if q:
            lines.append(f"| previous at this model's {o['max_false_positive_rate']:.0%} budget | | | "
                         f"{q['threshold']:.3f} | | {q['sensitivity_grade_ge2']:.3f} "
                         f"| {q['sensitivity_by_grade'].get('1', math.nan):.3f} | | "
                         f"{q['real_cts_called_fractured']} of {e['real_ct']['n_patients']} |")
    return lines


def _card_closing(card: dict[str, Any], held: dict[str, Any]) -> list[str]:
    """Components alone, out of distribution, the reliability diagram, issue 16's targets and the retrain
    command."""
    m, tr = card["metrics"], card["training"]
    lines: list[str] = []
    comp = m.get("held_out_components", {})
    if comp:
        lines += ["", "Components alone (out-of-fold, per vertebra): " + "; ".join(
            f"{k.replace('_', ' ')} ROC-AUC {v['roc_auc']:.3f}" for k, v in comp.items())]
    lines += _card_stack_selection(m.get("stack_selection"))
    ood = m.get("ood", {})
    lines += ["", f"Out of distribution: {len(ood.get('real_ct_cases_with_an_ood_vertebra', []))} of "
              f"{ood.get('n_real_ct_cases')} real CTs have a held-out vertebra above the threshold "
              f"({', '.join(ood.get('real_ct_cases_with_an_ood_vertebra', [])) or 'none'}).", "",
              "![reliability diagram](reliability.png)", ""]
    targets = [("per-vertebra ROC-AUC >= 0.95", held["per_vertebra"]["roc_auc"] >= 0.95),
               ("grade >= 2 sensitivity >= 0.95 at the operating point", held["sensitivity_grade_ge2"] >= 0.95),
               ("ECE <= 0.05", held["ece"] <= 0.05),
               ("no held-out real CT called fractured", held["real_ct"]["patients_called_fractured"] == 0)]
    if held.get("auto_segments"):
        targets.append(("no held-out real CT's automatic segment at or above the threshold",
                        held["auto_segments"]["vertebrae_ge_threshold"] == 0))
    lines += ["Issue 16's targets on held-out patients: " + "; ".join(
        f"{name}: {'met' if ok else 'NOT met'}" for name, ok in targets) + ".", ""]
    init = card.get("lineage", {}).get("fine_tuned_from")
    lines += ["Retrain (crops, radiomics and simulations cached in /tmp/vf_classifier_cache): `vertebral-fracture "
              "train-classifier --real-labels benchmarks/realct_labels --data ../shared/data"
              + (f" --init Resources/models/{init}" if init else "")
              + f" --lr {tr.get('lr', 2e-3):g} --epochs {tr['epochs']} --folds {tr['folds']} --seed {tr['seed']} "
              + ("--auto-negatives " if tr.get("auto_negatives") else "")
              + "-o MODEL_DIR`" + (f" (fine-tuned from `{init}`, weights sha256 "
                                 f"`{card['lineage']['weights_sha256'][:16]}...`)" if init else "") + ".", ""]
    return lines


def _card_stack_selection(selection: dict[str, Any] | None) -> list[str]:
    """The stacker input sets tried and the one chosen (:func:`.classifier_fusion.select_stack_inputs`)."""
    if not selection:
        return []
    auto = all("auto_segments_at_threshold" in sc for sc in selection["candidates"].values())
    lines = ["", "### Stacker inputs", "",
             "Each candidate set of inputs was fitted and scored on nested held-out folds at its own "
             "specificity-first operating point; the shipped stacker uses, of those within one binomial standard "
             "error of the best grade >= 2 sensitivity there, the one with the fewest inputs (then the highest "
             "ROC-AUC). The held-out numbers above are the chosen candidate's on the same folds, so they carry a "
             "small optimistic bias (chosen among four):", "",
             "| inputs | grade >= 2 sens. | ROC-AUC | real vertebrae >= threshold | "
             + ("automatic segments >= threshold | " if auto else "") + "chosen |",
             "|---|---|---|---|---|" + ("---|" if auto else "")]
    for name, sc in selection["candidates"].items():
        lines.append(f"| {name} | {sc['grade_ge2_sensitivity']:.3f} | {sc['roc_auc']:.3f} | "
                     f"{sc['real_vertebrae_at_threshold']} | "
                     + (f"{sc['auto_segments_at_threshold']} | " if auto else "")
                     + f"{'yes' if name == selection['chosen'] else ''} |")
    return lines
