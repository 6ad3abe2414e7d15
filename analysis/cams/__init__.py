"""Class activation maps of the nodule classifier, and how well they localise the nodule.

Two heatmaps of the one logit (nodule vs non-nodule):

- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) at any ResNet stage, computed by Captum's
  ``LayerGradCam``: ``ReLU(sum_k mean_ij(dy/dA_k) * A_k)``.
- ``cam``: plain CAM (Zhou et al. 2016) at ``layer4``, which ResNet's global-average-pool
  head allows: ``sum_k w_k * A_k`` with ``w`` the weights of ``fc`` (no ReLU). With that
  head Grad-CAM at ``layer4`` without its ReLU is exactly ``CAM / (h * w)`` (a test checks it).

Where a heatmap cell lies on the patch. Cell ``j`` of a stage with stride ``s`` is the
centre of its receptive field at input pixel ``s * j`` for torchvision's ResNets (every
stride-2 layer has an odd kernel and padding ``k // 2``), whereas the usual image resize
(``F.interpolate(mode="bilinear")``, as Captum's ``LayerAttribution.interpolate`` does with
that mode, or ``cv2.resize``, as pytorch-grad-cam does) puts it at ``s * j + (s - 1) / 2``:
half a cell down and right, 15.5 px for ``layer4`` (stride 32). ``upsample="aligned"``
(the default) interpolates between the true cell centres; ``"bilinear"`` is the usual
resize, kept to measure the difference. A patch of even size has its centre (the
candidate) between pixels ``size/2 - 1`` and ``size/2``, half a pixel from cell ``size/(2s)``.

The three channels of a patch are three planes (axial, coronal, sagittal; see
:mod:`common.data.patches`), so one heatmap pixel ``(row, col)`` stands for three world points,
one per plane. The grid lays the same map over every plane.

Pointing game (the localisation score). For a positive candidate whose annotated nodule
(the nearest annotation of its scan; it must contain the candidate) has centre ``n`` and
radius ``R = diameter_mm / 2``: take the heatmap's peak pixel (argmax; a map with no
peak, all values equal, is a miss) and its world point ``w_k`` in plane ``k``. The plane
``k`` is a *hit* when ``|w_k - n_k| <= R``, with ``n_k`` the orthogonal projection of ``n``
onto plane ``k`` (the plane through the candidate). Reported: ``axial`` (the axial plane
hits) and ``all_planes`` (all three hit), over the true positives (label 1 and
probability >= threshold) and over all positives, each with a 95% Wilson interval.

Controls come with every figure, because the centred score alone proves little:
``centre_baseline`` (a "heatmap" that always peaks at the patch centre) scores about 1.0,
since candidates sit on their nodule (synthetic positives lie within 0.3 R of its centre),
and ``random_init`` (the same heatmap of a randomly initialised model of the run's
architecture) scores 1.0 at ResNet-50's ``layer4`` at 64 px; ``intensity_baseline`` points at the
densest spot of the patch (:func:`intensity_maps`). The ``shifted`` score needs
real localisation: every positive is cut again from its CT scan with the nodule moved off
the centre, to the same pixel in all three planes (:func:`shifted_centres`), where the
centre baseline mostly misses.

Research software on synthetic or public data; never for diagnosis.
"""

# The package's public names, one module per job: maps (the heatmaps), geometry (peaks in world
# space), runs (a finished results folder), pointing (the scores and controls), figures (the grid
# figure and cam.json).
from analysis.cams.figures import (  # noqa: F401
    CAM_JSON,
    CATEGORIES,
    GRID_PNG,
    CamReport,
    Case,
    cam_figures,
    draw_grid,
    explain_run,
    outlines,
    select_cases,
)
from analysis.cams.geometry import nearest_nodule, plane_hits, project  # noqa: F401
from analysis.cams.maps import (  # noqa: F401
    AUTO_MIN_CELLS,
    METHODS,
    RESNET_STRIDES,
    UPSAMPLING,
    heatmaps,
    interpolation_matrix,
    low_res_maps,
    peaks,
    resolve_layer,
    upsample,
)
from analysis.cams.pointing import (  # noqa: F401
    PointingSet,
    compare_settings,
    cut_patches,
    format_table,
    intensity_maps,
    pointing_game,
    pointing_set,
    random_init_model,
    score_maps,
    score_set,
    shifted_centres,
    wilson,
)
from analysis.cams.runs import LoadedRun, load_run, maps_for, test_probabilities  # noqa: F401
