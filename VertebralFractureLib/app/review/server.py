"""The review web page: trame-slicer views, Segment Editor effects, worklist, vertebra table and sign-off.

One Python process holds one MRML scene (``trame_slicer.core.SlicerApp``); the browser shows its axial,
sagittal, coronal and 3D views as remote-rendered images and sends mouse events back, so the Segment
Editor effects (paint, erase, scissors, islands) run on the server on the real segmentation node.

Nothing from the browser is trusted but a case name the worklist listed (:mod:`.safety`); the page
needs the access token (wslink's handshake secret, ``?secret=`` in the URL) when one is set.
Page element ids (``vf-...``) are stable: the browser tests use them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from VertebralFractureLib.app import slicer_logic
from VertebralFractureLib.app.pipeline import PipelineOptions
from VertebralFractureLib.app.review import safety
from VertebralFractureLib.app.review.case import CtCache, OpenCase
from VertebralFractureLib.app.review.worklist import (
    filter_worklist,
    load_worklist,
    order_worklist,
    read_review,
    step,
)
from VertebralFractureLib.core.errors import InputError

log = logging.getLogger(__name__)

EFFECTS = ("none", "paint", "erase", "scissors", "islands")
LAYOUT = "review"
# the views in page order (the browser tests find the axial view as the first image)
VIEWS = ("axial", "sagittal", "coronal", "3d")
# bone window: vertebral cortex and marrow both visible
WINDOW, LEVEL = 1800.0, 400.0
KEYS_SCRIPT = """
window.addEventListener('keydown', (e) => {
  const tag = (e.target && e.target.tagName) || '';
  if (tag === 'INPUT' || tag === 'TEXTAREA') return;
  if (e.key === 'ArrowDown' || e.key === 'j') window.trame.trigger('vf_step', [1]);
  if (e.key === 'ArrowUp' || e.key === 'k') window.trame.trigger('vf_step', [-1]);
});
"""


def _effect_types() -> dict[str, type]:
    from trame_slicer.segmentation import (
        SegmentationEffectErase,
        SegmentationEffectIslands,
        SegmentationEffectNoTool,
        SegmentationEffectPaint,
        SegmentationEffectScissors,
    )

    return {"none": SegmentationEffectNoTool, "paint": SegmentationEffectPaint, "erase": SegmentationEffectErase,
            "scissors": SegmentationEffectScissors, "islands": SegmentationEffectIslands}


# 3D surfaces by Surface Nets with its own constrained smoothing: ~5x faster than flying edges plus windowed-sinc
# smoothing (0.04 s instead of 0.2-0.35 s for the 14 vertebrae of the demo CT) and smooth enough to find a vertebra
SURFACE_CONVERSION = {"Conversion method": "1", "SurfaceNets smoothing": "1", "Smoothing factor": "0"}


def _warm_up() -> None:
    """Import what opening a case, Recompute and sign-off need (ITK, NIfTI, DICOM codes, pyradiomics, torch,
    highdicom for an approved correction's DICOM files) and load the classifier, in a background thread while the
    reviewer picks a case: none of it is on the first click."""
    from VertebralFractureLib.outputs.segmentation_files import prepare_dicom_seg, terminology_entry
    from VertebralFractureLib.stages.classification import load_classifier

    try:
        import nibabel  # noqa: F401 - the NIfTI completeness check of every CT read
        import radiomics  # noqa: F401 - Recompute extracts the edited vertebrae's features
        import SimpleITK  # noqa: F401

        # the stages Recompute's analyse imports on first use (morphometry pulls in scipy.ndimage: 0.2 s)
        from VertebralFractureLib.io import validation  # noqa: F401
        from VertebralFractureLib.stages import morphometry, preprocess  # noqa: F401
        from VertebralFractureLib.stages import radiomics as vf_radiomics  # noqa: F401

        terminology_entry(20)  # L1
        load_classifier()
        prepare_dicom_seg()
    except Exception:  # noqa: BLE001 - opening a case or Recompute reports a broken install itself
        log.debug("warm-up failed", exc_info=True)


def _register_view_factories(view_manager, server) -> None:
    """trame-slicer's remote (image-streaming) view factories, as ``register_rca_factories`` makes them, but
    views that do not render while they are built: the default renders each view once per property set
    (~240 renders, 1.5 s of the server start); the browser's first frame renders them anyway."""
    from functools import partial

    from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
    from trame_slicer.rca_view.rca_view_factory import RemoteViewFactory
    from trame_slicer.views import NoScheduleRendering, SliceView, ThreeDView, ViewType

    for view_ctor, view_type, ui in ((SliceView, ViewType.SLICE_VIEW, create_vertical_slice_view_gutter_ui),
                                     (ThreeDView, ViewType.THREE_D_VIEW, create_vertical_view_gutter_ui)):
        ctor = partial(view_ctor, scheduled_render_strategy=NoScheduleRendering())
        view_manager.register_factory(RemoteViewFactory(server, ctor, view_type, populate_view_ui_f=ui))


def _quad_layout():
    """Axial and sagittal on top, coronal and 3D below (:data:`VIEWS` order)."""
    from trame_slicer.views import Layout, LayoutDirection
    from trame_slicer.views import ViewLayoutDefinition as View

    return Layout(LayoutDirection.Vertical, [
        Layout(LayoutDirection.Horizontal, [View.axial_view(), View.sagittal_view()]),
        Layout(LayoutDirection.Horizontal, [View.coronal_view(), View.threed_view()]),
    ])


class ReviewApp:
    """The review server over one output folder.

    Args:
        out: batch output (``cohort.csv`` + case folders) or one ``run`` output.
        token: access token the page must present (None: none needed, loopback only).
        options: pipeline options of Recompute.
        server: a trame server (tests pass their own); None makes one.
    """

    def __init__(self, out: str | Path, *, token: str | None = None, options: PipelineOptions | None = None,
                 server=None) -> None:
        if not os.environ.get("DISPLAY"):  # headless: EGL directly, without the failed X attempt and its warning
            os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp

        start = time.perf_counter()
        self.out = Path(out).resolve()
        self.token = token
        self.options = options or PipelineOptions()
        self.entries = order_worklist(load_worklist(self.out))
        self.case: OpenCase | None = None
        self.ct_cache = CtCache()
        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.slicer = SlicerApp()
        _register_view_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout_dict({LAYOUT: _quad_layout()})
        self.layout_manager.set_layout(LAYOUT)
        self.editor = self.slicer.segmentation_editor
        self.editor.segmentation_modified.connect(self._on_segmentation_modified)
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._quiet = False  # node rebuilds (load, Recompute) are not the reviewer's edits
        self._init_state()
        self._build_ui()
        self.timings: dict[str, float] = {"build": time.perf_counter() - start}
        self._read_ahead(next((e.name for e in self.entries if e.openable), None))  # the top of the worklist
        # torch and the classifier load in the background while the reviewer picks a case, not on the first Recompute
        threading.Thread(target=_warm_up, name="review-warm-up", daemon=True).start()

    # --- state ------------------------------------------------------------------------------------
    @property
    def state(self):
        return self.server.state

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "Vertebral fracture review"
        s.vf_filter, s.vf_review_filter, s.vf_case, s.vf_note, s.vf_message, s.vf_error = "", "all", "", "", "", ""
        s.vf_summary, s.vf_rows, s.vf_effect, s.vf_brush, s.vf_busy = {}, [], "none", 8.0, False
        s.vf_effect_active = "none"  # the effect the editor runs (vf_effect is the button, ahead of the server)
        s.vf_active_segment, s.vf_rename_level, s.vf_review = "", "", ""
        self._publish_worklist()
        s.change("vf_filter", "vf_review_filter")(lambda **_: self._publish_worklist())
        s.change("vf_effect")(lambda vf_effect, **_: self._set_effect(vf_effect))
        s.change("vf_brush")(lambda vf_brush, **_: self._set_brush(vf_brush))
        s.change("vf_active_segment")(lambda vf_active_segment, **_: self._set_active_segment(vf_active_segment))
        for name, handler in {
            "vf_open": self.open_case, "vf_step": self.step_case, "vf_centre": self.centre,
            "vf_recompute": self.recompute, "vf_sign_off": self.sign_off, "vf_rename": self.rename,
            "vf_islands": self.apply_islands,
        }.items():
            self.server.trigger(name)(self._guarded(handler))

    def _publish_worklist(self) -> None:
        shown = filter_worklist(self.entries, self.state.vf_filter or "", self.state.vf_review_filter or "all")
        self.state.vf_worklist = [e.as_row() for e in shown]
        self.state.vf_total = len(self.entries)

    def _publish_case(self) -> None:
        if self.case is None:
            self.state.vf_summary, self.state.vf_rows = {}, []
            return
        self.state.vf_summary = self.case.summary()
        self.state.vf_rows = self.case.rows()

    def _guarded(self, handler):
        """Run a page action; an InputError becomes the page's error line instead of a traceback."""

        def run(*args):
            self.state.vf_error = ""
            try:
                handler(*args)
            except InputError as exc:
                self.state.vf_error = str(exc)
            except Exception as exc:  # noqa: BLE001 - the server must survive one bad action
                log.exception("review action failed")
                self.state.vf_error = f"{type(exc).__name__}: {exc}"
            self.state.flush()

        return run

    # --- actions ----------------------------------------------------------------------------------
    def open_case(self, name: str) -> None:
        """Show case ``name`` (a worklist name; anything else is refused)."""
        start = time.perf_counter()
        folder = safety.case_folder(self.out, name, [e.name for e in self.entries if e.openable])
        self.editor.deactivate_effect()
        self.slicer.scene.Clear(0)
        self.case = None
        # nothing of the case shown before stays on the page if this one cannot be opened
        self.state.vf_case, self.state.vf_note, self.state.vf_review, self.state.vf_message = "", "", "", ""
        self._publish_case()
        self.case = OpenCase(self.slicer.scene, self.out, name, folder, options=self.options, ct_cache=self.ct_cache)
        self._show_case()
        # a case signed off before shows its note again, so that a second sign-off does not drop it unseen
        self.state.vf_case, self.state.vf_effect = name, "none"
        self.state.vf_note = str(read_review(folder).get("note") or "")
        self.state.vf_review = next((e.review for e in self.entries if e.name == name), "")
        self.state.vf_message = f"opened {name}"
        self._publish_case()
        self.timings["open"] = time.perf_counter() - start
        # the usual next click: the following case of the shown worklist
        shown = filter_worklist(self.entries, self.state.vf_filter or "", self.state.vf_review_filter or "all")
        self._read_ahead(step(shown, name, 1))

    def _read_ahead(self, name: str | None) -> None:
        """Start reading the CT of case ``name`` (a worklist name) in the background."""
        if name is None:
            return
        try:
            self.ct_cache.prefetch(slicer_logic.case_ct_path(safety.case_folder(self.out, name, [name])))
        except InputError:
            pass  # reported when that case is opened

    def _show_case(self) -> None:
        volume_node = self.case.nodes.volume_node
        display = volume_node.GetDisplayNode()
        if display is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(WINDOW, LEVEL)
        self.slicer.display_manager.show_volume_in_slice_background(volume_node)
        self.slicer.display_manager.show_volume_in_slice_foreground(None)
        self._activate_segmentation()
        self.state.vf_active_segment = self.editor.get_active_segment_id()
        self.slicer.display_manager.reset_views()

    def step_case(self, offset: int) -> None:
        shown = filter_worklist(self.entries, self.state.vf_filter or "", self.state.vf_review_filter or "all")
        name = step(shown, self.state.vf_case or None, int(offset))
        if name is not None:
            self.open_case(name)

    def centre(self, label: int) -> None:
        """Centre the slice views on vertebra ``label`` and make its segment the one being edited."""
        if self.case is None:
            return
        ras = self.case.centre_ras(int(label))
        if ras is None:
            return
        for view in self.slicer.view_manager.get_slice_views():
            view.get_view_node().JumpSliceByCentering(*ras)
        for view in self.slicer.view_manager.get_threed_views():
            view.set_focal_point(*ras)
        row = next((r for r in self.state.vf_rows if r["label"] == int(label)), None)
        if row is not None and row["segment_id"]:
            self.state.vf_active_segment = row["segment_id"]
            self._set_active_segment(row["segment_id"])
        self.state.vf_message = f"centred on {row['level'] if row else label}"

    def recompute(self) -> None:
        if self.case is None:
            return
        self.editor.deactivate_effect()
        self.state.vf_effect = "none"
        self.case.recompute()
        self._reactivate()
        self.state.vf_message = f"recomputed in {self.case.timings['recompute']:.1f} s"

    def rename(self) -> None:
        if self.case is None or not self.state.vf_active_segment:
            raise InputError("choose a vertebra (click its row) before renaming its level")
        level = str(self.state.vf_rename_level or "").strip().upper()
        mapping = self.case.rename(self.state.vf_active_segment, level)
        self._reactivate()
        moved = ", ".join(f"{a}->{b}" for a, b in mapping.items() if a != b)
        self.state.vf_message = f"renamed ({moved or 'no change'})"

    def apply_islands(self) -> None:
        """Keep the largest island of the selected segment (Islands effect)."""
        from trame_slicer.segmentation import SegmentationEffectIslands

        effect = self.editor.set_active_effect_type(SegmentationEffectIslands)
        effect.keep_largest_island()
        self.state.vf_effect = "islands"

    def sign_off(self, status: str) -> None:
        if self.case is None:
            raise InputError("open a case before signing it off")
        self.editor.deactivate_effect()
        self.state.vf_effect = "none"
        record = self.case.sign_off(status, self.state.vf_note)
        for entry in self.entries:
            if entry.name == self.case.name:
                entry.review = status
        self.state.vf_review = status
        self._reactivate()
        self._publish_worklist()
        self.state.vf_message = " ".join([f"{self.case.name} {status}", *record["warnings"]])

    def _reactivate(self) -> None:
        """After the segmentation node was rebuilt: editor, surfaces and table follow."""
        active = self.state.vf_active_segment
        self._activate_segmentation()
        if active in self.editor.get_segment_ids():
            self.editor.set_active_segment_id(active)
        self.state.vf_active_segment = self.editor.get_active_segment_id()
        self._publish_case()

    # --- editor -----------------------------------------------------------------------------------
    def _activate_segmentation(self) -> None:
        """Give the case's segmentation to the Segment Editor; its 3D surfaces follow once the page has the
        2D views and the table (:meth:`_show_surfaces`)."""
        self._quiet = True
        try:
            segmentation = self.case.segmentation_node.GetSegmentation()
            for name, value in SURFACE_CONVERSION.items():
                segmentation.SetConversionParameter(name, value)
            self.editor.set_surface_representation_enabled(False)
            self.editor.set_active_segmentation(self.case.segmentation_node, self.case.nodes.volume_node)
        finally:
            self._quiet = False
        try:
            asyncio.get_running_loop().call_later(0.05, self._show_surfaces)
        except RuntimeError:  # no server loop (scripts, tests): now
            self._show_surfaces()

    def _show_surfaces(self) -> None:
        if self.case is None:
            return
        self._quiet = True
        try:
            self.editor.set_surface_representation_enabled(True)
        finally:
            self._quiet = False

    def _set_effect(self, name: str) -> None:
        if self.case is None or name not in EFFECTS:
            return
        effect = self.editor.set_active_effect_type(_effect_types()[name])
        if name in ("paint", "erase") and effect is not None:
            self._set_brush(self.state.vf_brush)
        self.state.vf_effect_active = name

    def _set_brush(self, percent: float) -> None:
        from trame_slicer.segmentation import AbstractSegmentationEffectBrush, BrushDiameterMode

        effect = self.editor.active_effect
        if isinstance(effect, AbstractSegmentationEffectBrush):
            effect.set_brush_diameter(float(percent), BrushDiameterMode.ScreenRelative)

    def _set_active_segment(self, segment_id: str) -> None:
        if self.case is not None and segment_id in self.editor.get_segment_ids():
            self.editor.set_active_segment_id(segment_id)

    def _on_segmentation_modified(self, *_: Any) -> None:
        if self.case is None or self._quiet:
            return
        self.case.mark_edited()
        # one table refresh per stroke, not per modified event
        loop = asyncio.get_event_loop()
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
        self._refresh_handle = loop.call_later(0.3, self._refresh_after_edit)

    def _refresh_after_edit(self) -> None:
        self._refresh_handle = None
        with self.state:
            self._publish_case()

    # --- page -------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import VAppLayout
        from trame.widgets import client, html
        from trame.widgets import vuetify3 as v

        with VAppLayout(self.server, theme="dark") as layout:
            client.Script(KEYS_SCRIPT)
            with v.VAppBar(density="compact"):
                v.VToolbarTitle("Vertebral fracture review")
                html.Span("{{ vf_case ? vf_case + (vf_review ? ' - ' + vf_review : '') : '' }}", id="vf-title",
                          classes="mx-4")
                v.VProgressCircular(indeterminate=("trame__busy",), size=18, width=2, classes="mx-4")
            with v.VNavigationDrawer(permanent=True, width=300, location="left"):
                self._worklist_ui(v, html)
            with v.VNavigationDrawer(permanent=True, width=460, location="right"):
                self._case_ui(v, html)
            with v.VMain(), html.Div(style="height: calc(100vh - 48px); display: flex;", id="vf-views"):
                self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout

    def _worklist_ui(self, v, html) -> None:
        v.VTextField(v_model=("vf_filter",), label="Filter", density="compact", hide_details=True, id="vf-filter",
                     classes="ma-2", clearable=True)
        v.VSelect(v_model=("vf_review_filter",), items=("['all', 'todo', 'approved', 'rejected']",),
                  label="Review", density="compact", hide_details=True, classes="ma-2", id="vf-review-filter")
        html.Div("{{ vf_worklist.length }} of {{ vf_total }} cases (needs review first, then probability)",
                 classes="text-caption mx-2")
        with v.VList(density="compact", id="vf-worklist"):
            with v.VListItem(
                v_for="c in vf_worklist", key="c.name", value=("c.name",), active=("c.name === vf_case",),
                disabled=("!c.openable",), click="trigger('vf_open', [c.name])", classes="vf-case",
                __properties=[("data_case", "data-case")], data_case=("c.name",),
            ):
                v.VListItemTitle("{{ c.name }}")
                # a failed case shows its error (the whole line on hover), a case that ran its answer
                v.VListItemSubtitle(
                    "{{ c.status }}{{ c.error ? ': ' + c.error : '' }}"
                    "{{ c.openable ? ' · p=' + (c.probability === '' ? 'n/a' : c.probability) : '' }}"
                    "{{ c.worst_level ? ' · ' + c.worst_level + ' G' + c.worst_grade : '' }}"
                    "{{ c.needs_review && c.openable ? ' · needs review' : '' }}{{ c.review ? ' · ' + c.review : '' }}"
                    "{{ c.new_fractures ? ' · new since prior: ' + c.new_fractures : '' }}",
                    __properties=[("title", "title")], title=("c.error",),
                )

    def _case_ui(self, v, html) -> None:
        with html.Div(classes="pa-2", v_if=("vf_case",)):
            html.Div("Patient fracture probability: {{ vf_summary.probability === '' ? 'n/a' : vf_summary.probability }}"
                     "{{ vf_summary.edited ? ' (edited: press Recompute)' : '' }}", id="vf-summary")
            html.Div("{{ vf_summary.bone_density }}", id="vf-bone-density", classes="text-caption")
            html.Div("{{ vf_summary.spinal_deformity }}", id="vf-spinal-deformity", classes="text-caption")
            html.Div("{{ vf_summary.follow_up }}", id="vf-follow-up", classes="text-caption")
            with v.VTable(density="compact", id="vf-table"):
                with html.Thead(), html.Tr():
                    for head in ("", "Level", "Grade", "Type", "p", "Voxels"):
                        html.Th(head)
                with html.Tbody(), html.Tr(
                    v_for="r in vf_rows", key="r.label", click="trigger('vf_centre', [r.label])",
                    classes=("r.segment_id === vf_active_segment ? 'vf-row bg-grey-darken-2' : 'vf-row'",),
                    __properties=[("data_level", "data-level")], data_level=("r.level",), style="cursor: pointer",
                ):
                    with html.Td():
                        html.Span(style=("{ background: r.color, display: 'inline-block', width: '12px', "
                                         "height: '12px' }",))
                    html.Td("{{ r.level }}", classes="vf-level")
                    html.Td("{{ r.grade }}")
                    html.Td("{{ r.type }}")
                    html.Td("{{ r.probability }}", classes="vf-probability")
                    html.Td("{{ r.voxels }}", classes="vf-voxels")
            html.Div("Correct the segment of the selected row:", classes="text-caption mt-2")
            with v.VBtnToggle(v_model=("vf_effect",), mandatory=True, density="compact", id="vf-effects"):
                for name in EFFECTS:
                    v.VBtn(name.capitalize(), value=name, id=f"vf-effect-{name}", size="small")
            html.Span("{{ vf_effect_active }}", id="vf-effect-active", style="display: none")
            v.VSlider(v_model=("vf_brush",), min=1, max=30, step=1, label="Brush %", density="compact",
                      hide_details=True, v_if=("vf_effect === 'paint' || vf_effect === 'erase'",))
            v.VBtn("Keep largest island", click="trigger('vf_islands')", size="small", id="vf-islands",
                   v_if=("vf_effect === 'islands'",))
            with html.Div(classes="d-flex align-center mt-2"):
                v.VTextField(v_model=("vf_rename_level",), label="Rename selected to (e.g. L1)", density="compact",
                             hide_details=True, id="vf-rename-level")
                v.VBtn("Rename", click="trigger('vf_rename')", size="small", classes="ml-2", id="vf-rename")
            v.VBtn("Recompute", click="trigger('vf_recompute')", block=True, classes="mt-3", color="primary",
                   id="vf-recompute")
            v.VTextarea(v_model=("vf_note",), label="Note (optional)", rows=2, density="compact", classes="mt-3",
                        hide_details=True, id="vf-note")
            with html.Div(classes="d-flex mt-2"):
                v.VBtn("Approve", click="trigger('vf_sign_off', ['approved'])", color="success", id="vf-approve",
                       classes="mr-2")
                v.VBtn("Reject", click="trigger('vf_sign_off', ['rejected'])", color="error", id="vf-reject")
            html.Div("{{ w }}", v_for="w in vf_summary.warnings || []", classes="text-caption text-warning mt-1")
        html.Div("Pick a case on the left (arrow keys: next/previous).", v_if=("!vf_case",), classes="pa-2")
        html.Div("{{ vf_message }}", id="vf-message", classes="pa-2 text-caption")
        html.Div("{{ vf_error }}", id="vf-error", classes="pa-2 text-error", v_show=("vf_error",))


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port out of range or taken before the app loads and says its address.

    Raises:
        InputError: with what to do."""
    import socket

    if not 0 < port < 65536:
        raise InputError(f"--port {port}: give a port between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed one's TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"--port {port} on {host}: {exc.strerror or exc}; give another --port") from None


def serve(out: str | Path, *, port: int = 8080, host: str = "127.0.0.1", allow_remote: bool = False,
          require_token: bool = False, options: PipelineOptions | None = None) -> None:
    """Start the review server (blocking) and print its address (with the token when one is needed).

    Raises:
        InputError: ``out`` is no batch/run output, or ``host`` is remote without ``allow_remote``.
    """
    needs_token = safety.check_bind(host, allow_remote) or require_token
    _check_port_free(host, port)
    token = safety.new_token() if needs_token else None
    app = ReviewApp(out, token=token, options=options)
    # trame reads its own options from sys.argv; give it only these (ours are parsed already)
    trame_args = ["--server"] + (["--authKey", token] if token else [])
    parser = app.server.cli
    parse = parser.parse_known_args
    parser.parse_known_args = lambda args=None, namespace=None: parse(trame_args if args is None else args, namespace)
    url = f"http://{host}:{port}/" + (f"?secret={token}" if token else "")
    print(f"review app: {url}  ({len(app.entries)} cases in {app.out}; Ctrl-C stops)", flush=True)
    if token:
        print(f"access token: {token} (the page needs it; share it only with the reviewers)", flush=True)
    sys.stdout.flush()
    app.server.start(port=port, host=host, open_browser=False, show_connection_info=False)
