"""Review app timings in headless chromium: server start, case switch, Recompute after an edit, server memory.

Targets (issue 17): start <= 10 s, case switch <= 2 s, Recompute after an edit <= 5 s on 2 cores, server
RSS <= 1.5 GB. The output reviewed is a batch over two real CTs: the bundled demo CT (segmented by the
network) and the TPTBox lumbar crop of ../shared/data with its label map; it is built once under
``--work`` and reused. Every time is wall time seen from the browser (click -> page updated); beside it the
server's CPU time (user + system, all its threads) over the same span, and the load average, since the
machine is shared and wall time alone is unfair under load.

Run: .venv/bin/python benchmarks/review.py [--work /tmp/review-bench] [--screenshot docs/review_screenshot.png]
(writes benchmarks/results/review.json)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import require_shared_data, write_result

from VertebralFractureLib.app.batch import run_batch
from VertebralFractureLib.app.pipeline import PipelineOptions
from VertebralFractureLib.core.resources import demo_ct_path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def build_output(work: Path) -> Path:
    """A batch output over the demo CT and the TPTBox crop (with its labels); reused when complete."""
    out = work / "out"
    if (out / "cohort.csv").is_file():
        return out
    data = require_shared_data() / "tptbox-l2-l4"
    cohort = work / "cohort"
    (cohort / "tptbox-l2-l4").mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "sub-ct_label-22_ct.nii.gz", cohort / "tptbox-l2-l4" / "ct.nii.gz")
    shutil.copy(data / "sub-ct_seg-vert_label-22_msk.nii.gz", cohort / "tptbox-l2-l4" / "labels.nii.gz")
    shutil.copy(demo_ct_path(), cohort / "demo.nii.gz")
    run_batch(cohort, out, scheduler="synchronous", options=PipelineOptions(), quiet=True)
    return out


def rss_mb(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server so far (children included: radiomics workers)."""
    import psutil

    process = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


class Span:
    """Wall and server CPU seconds of a ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Span:
        self.wall, self.cpu = time.perf_counter(), cpu_s(self.pid)
        return self

    def __exit__(self, *_) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_s(self.pid) - self.cpu


def wait_text(page, selector: str, pattern: str, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(
        "([sel, pat]) => new RegExp(pat).test((document.querySelector(sel) || {}).innerText || '')",
        arg=[selector, pattern], timeout=timeout_ms)


def open_case(page, name: str, pid: int) -> Span:
    with Span(pid) as span:
        page.locator(f".vf-case[data-case='{name}']").click()
        wait_text(page, "#vf-title", f"^{name}")
        page.wait_for_selector(".vf-row")
    return span


def paint_stroke(page, rng: random.Random) -> None:
    """A stroke from near the centre of the axial view, shifted at random: each run's edit is new to the
    radiomics cache (a repeated stroke would find the edited vertebra's features cached from the last run)."""
    box = page.locator("#vf-views img").nth(0).bounding_box()
    x = box["x"] + box["width"] * (0.5 + rng.uniform(-0.03, 0.03))
    y = box["y"] + box["height"] * (0.5 + rng.uniform(-0.03, 0.03))
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 16):
        page.mouse.move(x + i * box["width"] * 0.01, y)
        time.sleep(0.03)
    page.mouse.up()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/review-bench"))
    parser.add_argument("--screenshot", type=Path, help="save a screenshot of the demo case here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = build_output(args.work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    load_before = os.getloadavg()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "VertebralFractureLib.cli", "review", str(out), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    rss = []
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"error: the review server did not start listening on port {port}")
            time.sleep(0.05)
        listen_s = time.perf_counter() - start
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(".vf-case")
            start_s = time.perf_counter() - start
            start_cpu = cpu_s(server.pid)
            rss.append(rss_mb(server.pid))
            names = page.locator(".vf-case").evaluate_all("els => els.map(e => e.dataset.case)")
            switches = [open_case(page, name, server.pid) for name in names + names]
            rss.append(rss_mb(server.pid))
            demo = next(n for n in names if n.startswith("demo"))
            open_case(page, demo, server.pid)
            levels = page.locator(".vf-row .vf-level").all_inner_texts()
            middle = levels[len(levels) // 2]
            page.locator(f".vf-row[data-level='{middle}']").click()
            wait_text(page, "#vf-message", f"centred on {middle}")
            page.wait_for_timeout(1500)
            if args.screenshot:
                page.screenshot(path=str(args.screenshot))
            page.locator("#vf-effect-paint").click()
            paint_stroke(page, random.Random())
            wait_text(page, "#vf-summary", "edited")
            with Span(server.pid) as recompute:
                page.locator("#vf-recompute").click()
                wait_text(page, "#vf-message", "^recomputed")
            # "recomputed in X s": the server's own time of the analysis
            recompute_server_s = float(page.locator("#vf-message").inner_text().split()[2])
            rss.append(rss_mb(server.pid))
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    walls = [s.wall for s in switches]
    write_result("review", {
        "output": {"cases": names, "demo_levels": levels},
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "server_start_s": round(start_s, 2), "server_listening_s": round(listen_s, 2),
        "server_start_cpu_s": round(start_cpu, 2),
        "case_switch_s": {"median": round(statistics.median(walls), 2), "max": round(max(walls), 2),
                          "all": [round(w, 2) for w in walls], "cases": names + names,
                          "server_cpu_s": [round(s.cpu, 2) for s in switches]},
        "recompute_after_edit_s": round(recompute.wall, 2), "recompute_after_edit_cpu_s": round(recompute.cpu, 2),
        "recompute_analysis_server_s": recompute_server_s,
        "server_rss_mb_max": round(max(rss), 1),
        "targets": {"server_start_s": 10, "case_switch_s": 2, "recompute_after_edit_s": 5, "server_rss_mb": 1536},
        "note": "wall time from the browser (headless chromium on the same machine; start includes launching it); "
                "CPU: the server process's user + system seconds over the same span (all threads, so the "
                "background warm-up and read-ahead count where they overlap); demo CT 267x207x183 at 1.5 mm",
    })


if __name__ == "__main__":
    main()
