"""HTML report: self-contained, no identifiers, sagittal view that follows the spine, close-ups of flagged vertebrae."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.outputs.report import (
    _body_range,
    _centroids,
    _superior_axis,
    is_flagged,
    render_report,
    sample_sagittal,
)


def spine_phantom(shift_mm_per_level: float = 0.0) -> tuple[Volume, Volume]:
    """A small CT (HU) with four vertebrae T12..L3 (ids 19..22), each a body + posterior element behind a canal gap.

    Identity direction (k runs inferior -> superior, j anterior -> posterior), 1.5 mm voxels, 64x48x48.
    ``shift_mm_per_level`` moves each level further left (L), a scoliosis the curved view must follow.
    """
    nk, nj, ni = 64, 48, 48
    spacing = 1.5
    ct = np.full((nk, nj, ni), -1000, np.int16)
    ct[:, 6:44, 6:42] = 30  # soft tissue; the rest is air
    labels = np.zeros((nk, nj, ni), np.uint8)
    for n, label in enumerate([22, 21, 20, 19]):  # k increases with S (identity direction): L3 at the bottom
        k0 = 4 + n * 15
        shift = int(round(n * shift_mm_per_level / spacing))
        i0 = 18 + shift
        body = (slice(k0, k0 + 12), slice(12, 26), slice(i0, i0 + 12))
        posterior = (slice(k0 + 2, k0 + 10), slice(30, 38), slice(i0 + 3, i0 + 9))
        for region in (body, posterior):
            labels[region] = label
            ct[region] = 250
    return Volume(ct, (spacing,) * 3, (0.0, 0.0, 0.0), np.eye(3)), Volume(labels, (spacing,) * 3, (0.0, 0.0, 0.0), np.eye(3))


def records() -> list[VertebraRecord]:
    return [
        VertebraRecord(19, "T12", volume_ml=9.0, height_anterior_mm=17.5, height_middle_mm=18.0, height_posterior_mm=18.0,
                       height_loss_ratio=0.03, genant_grade=0, genant_type="normal", fracture_probability=0.08,
                       trabecular_hu=180.0, low_density=False),
        VertebraRecord(20, "L1", volume_ml=8.1, height_anterior_mm=11.0, height_middle_mm=15.0, height_posterior_mm=18.0,
                       height_loss_ratio=0.39, genant_grade=2, genant_type="wedge", fracture_probability=0.86,
                       trabecular_hu=70.0, low_density=True),
        VertebraRecord(21, "L2", volume_ml=9.2, height_anterior_mm=18.0, height_middle_mm=17.9, height_posterior_mm=18.0,
                       height_loss_ratio=0.0, genant_grade=0, genant_type="normal", fracture_probability=0.2,
                       trabecular_hu=175.0, low_density=False),
        VertebraRecord(22, "L3", volume_ml=9.1, height_anterior_mm=14.0, height_middle_mm=17.0, height_posterior_mm=18.0,
                       height_loss_ratio=0.22, genant_grade=1, genant_type="wedge", fracture_probability=0.45,
                       trabecular_hu=160.0, low_density=False, partial=True),
    ]


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_is_self_contained_and_complete(tmp_path):
    ct, labels = spine_phantom()
    html = render_report(ct, labels, records(), fracture_probability=0.86, fractured=True,
                         warnings=["classifier not available"], case_id="case-0123abcd")
    # self-contained: every picture inline, nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    pictures = _images(html)
    flagged = [r for r in records() if is_flagged(r)]
    assert [r.level for r in flagged] == ["L1", "L3"]
    assert len(pictures) == 1 + len(flagged)  # the sagittal view and one close-up per flagged vertebra
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 2000 for p in pictures)
    # summary
    assert "0.86" in html and ">YES<" in html
    assert "L1: p = 0.86, Genant grade 2 (wedge)" in html
    # bone density: L1 is deformed (denser when compressed), so T12 stands in for it, with the caveat
    assert "T12 trabecular attenuation 180 HU: osteoporosis unlikely" in html and "T12 stands in" in html
    assert "classifier not available" in html and "case-0123abcd" in html
    # the suspicious vertebrae, named so as not to be read as the quality flags of the table
    assert "Suspicious (p &ge; 0.5 or grade &ge; 1)</div><div>L1, L3</div>" in html and ">Flagged" not in html
    # the table: one row per vertebra, flagged rows marked
    assert len(re.findall(r"<tr class=\"flag\">", html)) == 2
    for level in ("T12", "L1", "L2", "L3"):
        assert f"</span>{level}</td>" in html
    assert re.search(r"<td>cut</td></tr>", html)  # L3 is partial: its quality flag says cut


def test_report_shows_the_review_status():
    ct, labels = spine_phantom()
    reason = "A vertebra is missing: no segment for L2 between L1 and L3."
    html = render_report(ct, labels, records(), fracture_probability=0.45, fractured=None, review_reasons=[reason])
    assert ">NEEDS REVIEW<" in html and ">YES<" not in html and ">NO<" not in html
    assert f"<li>{reason}</li>" in html
    # the probability is no headline then: it is not a call
    assert '<div class="big">0.45' not in html and "0.45 <span class=\"small\">(unconfirmed: the case needs review" in html
    assert '<div class="big">0.45' in render_report(ct, labels, records(), fracture_probability=0.45, fractured=False)


def test_a_body_taller_than_expected_has_lost_no_height():
    """A negative loss (the CSV keeps it signed) is shown as none lost, not as "-4 %"."""
    ct, labels = spine_phantom()
    rows = records()
    rows[2].height_loss_ratio = -0.04
    html = render_report(ct, labels, rows, fracture_probability=0.86, fractured=True)
    assert "-4 %" not in html and "<td>18.0</td><td>0 %</td>" in html


def test_report_without_vertebrae(tmp_path):
    ct, labels = spine_phantom()
    html = render_report(ct, labels.with_array(np.zeros(labels.shape, np.uint8)), [], fracture_probability=float("nan"),
                         fractured=False)
    assert "No vertebra was found" in html and "not assessed" in html
    assert len(_images(html)) == 1  # still the mid-sagittal view of the field of view


def test_curved_view_follows_a_scoliotic_spine():
    """With each level 9 mm further left, a straight mid-sagittal plane misses vertebrae; the curved one cuts all."""
    ct, labels = spine_phantom(shift_mm_per_level=9.0)
    centroids = _centroids(labels, [])
    curved = sample_sagittal(ct, labels, centroids, spacing=1.0, curved=True)
    straight = sample_sagittal(ct, labels, centroids, spacing=1.0, curved=False)
    assert set(np.unique(curved.labels)) == {0, 19, 20, 21, 22}
    assert set(np.unique(straight.labels)) < {0, 19, 20, 21, 22}
    # superior up: T12 above L3
    rows = {lab: np.nonzero((curved.labels == lab).any(1))[0].mean() for lab in (19, 22)}
    assert rows[19] < rows[22]


def test_sagittal_view_does_not_depend_on_orientation():
    """The same CT stored flipped along i and j (other direction matrix) gives the same picture."""
    ct, labels = spine_phantom()
    flip = np.diag([-1.0, -1.0, 1.0])

    def flipped(v: Volume) -> Volume:
        origin = v.index_to_lps([v.size_ijk[0] - 1, v.size_ijk[1] - 1, 0])
        return Volume(v.array[:, ::-1, ::-1].copy(), v.spacing, tuple(origin), v.direction @ flip)

    a = sample_sagittal(ct, labels, _centroids(labels, []), spacing=1.0)
    b = sample_sagittal(flipped(ct), flipped(labels), _centroids(flipped(labels), []), spacing=1.0)
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.ct, b.ct, atol=1e-3)


def test_body_is_the_anterior_run_before_the_canal():
    body = np.arange(3.0, 12.0, 0.5)  # depth (mm) of body pixels, anterior = small
    posterior = np.arange(16.0, 22.0, 0.5)  # behind the canal gap
    assert _body_range(np.concatenate([posterior, body]), 0.5) == (3.0, 12.0)
    first, last = _body_range(np.arange(0.0, 20.0, 0.5), 0.5)  # no canal visible: the anterior 55 %
    assert first == 0.0 and 10.0 <= last <= 11.5


def test_closeup_axis_follows_the_spine():
    centroids = {19: np.array([0.0, 10.0, 40.0]), 20: np.array([0.0, 14.0, 20.0]), 21: np.array([0.0, 22.0, 0.0])}
    axis = _superior_axis(centroids[20], centroids, 20)
    assert np.allclose(axis, np.array([-12.0, 40.0]) / np.hypot(12.0, 40.0))
    assert np.allclose(_superior_axis(centroids[20], {20: centroids[20]}, 20), [0.0, 1.0])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian 'chromium' not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from VertebralFractureLib.outputs.report import write_report

    ct, labels = spine_phantom()
    page = write_report(tmp_path / "report.html", ct, labels, records(), fracture_probability=0.86, fractured=True)
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    # the page drew something: header colour at the top, images below (many distinct colours)
    assert len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def test_report_from_run_with_labels_on_real_ct(shared_data, tmp_path):
    """``run --labels`` on the real lumbar crop writes a report naming L2-L4."""
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline

    folder = shared_data / "tptbox-l2-l4"
    out = tmp_path / "out"
    run_pipeline(folder / "sub-ct_label-22_ct.nii.gz", out, labels_path=folder / "sub-ct_seg-vert_label-22_msk.nii.gz",
                 options=PipelineOptions(wiener=False))
    html = (out / "report.html").read_text()
    for level in ("L2", "L3", "L4"):
        assert f"</span>{level}</td>" in html
    assert len(_images(html)) >= 1
