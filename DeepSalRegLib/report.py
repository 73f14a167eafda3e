"""One PNG per registration: what a reader needs to judge the result at a glance.

Panels, all on the fixed image grid so that they line up:

    fixed | moving (no transform) | warped moving | checkerboard before | checkerboard after |
    deformation grid | joint saliency | Jacobian determinant

A 2D registration shows them in two rows of four; a 3D one in three rows of eight, the middle axial,
coronal and sagittal slices of the fixed image. Display conventions:

* Slices are cut from the fixed image along the index axes closest to the LPS axes and shown
  radiologically: axial with anterior up and the patient's right on the left of the screen, coronal and
  sagittal with superior up (sagittal: anterior on the left). The letters follow the image header. 2D
  images keep their row/column layout (row 0 at the top).
* Every panel is drawn in millimetres (``imshow`` extent from the spacing, equal aspect), so an
  anisotropic 1.4 x 1.4 x 4 mm volume is neither squashed nor stretched.
* The deformation grid is not a resampled grid picture: it is the contour lines of the in-plane
  components of ``phi(p) = p + d(p)`` (fixed -> moving), i.e. the straight grid lines of the moving image
  as they lie in the fixed image, deformed exactly as the warped image is. (Forward-mapping the fixed
  grid's lines by ``phi`` would give lines in moving space, which do not belong over the fixed image.)
* The Jacobian determinant is that of ``phi``: locally (volume in the moving image) / (volume in the
  fixed image). Folding (det <= 0) is painted in a solid marker colour on top of the colour map.

``write_report(result, path)`` writes the picture atomically; ``render_report(result)`` returns the
matplotlib ``Figure``. matplotlib is imported inside the functions and used through its object API (no
``pyplot``): the host application's backend (e.g. Slicer's) is left alone and no window ever opens.
Only the displayed slices are extracted and resampled, so large CT volumes cost little memory.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry, io

__all__ = ["write_report", "render_report", "panel_titles", "PANELS"]

#: Panel titles in drawing order (``panel_titles`` reads them back from a figure).
PANELS = (
    "Fixed",
    "Moving (no registration)",
    "Warped moving",
    "Checkerboard before",
    "Checkerboard after",
    "Deformation grid",
    "Joint saliency",
    "Jacobian determinant",
)

_DPI = 100
_PANEL_INCHES = 2.35  # width of one panel; eight of them stay readable at 100 dpi
_FOLD_COLOUR = "#00e000"  # folding marker: a green that appears nowhere in RdBu_r
_GRID_COLOUR = "#ffd21f"
_LETTER_COLOUR = "#8fdcff"
_CHECKER_TILES = 8  # tiles along the longer side of a slice
_GRID_LINES = 14  # about this many deformation-grid lines across the largest slice


# --------------------------------------------------------------------------------------------------
# orientation and slicing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Orientation:
    """Which fixed index axis is shown along which physical axis.

    The *canonical* array of an image on the fixed grid is its numpy array with the axes permuted and
    flipped so that canonical ITK axis ``j`` runs along physical axis ``j`` (x = L, y = P, z = S):
    ``perm[j]`` is the fixed index axis closest to physical axis ``j`` and ``flip[j]`` whether it runs
    against it. ``size`` and ``spacing`` are per canonical ITK axis.
    """

    perm: tuple[int, ...]
    flip: tuple[bool, ...]
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    to_index: np.ndarray  # (nd, nd): physical mm (x-y-z) -> fixed index steps (ITK order)

    @classmethod
    def of(cls, image: sitk.Image) -> "_Orientation":
        nd = image.GetDimension()
        direction = np.array(image.GetDirection()).reshape(nd, nd)  # column i: direction of index axis i
        # The permutation with the largest total alignment (a per-axis argmax can pick one index axis
        # twice when the direction is oblique).
        perm = max(itertools.permutations(range(nd)),
                   key=lambda p: sum(abs(direction[j, p[j]]) for j in range(nd)))
        flip = tuple(bool(direction[j, perm[j]] < 0) for j in range(nd))
        size = tuple(int(image.GetSize()[perm[j]]) for j in range(nd))
        spacing = tuple(float(image.GetSpacing()[perm[j]]) for j in range(nd))
        to_index = np.linalg.inv(direction @ np.diag(image.GetSpacing()))
        return cls(tuple(perm), flip, size, spacing, to_index)

    @property
    def nd(self) -> int:
        return len(self.perm)

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """Numpy array ``(*S[, components])`` on the fixed grid -> canonical array (a view, no copy)."""
        nd = self.nd
        # canonical numpy axis k = canonical ITK axis nd-1-k = fixed index axis perm[nd-1-k], which is
        # numpy axis nd-1-perm[nd-1-k] of the input; trailing component axes stay where they are
        axes = [nd - 1 - self.perm[nd - 1 - k] for k in range(nd)] + list(range(nd, array.ndim))
        out = np.transpose(array, axes)
        flips = [k for k in range(nd) if self.flip[nd - 1 - k]]
        return np.flip(out, axis=flips) if flips else out

    def index_displacement(self, d: np.ndarray) -> np.ndarray:
        """Physical displacements ``(..., nd)`` (LPS mm) -> steps along the canonical ITK axes ``(..., nd)``."""
        steps = d @ self.to_index.T  # along the fixed index axes
        return np.stack([(-1.0 if self.flip[j] else 1.0) * steps[..., self.perm[j]] for j in range(self.nd)], -1)


@dataclass(frozen=True)
class _View:
    """One displayed slice: canonical numpy ``axis`` cut at ``index`` (None in 2D); ``rows``/``cols``
    are the canonical numpy axes shown vertically/horizontally; ``flip_rows`` puts the high end of
    ``rows`` at the top. ``edges``: orientation letters (top, bottom, left, right) or None.
    """

    name: str
    axis: int | None
    index: int
    rows: int
    cols: int
    flip_rows: bool
    row_mm: float
    col_mm: float
    n_rows: int
    n_cols: int
    edges: tuple[str, str, str, str] | None = None

    def slab(self, image: sitk.Image, orientation: _Orientation) -> sitk.Image:
        """The one-slice region of an image on the fixed grid that this view shows (2D: the image)."""
        if self.axis is None:
            return image
        j = orientation.nd - 1 - self.axis
        key = [slice(None)] * orientation.nd
        at = orientation.size[j] - 1 - self.index if orientation.flip[j] else self.index
        key[orientation.perm[j]] = slice(at, at + 1)
        return image[tuple(key)]

    def picture(self, slab: sitk.Image, orientation: _Orientation) -> np.ndarray:
        """A ``slab`` as displayed: ``(n_rows, n_cols[, components])`` float array, row 0 at the top."""
        plane = orientation.canonical(sitk.GetArrayViewFromImage(slab))
        if self.axis is not None:
            plane = np.take(plane, 0, axis=self.axis)
        plane = plane[::-1] if self.flip_rows else plane
        return np.array(plane, dtype=np.float64 if plane.ndim == 3 else np.float32)

    def mapped_mm(self, displacement: np.ndarray, orientation: _Orientation) -> tuple[np.ndarray, np.ndarray]:
        """Where each pixel's ``p + d(p)`` lies in this panel: ``(x_mm, y_mm)`` from its left/top edge.

        Args:
            displacement: ``picture`` of the displacement field, ``(n_rows, n_cols, nd)`` LPS mm.
        """
        steps = orientation.index_displacement(displacement)
        nd = orientation.nd
        col_step = steps[..., nd - 1 - self.cols]
        row_step = steps[..., nd - 1 - self.rows]
        if self.flip_rows:  # screen rows run against the canonical axis
            row_step = -row_step
        cols = np.arange(self.n_cols)[None, :] + col_step
        rows = np.arange(self.n_rows)[:, None] + row_step
        return (cols + 0.5) * self.col_mm, (rows + 0.5) * self.row_mm

    @property
    def width_mm(self) -> float:
        return self.n_cols * self.col_mm

    @property
    def height_mm(self) -> float:
        return self.n_rows * self.row_mm

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return (0.0, self.width_mm, self.height_mm, 0.0)

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates ``(X, Y)`` in mm, each ``(n_rows, n_cols)``, for contour plots."""
        x = (np.arange(self.n_cols) + 0.5) * self.col_mm
        y = (np.arange(self.n_rows) + 0.5) * self.row_mm
        return np.meshgrid(x, y)


def _on_slab(image: sitk.Image, name: str, fixed: sitk.Image, fixed_slab: sitk.Image, view: "_View",
             orientation: _Orientation) -> sitk.Image:
    """``image`` on the view's slab of the fixed grid: cut out when it lives on the fixed grid, else (the field
    and its maps of a very large fixed image stay on the working grid) interpolated onto the slab."""
    if geometry.same_grid(image, fixed):
        return view.slab(image, orientation)
    if name == "displacement":
        return geometry.resample_displacement(image, fixed_slab)
    return geometry.resample_onto(image, fixed_slab, default=1.0 if name == "jacobian" else 0.0)


def _views(orientation: _Orientation) -> list[_View]:
    """The displayed slices: one view in 2D, the middle axial, coronal and sagittal slices in 3D."""
    size, spacing = orientation.size, orientation.spacing
    if orientation.nd == 2:  # canonical numpy axes: 0 = y (rows), 1 = x (columns)
        return [_View("", None, 0, 0, 1, False, spacing[1], spacing[0], size[1], size[0])]
    nx, ny, nz = size  # canonical numpy axes: 0 = z (S), 1 = y (P), 2 = x (L)
    sx, sy, sz = spacing
    return [
        _View("Axial", 0, nz // 2, 1, 2, False, sy, sx, ny, nx, ("A", "P", "R", "L")),
        _View("Coronal", 1, ny // 2, 0, 2, True, sz, sx, nz, nx, ("S", "I", "R", "L")),
        _View("Sagittal", 2, nx // 2, 0, 1, True, sz, sy, nz, ny, ("S", "I", "A", "P")),
    ]


# --------------------------------------------------------------------------------------------------
# picture helpers
# --------------------------------------------------------------------------------------------------


def _window(image: sitk.Image) -> tuple[float, float]:
    """Robust grey window of a whole image: its 1st..99.5th percentiles (a subsample of big volumes)."""
    values = sitk.GetArrayViewFromImage(image).ravel()
    values = values[:: values.size // 1_000_000 + 1]
    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return float(low), (float(high) if high > low else float(low) + 1.0)


def _grey(picture: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return np.clip((picture - low) / (high - low), 0.0, 1.0)


def _checkerboard(a: np.ndarray, b: np.ndarray, view: _View) -> np.ndarray:
    """Square tiles (same size in mm along both axes) alternating between two pictures."""
    x, y = view.centres()
    tile = max(view.height_mm, view.width_mm) / _CHECKER_TILES
    return np.where(((np.floor(x / tile) + np.floor(y / tile)) % 2).astype(bool), b, a)


def _nice_step(span: float, lines: int) -> float:
    """A round grid spacing in mm (1, 2, 2.5, 5 x 10^k) giving about ``lines`` lines across ``span``."""
    raw = span / max(lines, 1)
    magnitude = 10 ** np.floor(np.log10(raw))
    return float(next(f for f in (1, 2, 2.5, 5, 10) if f * magnitude >= raw) * magnitude)


def _jacobian_norm(values: np.ndarray):
    """Diverging norm centred on 1: at least 0.5..2, wider when the (robust) range of values is wider."""
    from matplotlib.colors import TwoSlopeNorm

    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [0.5, 99.5]) if values.size else (1.0, 1.0)
    vmin = float(np.clip(low, 0.0, 0.5))  # det <= 0 is painted as folding on top, so the map stops at 0
    vmax = float(np.clip(high, 2.0, 10.0))
    return TwoSlopeNorm(vcenter=1.0, vmin=vmin, vmax=vmax)


def _foreground_level(image: sitk.Image) -> float | None:
    """Otsu threshold of the fixed image: its contour outlines the anatomy on the Jacobian panel."""
    try:
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(image)
        return float(otsu.GetThreshold())
    except RuntimeError:  # pragma: no cover - constant images are refused before registration
        return None


def _smoothed(picture: np.ndarray, view: _View) -> np.ndarray:
    """The slice blurred by ~2 voxels, so that its outline is one calm line rather than every noise speck."""
    image = sitk.GetImageFromArray(picture.astype(np.float32))
    image.SetSpacing((view.col_mm, view.row_mm))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 2.0 * max(view.col_mm, view.row_mm)))


def _title(result) -> str:
    m = result.metrics or {}
    total = (result.timings or {}).get("total")
    model = m.get('model', '?') + (" (field not used: no improvement)" if m.get('network_kept') is False else "")
    parts = [f"model: {model}", f"device: {m.get('device', '?')}"]
    if m.get("iterations"):
        parts.append(f"{m['iterations']} refinement iterations")
    if total is not None:
        parts.append(f"time {total:.1f} s" if total < 120 else f"time {total / 60:.1f} min")
    facts = []
    if "ncc_before" in m and "ncc_after" in m:
        facts.append(f"NCC {m['ncc_before']:.3f} \u2192 {m['ncc_after']:.3f}")
    if "tre_before_mm" in m and "tre_after_mm" in m:
        count = f" of {len(result.tre['before'])} landmarks" if result.tre else ""
        facts.append(f"TRE (mean{count}) {m['tre_before_mm']:.2f} \u2192 {m['tre_after_mm']:.2f} mm")
    if "folding_fraction" in m:
        facts.append(f"folding {100.0 * m['folding_fraction']:.3f} % of voxels")
    if "max_displacement_mm" in m:
        facts.append(f"max displacement {m['max_displacement_mm']:.1f} mm")
    lines = ["DeepSalReg   " + "   |   ".join(parts)]
    if len(result.fixed.GetSize()) == 2 and len(facts) > 2:  # the 2D figure is narrow: two lines of facts
        lines += ["   |   ".join(facts[:2]), "   |   ".join(facts[2:])]
    else:
        lines.append("   |   ".join(facts))
    return "\n".join(lines)


def _geometry_line(image: sitk.Image, name: str) -> str:
    size = "\u00d7".join(str(n) for n in image.GetSize())
    spacing = "\u00d7".join(f"{s:.3g}" for s in image.GetSpacing())
    return f"{name} {size} @ {spacing} mm"


def _caption(result, step: float, outlined: bool, width: int) -> str:
    """What each panel shows, wrapped to ``width`` characters per line."""
    import textwrap

    parts = [
        f"{_geometry_line(result.fixed, 'Fixed')};  {_geometry_line(result.moving, 'moving')}.  "
        "Moving: on the fixed grid without any transform.  Checkerboards: alternating fixed and moving/warped tiles.",
        f"Deformation grid: straight lines of the moving image (every {step:g} mm) as they lie in the fixed image, "
        "over the fixed image (contours of p + d(p); the warped image is deformed the same way).",
        "Jacobian: det of p \u2192 p + d(p) = local volume in moving / volume in fixed (red > 1 > blue)"
        + ("; grey line: fixed-image outline (Otsu)." if outlined else "."),
    ]
    # no line breaks inside the formulas: their spaces become non-breaking ones
    parts = [p.replace("p + d(p)", "p\u00a0+\u00a0d(p)").replace("p \u2192 p", "p\u00a0\u2192\u00a0p") for p in parts]
    return "\n".join(textwrap.fill(part, width) for part in parts)


def _orientation_letters(ax, edges: tuple[str, str, str, str]) -> None:
    from matplotlib import patheffects

    style = dict(transform=ax.transAxes, color=_LETTER_COLOUR, fontsize=8, fontweight="bold",
                 path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    top, bottom, left, right = edges
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)


# --------------------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------------------


def render_report(result):
    """Draw the report of one registration.

    Args:
        result: a ``RegistrationResult`` (uses ``fixed``, ``moving``, ``warped``, ``displacement``,
            ``saliency``, ``jacobian``, ``metrics``, ``timings``, ``tre``).
    Returns:
        A ``matplotlib.figure.Figure`` (not attached to pyplot; nothing is displayed). 2D: the eight
        ``PANELS`` in two rows of four; 3D: three rows (axial, coronal, sagittal) of eight. The colour
        bars of the saliency and Jacobian panels sit in a thin row of their own below the panels.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fixed = result.fixed
    orientation = _Orientation.of(fixed)
    views = _views(orientation)
    # Each image gets its own grey window (the pair may come from different scanners or modalities); the
    # moving window is taken from the moving image as read, so it does not depend on the field of view.
    f_win, m_win = _window(fixed), _window(result.moving)
    outline_level = _foreground_level(fixed)

    slices = {}
    for view in views:
        fixed_slab = view.slab(fixed, orientation)
        fixed_pic = view.picture(fixed_slab, orientation)
        # the moving image on the fixed slice without any transform: lines up with the other panels
        moving_pic = view.picture(geometry.resample_onto(result.moving, fixed_slab), orientation)
        pictures = {name: view.picture(_on_slab(getattr(result, name), name, fixed, fixed_slab, view, orientation),
                                       orientation)
                    for name in ("warped", "saliency", "jacobian", "displacement")}
        slices[view.name] = dict(
            fixed=_grey(fixed_pic, f_win),
            outline=_smoothed(fixed_pic, view),
            moving=_grey(moving_pic, m_win),
            warped=_grey(pictures["warped"], m_win),
            saliency=pictures["saliency"],
            jacobian=pictures["jacobian"],
            mapped=view.mapped_mm(pictures["displacement"], orientation),
        )

    # Layout: rows of panels (3D: one row per view; 2D: the one view over two rows of four), equal panel
    # widths, each row as tall as its slice needs in mm, then a thin row for the two colour bars.
    per_row = len(PANELS) if len(views) > 1 else len(PANELS) // 2
    cells = [(view, panel) for view in views for panel in range(len(PANELS))]
    rows = [cells[i : i + per_row] for i in range(0, len(cells), per_row)]
    heights = [min(max(row[0][0].height_mm / row[0][0].width_mm, 0.3), 1.6) for row in rows]
    bar_height = 0.07
    fig = Figure(figsize=(_PANEL_INCHES * per_row + 0.5, _PANEL_INCHES * (sum(heights) + bar_height) + 1.7),
                 dpi=_DPI, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.03, wspace=0.01, hspace=0.01)
    grid = fig.subplots(len(rows) + 1, per_row, squeeze=False,
                        gridspec_kw=dict(height_ratios=[*heights, bar_height]))
    bar_axes = {}
    for c, ax in enumerate(grid[-1]):
        ax.set_label("<colorbar>")
        ax.set_axis_off()
        bar_axes[len(PANELS) - per_row + c] = ax  # the last row of panels ends with saliency and Jacobian

    saliency_values = np.concatenate([s["saliency"].ravel() for s in slices.values()])
    saliency_values = saliency_values[np.isfinite(saliency_values)]
    sal_max = max(float(np.percentile(saliency_values, 99.5)) if saliency_values.size else 1.0, 1e-3)
    jac_norm = _jacobian_norm(np.concatenate([s["jacobian"].ravel() for s in slices.values()]))
    fold_cmap = ListedColormap([_FOLD_COLOUR])
    step = _nice_step(max(max(v.height_mm, v.width_mm) for v in views), _GRID_LINES)
    mappables = {}

    for r, row in enumerate(rows):
        for c, (view, panel) in enumerate(row):
            ax = grid[r, c]
            s = slices[view.name]
            shown = dict(extent=view.extent, origin="upper", interpolation="bilinear", aspect="equal")
            grey = dict(cmap="gray", vmin=0.0, vmax=1.0, **shown)
            x, y = view.centres()
            if panel in (0, 1, 2):
                ax.imshow(s[("fixed", "moving", "warped")[panel]], **grey)
            elif panel in (3, 4):
                ax.imshow(_checkerboard(s["fixed"], s["moving" if panel == 3 else "warped"], view), **grey)
            elif panel == 5:
                ax.imshow(s["fixed"], **grey)
                for coordinate, length in zip(s["mapped"], (view.width_mm, view.height_mm)):
                    levels = np.arange(step / 2, length + step, step)
                    ax.contour(x, y, coordinate, levels=levels, colors=_GRID_COLOUR, linewidths=0.7,
                               linestyles="solid")
            elif panel == 6:
                ax.imshow(s["fixed"], **grey)
                saliency = s["saliency"]
                # opacity grows with saliency, so the anatomy stays visible where the map is low
                alpha = np.clip(0.15 + 0.75 * np.nan_to_num(saliency) / sal_max, 0.0, 0.9)
                mappables[6] = ax.imshow(saliency, cmap="inferno", vmin=0.0, vmax=sal_max, alpha=alpha, **shown)
            else:
                det = s["jacobian"]
                mappables[7] = ax.imshow(det, cmap="RdBu_r", norm=jac_norm, **shown)
                if outline_level is not None:
                    ax.contour(x, y, s["outline"], levels=[outline_level], colors="#404040",
                               linewidths=0.5, alpha=0.8)
                folded = det <= 0
                if folded.any():
                    ax.imshow(np.where(folded, 1.0, np.nan), cmap=fold_cmap, vmin=0, vmax=1,
                              **{**shown, "interpolation": "nearest"})
                    # an outline too, so that a single folded voxel is still visible at 100 dpi
                    ax.contour(x, y, folded.astype(float), levels=[0.5], colors=_FOLD_COLOUR, linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(0, view.width_mm)
            ax.set_ylim(view.height_mm, 0)
            if r == 0 or len(views) == 1:
                ax.set_title(PANELS[panel], fontsize=10)
            if view.edges is not None and panel in (0, 5):
                _orientation_letters(ax, view.edges)
            if c == 0 and view.name:
                total = orientation.size[::-1][view.axis]
                ax.set_ylabel(f"{view.name}\nslice {view.index + 1}/{total}", fontsize=10)

    for panel, label in ((6, "joint saliency of fixed and warped"),
                         (7, "det J   (green: folding, det \u2264 0)")):
        cax = bar_axes[panel]
        cax.set_axis_on()
        bar = fig.colorbar(mappables[panel], cax=cax, orientation="horizontal")
        bar.set_label(label, fontsize=8.5)
        bar.ax.tick_params(labelsize=8)
        bar.ax.xaxis.set_major_locator(MaxNLocator(5))
    ticks = [jac_norm.vmin, 1.0, jac_norm.vmax]
    ticks = sorted(ticks + [t for t in (0.5, 2.0) if all(abs(t - u) > 0.15 * t for u in ticks)])
    bar_axes[7].xaxis.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])

    fig.suptitle(_title(result), fontsize=11, x=0.01, ha="left", multialignment="left")
    # ~14 characters per inch at 8.5 pt keeps every caption line inside the figure
    caption = _caption(result, step, outline_level is not None, int(fig.get_figwidth() * 14))
    fig.supxlabel(caption, fontsize=8.5, x=0.01, ha="left", multialignment="left")
    return fig


def panel_titles(figure) -> list[str]:
    """Titles of the image panels of a report figure, row by row (3D: empty below the first row)."""
    return [ax.get_title() for ax in figure.axes if ax.get_label() != "<colorbar>"]


def write_report(result, path) -> Path:
    """Render ``result`` (see ``render_report``) and write it as a PNG (100 dpi, well under 1 MB), atomically.

    Args:
        result: a ``RegistrationResult``.
        path: destination ``.png``; missing parent folders are created.
    Returns:
        The path written.
    Raises:
        OutputError: the destination cannot be written (a folder, a file where a folder should be,
            no permission, disk full); nothing is left behind.
    """
    figure = render_report(result)
    return io._write_atomically(path, lambda tmp: _save_png(figure, tmp), "report")


def _save_png(figure, path: str) -> None:
    """PNG with a 256-colour palette: adaptive (median cut) plus the report's marker colours, dithered.

    A 3D report is ~1900 x 900 pixels of continuous-tone images: as 24-bit PNG that is over 1 MB, with
    a palette about half, and Floyd-Steinberg dithering keeps the colour maps free of visible banding.
    The marker colours are reserved in the palette because median cut merges rare colours away, and a
    few folded voxels are exactly what must not disappear.
    """
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        rgb = rendered.convert("RGB")
    reserved = [_FOLD_COLOUR, _GRID_COLOUR, _LETTER_COLOUR, "#000000", "#ffffff"]
    adaptive = rgb.quantize(256 - len(reserved), method=Image.Quantize.MEDIANCUT)
    colours = adaptive.getpalette()[: 3 * (256 - len(reserved))]
    for colour in reserved:
        colours += [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours + [0] * (768 - len(colours)))
    rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, format="PNG", optimize=True)
