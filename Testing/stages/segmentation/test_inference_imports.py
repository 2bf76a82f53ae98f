"""`run` (segmentation included) never imports MONAI: the U-Net is the plain-torch models.networks.ResidualUNet and
the tiling is stages.segmentation.inference's own. `import monai` loads every MONAI subpackage (about 1.8 s CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from VertebralFractureLib.core.resources import demo_ct_path

REPO = Path(__file__).resolve().parents[3]
CHILD = """
import json, sys
from VertebralFractureLib.cli import main
status = main(sys.argv[1:])
print("MODULES " + json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def test_run_with_segmentation_does_not_import_monai(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), VERTEBRAL_FRACTURE_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", CHILD, "run", str(demo_ct_path()), "-o", str(tmp_path / "out"),
                           "--fast", "--quiet"], env=env, cwd=REPO, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MODULES ")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-2000:]
    child = json.loads(line[len("MODULES "):])
    assert child["status"] == 0
    assert "VertebralFractureLib.stages.segmentation.inference" in child["modules"]  # the network did run
    assert json.loads((tmp_path / "out" / "result.json").read_text())["vertebrae"]
    assert not [m for m in child["modules"] if m == "monai" or m.startswith("monai.")]
