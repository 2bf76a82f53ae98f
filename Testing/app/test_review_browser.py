"""Review app in a real browser: Debian's chromium driven by Playwright against ``vertebral-fracture review``.

The server runs as the command line starts it, on a free port, over a small batch output (three
box-phantom cases run with their label maps, so no segmentation network is involved). The tests assert
states and directions (cases listed, images present, voxel counts up after paint and down after erase,
a Scissors outline and keeping the largest island, files written), never pixel values.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureLib.app.batch import run_batch
from VertebralFractureLib.app.pipeline import PipelineOptions
from VertebralFractureLib.app.review.worklist import load_worklist, order_worklist
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.volume_files import write_volume

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]
CASES = ("case_a", "case_b", "case_c")

if not Path(CHROMIUM).is_file():
    pytest.skip("chromium not installed (make test installs it with apt as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[review]'")


def box_case(folder: Path, seed: int) -> None:
    """``ct.nii.gz`` (48^3 voxels of 1.5 mm, HU) and ``labels.nii.gz`` with L1..L3 boxes; the second case's L2 is short."""
    rng = np.random.default_rng(seed)
    ct = np.full((48, 48, 48), -1000, np.int16)
    ct[:, 4:44, 4:44] = 30
    labels = np.zeros(ct.shape, np.uint8)
    for n, label in enumerate((22, 21, 20)):  # k runs inferior -> superior: L3, L2, L1
        k0 = 2 + 15 * n
        height = 12 - (4 if seed == 1 and label == 21 else 0)
        labels[k0:k0 + height, 12:26, 16:32] = label
        labels[k0 + 2:k0 + 9, 28:36, 21:27] = label
    ct[labels > 0] = 220
    ct += rng.normal(0, 8, ct.shape).astype(np.int16)
    folder.mkdir(parents=True)
    write_volume(Volume(ct, (1.5, 1.5, 1.5)), folder / "ct.nii.gz")
    write_volume(Volume(labels, (1.5, 1.5, 1.5)), folder / "labels.nii.gz")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vertebral-fracture review OUT`` in a subprocess; ``url`` once it listens.

    The port is one the kernel just handed out and took back: another process may take it before the server binds
    it, and the server then exits. That start is retried on a new port; any other failure reports the server's
    stderr."""

    def __init__(self, out: Path, *extra: str) -> None:
        for _attempt in range(3):
            if self._start(out, extra):
                return
            self.stop()
        raise RuntimeError(f"review server did not listen in 3 attempts; its stderr: {self._stderr()[-2000:]}")

    def _start(self, out: Path, extra: tuple[str, ...]) -> bool:
        """Start the server; True once it listens, False when it exited before (e.g. its port was taken)."""
        self.port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "VertebralFractureLib.cli", "review", str(out), "--port", str(self.port),
             "--no-wiener", *extra],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                return False
            self.lines.append(line)
            if line.startswith("review app:"):
                break
        self.url = self.lines[-1].split()[2]
        if "--require-token" in extra:
            self.lines.append(self.process.stdout.readline())
        while time.monotonic() < deadline:  # the address is printed before the socket listens
            if self.process.poll() is not None:
                return False
            if self._listens():
                return True
            time.sleep(0.1)
        raise RuntimeError(f"review server did not listen within 60 s; its stderr: {self._stderr()[-2000:]}")

    def _listens(self) -> bool:
        """Whether the server process itself listens on its port (not another process that took the port)."""
        import psutil

        try:
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                       for c in psutil.Process(self.process.pid).net_connections(kind="inet"))
        except psutil.Error:
            return False

    def _stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("review")
    for seed, name in enumerate(CASES):
        box_case(root / "cohort" / name, seed)
    run_batch(root / "cohort", root / "out", scheduler="synchronous", options=PipelineOptions(wiener=False, radiomics=False),
              quiet=True, threads=1)
    return root / "out"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(batch_out):
    srv = Server(batch_out)
    yield srv
    srv.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def _voxels(page, level: str) -> int:
    return int(page.locator(f".vf-row[data-level='{level}'] .vf-voxels").inner_text())


def _wait_message(page, pattern: str) -> str:
    page.wait_for_function(
        f"() => /{pattern}/.test(document.querySelector('#vf-message').innerText)", timeout=30_000)
    return page.locator("#vf-message").inner_text()


def _wait_voxels(page, level: str, before: int, direction: int) -> int:
    """The voxel count of ``level`` once it moved from ``before`` in ``direction`` (+1 up, -1 down)."""
    deadline = time.monotonic() + 30  # a loaded CI machine
    while time.monotonic() < deadline:
        now = _voxels(page, level)
        if (now - before) * direction > 0:
            return now
        time.sleep(0.2)
    return _voxels(page, level)


def _use_effect(page, name: str) -> None:
    """Click an editor effect's button and wait until the server runs it (a stroke before that would use the
    previous effect)."""
    page.locator(f"#vf-effect-{name}").click()
    page.wait_for_function(f"() => document.querySelector('#vf-effect-active').textContent.trim() === '{name}'",
                           timeout=30_000)


def _stroke(page, view_index: int = 0) -> None:
    """Drag the mouse from the centre of a view (0: axial) towards its right side."""
    box = page.locator("#vf-views img").nth(view_index).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x + i * box["width"] * 0.015, y + i * box["height"] * 0.004)
        time.sleep(0.03)
    page.mouse.up()


def _polygon(page, view_index: int = 0, half: float = 0.06) -> None:
    """Drag a closed square of ``half`` the view's width on each side of its centre (a Scissors outline)."""
    box = page.locator("#vf-views img").nth(view_index).bounding_box()
    x, y, d = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, half * box["width"]
    corners = [(x - d, y - d), (x + d, y - d), (x + d, y + d), (x - d, y + d), (x - d, y - d)]
    page.mouse.move(*corners[0])
    page.mouse.down()
    for (x0, y0), (x1, y1) in itertools.pairwise(corners):
        for t in (0.25, 0.5, 0.75, 1.0):
            page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
            time.sleep(0.02)
    page.mouse.up()


def _open(page, url: str, case: str) -> None:
    page.goto(url)
    page.locator(f".vf-case[data-case='{case}']").click()
    page.wait_for_selector(".vf-row")
    page.wait_for_function(f"() => document.querySelector('#vf-title').innerText.startsWith('{case}')")


def test_correct_recompute_and_approve_a_case(server, batch_out, page):
    page.goto(server.url)
    page.wait_for_selector(".vf-case")
    listed = page.locator(".vf-case").evaluate_all("els => els.map(e => e.dataset.case)")
    assert sorted(listed) == sorted(CASES)
    # needs review first, then by probability: the case with the short L2 is the most suspicious
    assert listed == [e.name for e in order_worklist(load_worklist(batch_out))]
    assert listed.index("case_b") < listed.index("case_a")

    _open(page, server.url, "case_b")
    images = page.locator("#vf-views img")
    page.wait_for_function("() => [...document.querySelectorAll('#vf-views img')]"
                           ".filter(i => i.naturalWidth > 50 && i.naturalHeight > 50).length === 4")
    assert images.count() == 4
    levels = page.locator(".vf-row .vf-level").all_inner_texts()
    assert levels == ["L1", "L2", "L3"]
    original = hashlib.sha256((batch_out / "case_b" / "segmentation.seg.nrrd").read_bytes()).hexdigest()

    page.locator(".vf-row[data-level='L2']").click()
    _wait_message(page, "centred on L2")
    before = _voxels(page, "L2")
    _use_effect(page, "paint")
    _stroke(page)
    painted = _wait_voxels(page, "L2", before, +1)
    assert painted > before, "painting beside L2 must add voxels to L2"
    assert "edited" in page.locator("#vf-summary").inner_text()

    _use_effect(page, "erase")
    _stroke(page)
    erased = _wait_voxels(page, "L2", painted, -1)
    assert erased < painted, "erasing the same stroke must remove voxels from L2"

    # Scissors (erase inside, through every slice) around the centre of L2's body
    _use_effect(page, "scissors")
    _polygon(page)
    cut = _wait_voxels(page, "L2", erased, -1)
    assert cut < erased, "a Scissors outline over L2 must remove voxels from L2"
    # L2's posterior box is a second island: keeping the largest one removes it
    _use_effect(page, "islands")
    page.locator("#vf-islands").click()
    kept = _wait_voxels(page, "L2", cut, -1)
    assert 0 < kept < cut, "keeping the largest island of L2 must drop its posterior island"

    page.locator("#vf-recompute").click()
    _wait_message(page, "recomputed")
    assert "edited" not in page.locator("#vf-summary").inner_text()
    bone_density = page.locator("#vf-bone-density").inner_text()  # the recomputed case's screen, checked below
    assert _voxels(page, "L2") == kept

    page.locator("#vf-note").fill("L2 outline corrected")
    page.locator("#vf-approve").click()
    _wait_message(page, "case_b approved")
    review = json.loads((batch_out / "case_b" / "review.json").read_text())
    assert review["status"] == "approved" and review["note"] == "L2 outline corrected" and review["time"]
    assert review["corrected"] is True
    assert [v["level"] for v in review["results"]["vertebrae"]] == ["L1", "L2", "L3"]
    assert bone_density == review["results"]["bone_density"]["summary"] != ""
    assert (batch_out / "case_b" / "segmentation.corrected.seg.nrrd").is_file()
    assert (batch_out / "case_b" / "segmentation.corrected.nii.gz").is_file()
    assert hashlib.sha256((batch_out / "case_b" / "segmentation.seg.nrrd").read_bytes()).hexdigest() == original
    with (batch_out / "cohort.csv").open(newline="") as fh:
        reviews = {r["case"]: r["review"] for r in csv.DictReader(fh)}
    assert reviews == {"case_a": "", "case_b": "approved", "case_c": ""}
    assert "approved" in page.locator(".vf-case[data-case='case_b']").inner_text()
    # opened again, the signed-off case shows its note (a second sign-off would otherwise drop it unseen)
    page.locator(".vf-case[data-case='case_c']").click()
    page.wait_for_function("() => document.querySelector('#vf-title').innerText.startsWith('case_c')")
    assert page.locator("#vf-note").input_value() == ""
    page.locator(".vf-case[data-case='case_b']").click()
    page.wait_for_function("() => document.querySelector('#vf-note').value === 'L2 outline corrected'")


def test_keyboard_next_and_rejecting_without_edits(server, batch_out, page):
    _open(page, server.url, "case_a")
    order = page.locator(".vf-case").evaluate_all("els => els.map(e => e.dataset.case)")
    index = order.index("case_a")
    there, back = ("ArrowDown", "ArrowUp") if index + 1 < len(order) else ("ArrowUp", "ArrowDown")
    neighbour = order[index + 1] if there == "ArrowDown" else order[index - 1]
    page.locator("#vf-title").click()  # focus the page, not an input
    page.keyboard.press(there)
    page.wait_for_function(f"() => document.querySelector('#vf-title').innerText.startsWith('{neighbour}')")
    page.keyboard.press(back)
    page.wait_for_function("() => document.querySelector('#vf-title').innerText.startsWith('case_a')")
    page.locator("#vf-reject").click()
    _wait_message(page, "case_a rejected")
    review = json.loads((batch_out / "case_a" / "review.json").read_text())
    assert review["status"] == "rejected" and review["corrected"] is False and review["results"] is None
    assert not (batch_out / "case_a" / "segmentation.corrected.seg.nrrd").exists()


def test_paths_from_the_page_are_refused(server, batch_out, page):
    page.goto(server.url)
    page.wait_for_selector(".vf-case")
    title = page.locator("#vf-title").inner_text()  # the server's state: whatever an earlier test opened
    for name in ("../case_a", "case_a/../../etc", str(batch_out / "case_a"), "cohort.csv"):
        page.evaluate("name => window.trame.trigger('vf_open', [name])", name)
        page.wait_for_function("name => document.querySelector('#vf-error').innerText.includes(name)", arg=name)
        assert re.search("not a case name|not in the worklist", page.locator("#vf-error").inner_text())
        assert page.locator("#vf-title").inner_text() == title


def test_the_page_needs_the_token(batch_out, browser):
    srv = Server(batch_out, "--require-token")
    try:
        token = srv.url.split("secret=")[1]
        assert len(token) >= 32 and any(token in line for line in srv.lines[1:])
        context = browser.new_context()
        page = context.new_page()
        page.goto(srv.url.split("?")[0])
        time.sleep(2)
        assert page.locator(".vf-case").count() == 0, "without the token the page must not get the worklist"
        page.goto(srv.url.split("?")[0] + "?secret=wrong" + token[:5])
        time.sleep(1)
        assert page.locator(".vf-case").count() == 0
        page.goto(srv.url)
        page.wait_for_selector(".vf-case", timeout=30_000)
        assert page.locator(".vf-case").count() == len(CASES)
        context.close()
    finally:
        srv.stop()
