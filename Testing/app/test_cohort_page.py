"""cohort.html in a real browser (Debian's chromium driven by Playwright): the counts, the worklist order, a link to a
case's report, and the sign-off shown after a review."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_batch import make_cohort

from VertebralFractureLib.app.batch import read_cohort_csv, review_first, run_batch
from VertebralFractureLib.app.pipeline import PipelineOptions
from VertebralFractureLib.app.review.signoff import update_cohort_review
from VertebralFractureLib.outputs.cohort_report import render_cohort_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_sdi_cells_and_counts_without_a_browser():
    rows = [{"case": "a", "status": "ok", "fractured": "True", "needs_review": "False", "spinal_deformity_index": "3",
             "sdi_vertebrae": "9", "follow_up": "Since the prior CT: incident fracture of L1.", "new_fractures": "L1"},
            {"case": "b", "status": "ok", "fractured": "False", "needs_review": "False",
             "spinal_deformity_index": "0", "sdi_vertebrae": "13", "bone_density": "osteoporosis likely",
             "bone_density_level": "L1", "bone_density_hu": "92.4"},
            {"case": "c/d#e", "status": "bad_input", "error": "c.nii.gz: not a readable image"}]
    page = render_cohort_report(rows, reports=["a", "c/d#e"])
    assert "\u2265 3 (9 of 13)" in page and "<td>0</td>" in page and "osteoporosis likely (L1 92 HU)" in page
    assert 'id="n-new-fractures"><b>1</b>' in page and 'id="n-bad_input"><b>1</b>' in page
    assert 'href="c/d%23e/report.html"' in page  # a case name is a path segment, quoted


def test_the_cohort_page_lists_every_case_in_worklist_order_and_links_their_reports(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium not installed (make test installs it with apt as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[review]'")


    out = tmp_path / "out"
    run_batch(make_cohort(tmp_path, 4), out, scheduler="synchronous", options=PipelineOptions(wiener=False),
              quiet=True)
    rows = read_cohort_csv(out / "cohort.csv")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto((out / "cohort.html").as_uri())
        assert page.title() == "Cohort screening summary"
        assert page.locator("#n-cases b").inner_text() == str(len(rows)) == "8"  # 4 cases, 4 refused inputs
        fractured = sum(r["fractured"] == "True" and r["needs_review"] == "False" for r in rows)
        assert page.locator("#n-fracture b").inner_text() == str(fractured)
        assert page.locator("#n-bad_input b").inner_text() == str(sum(r["status"] == "bad_input" for r in rows)) == "4"
        listed = page.locator("tr.case").evaluate_all("rows => rows.map(r => r.dataset.case)")
        assert listed == [r["case"] for r in review_first(rows)]
        broken = page.locator('tr.case[data-case="truncated"]')
        row = next(r for r in rows if r["case"] == "truncated")
        assert "bad_input" in broken.inner_text() and row["error"] in broken.inner_text()
        assert broken.locator("a").count() == 0  # no report to link to
        first = next(r["case"] for r in review_first(rows) if r["status"] == "ok")
        page.locator(f'tr.case[data-case="{first}"] a').click()
        page.wait_for_load_state()
        assert page.title() == "Vertebral fracture report" and page.url.endswith(f"/{first}/report.html")
        # a sign-off in the review app shows on the page
        update_cohort_review(out, first, "approved")
        page.goto((out / "cohort.html").as_uri())
        assert "approved" in page.locator(f'tr.case[data-case="{first}"]').inner_text()
        browser.close()
