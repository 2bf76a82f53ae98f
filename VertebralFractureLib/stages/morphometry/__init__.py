"""Vertebral morphometry from a VerSe label map: body heights, Genant grade and type, trabecular HU.

Everything is measured in physical LPS millimetres, so the result does not depend on the image's
orientation (LPS, RAS, PIR, oblique) or spacing. Per vertebra:

1. **Local frame** (:func:`local_frame`). The superior axis ``si`` follows the spine: the direction
   from the caudal to the cranial neighbour's body centre (one neighbour: from it to this vertebra).
   The centres come from a first pass along the chord between whole-label centroids; a neighbour cut
   by the field of view gives the centroid of its body remnant, found along the chord that skips the
   vertebra being measured (so that centre does not follow that vertebra's shape). A vertebra without
   neighbours uses the smallest principal axis of its body. The vertebra is resampled on a 1 mm grid
   aligned with ``si`` and projected along it: the body is the thickest
   part of that footprint (maximum of its 2D distance transform); the spinal canal is the largest
   hole of the footprint. The anterior axis ``ap`` points from the canal to the body centre (without
   a canal, along the footprint's mirror axis near patient anterior; without a footprint, patient anterior).
   ``lr = si x ap``.
2. **Body isolation** (:func:`vertebral_body_mask`): voxels of the label anterior to the posterior
   wall, inside the body's footprint opened with a disc of half its inscribed radius (this removes
   pedicle stubs and transverse processes). Pedicles, laminae and processes lie behind that wall.
3. **Heights** (:func:`measure_heights`, mm). The anterior and posterior walls are the outermost body
   surface (2nd/98th percentile) on lines along ``ap`` in the mid-sagittal slab over the central 80 %
   of the body height, ignoring positions more than 2.5 mm beyond the wall's median position
   (osteophytes); ``D`` is the depth between them.
   Heights are measured on lines parallel to ``si`` in strips at 8-20 % of ``D`` from the anterior
   wall (Ha), 44-56 % (Hm) and 8-20 % from the posterior wall (Hp), ``|lr| <= 2 mm``. This is the
   project's one definition of body heights (the fracture simulation compresses bodies in this frame
   and reports the heights it removed at these strips, which the tests compare with this measurement).
   A line's height is the length of its run inside the label, the ends being the 0.5 crossings of the linearly interpolated mask sampled every 0.25 mm (sub-voxel);
   lines that leave the body through a slanted wall instead of an endplate are dropped; a height is
   the mean of its strip's lines. The strips are measured on the label with the front of its body filled up to
   its convex hull (:func:`.heights.fill_front`: from 15 % of the depth in front of the centre to where the label
   ends at mid-height, within 8 mm of mid-width, no higher or lower than the middle strip's endplates; other
   vertebrae's voxels and the voxel grid's staircase left out): a front is convex, a wedge keeps it so, and a gap
   or a corner the segmentation missed would otherwise read as a wedge. The walls are found before the fill.
4. **Genant semi-quantitative grade** (Genant HK, Wu CY, van Kuijk C, Nevitt MC. Vertebral fracture
   assessment using a semiquantitative technique. J Bone Miner Res 1993;8(9):1137-1148)::

       wedge     = 1 - (Ha / Hp) / (Ha / Hp)_normal
       biconcave = 1 - (Hm / Hp) / (Hm / Hp)_normal
       crush     = 1 - Hp / Hp_expected
       height_loss_ratio = max(wedge, biconcave, crush); genant_type = the argmax
       grade 0: loss < 0.20, 1: 0.20 <= loss < 0.25, 2: 0.25 <= loss < 0.40, 3: loss >= 0.40

   ``(Ha/Hp)_normal`` and ``(Hm/Hp)_normal`` are the median ratios of the normal, non-partial
   neighbours within two levels, capped at 1 (they excuse a physiological wedge or endplate
   concavity shared with the neighbours, never add loss; 1.0 without neighbours: Genant's plain
   ``1 - Ha/Hp``, ``1 - Hm/Hp``);
   ``Hp_expected`` is the mean posterior height of the nearest normal neighbour above and below, or
   the vertebra's own earlier Hp when a ``baseline`` is given; without either, crush is not assessed.
   Neighbours found fractured are removed from the references and the grading repeated.
   Grade 0 has type ``"normal"``. Vertebrae cut by the field of view are flagged ``partial`` and
   not graded (grade None, type "", probability NaN).
5. **Trabecular HU**: mean and median CT value in the body eroded by ``clamp(0.2 min(Hm, D), 2, 5)``
   mm (no cortex, no endplates). ``low_density`` is ``trabecular_hu <= 160`` HU, the threshold of
   Pickhardt PJ et al., Ann Intern Med 2013;158(8):588-595 (L1 trabecular attenuation <= 160 HU:
   about 90 % sensitive for DXA osteoporosis; <= 110 HU: more than 90 % specific). The study
   measured L1; other thoracic and lumbar levels are flagged with the same threshold and a note, cervical ones
   not at all (their bodies are denser; a note says so).
6. **Morphometric fracture probability** ``p = 1 / (1 + exp(-(loss - 0.20) / 0.025))``: 0.5 at the
   grade 1 threshold, 0.88 at 25 % loss, 0.12 at 15 %. Stored in ``probability_morphometry`` and
   ``fracture_probability``; the classifier combines it later.

Modules: :mod:`.geometry` (constants, local frame, label crop), :mod:`.frame` (one vertebra's frame,
body and heights for a given axis), :mod:`.heights` (walls and strip heights along lines),
:mod:`.spine` (axes from the neighbours, every vertebra), :mod:`.density` (trabecular HU),
:mod:`.grading` (Genant grade and type), :mod:`.measure` (:func:`measure_vertebrae`, the entry point).
"""

from VertebralFractureLib.stages.morphometry.density import LOW_DENSITY_HU, OSTEOPOROSIS_HU, trabecular_hu
from VertebralFractureLib.stages.morphometry.geometry import (
    GRID_MM,
    MIDDLE_STRIP,
    NEIGHBOUR_LEVELS,
    SLAB_HALF_WIDTH_MM,
    WALL_STRIP,
    Heights,
    LocalFrame,
    VertebraGeometry,
)
from VertebralFractureLib.stages.morphometry.grading import (
    GENANT_THRESHOLDS,
    GENANT_TYPES,
    MAX_TRABECULAR_MEDIAN_HU,
    MIN_BODY_HEIGHT_MM,
    genant_grade,
    genant_ratios,
    genant_type,
    grade_records,
    graded_level,
    morphometry_probability,
    plausibility_problem,
    spinal_deformity_index,
)
from VertebralFractureLib.stages.morphometry.measure import measure_vertebrae
from VertebralFractureLib.stages.morphometry.spine import (
    analyse_vertebrae,
    local_frame,
    measure_heights,
    remeasure,
    vertebral_body_mask,
)

__all__ = [
    "GENANT_THRESHOLDS",
    "GENANT_TYPES",
    "GRID_MM",
    "LOW_DENSITY_HU",
    "MAX_TRABECULAR_MEDIAN_HU",
    "MIDDLE_STRIP",
    "MIN_BODY_HEIGHT_MM",
    "NEIGHBOUR_LEVELS",
    "OSTEOPOROSIS_HU",
    "SLAB_HALF_WIDTH_MM",
    "WALL_STRIP",
    "Heights",
    "LocalFrame",
    "VertebraGeometry",
    "analyse_vertebrae",
    "genant_grade",
    "genant_ratios",
    "genant_type",
    "grade_records",
    "graded_level",
    "local_frame",
    "measure_heights",
    "measure_vertebrae",
    "spinal_deformity_index",
    "morphometry_probability",
    "plausibility_problem",
    "remeasure",
    "trabecular_hu",
    "vertebral_body_mask",
]
