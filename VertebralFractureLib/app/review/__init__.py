"""``vertebral-fracture review``: a browser app to click through a batch (or one run) output.

Plain-Python parts, testable without a browser or Slicer:

* :mod:`.worklist`: the cases of an output folder, their status and review state, ordering and filter;
* :mod:`.safety`: which folder a case name from the browser may open, the access token, the bind address;
* :mod:`.signoff`: ``review.json``, the ``review`` column of ``cohort.csv`` and the corrected segmentation,
  each written atomically.

:mod:`.case` holds one opened case as MRML nodes (through :mod:`VertebralFractureLib.app.slicer_logic`, the
same code as Slicer's module) and :mod:`.server` is the trame-slicer web page around it.
"""
