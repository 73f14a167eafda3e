"""Draw DeepSalReg-results-3d.png: what the Slicer module shows, rendered with matplotlib from a real run.

Usage (from the repository root; see README.md in this folder)::

    python3 -m DeepSalRegLib.cli register DeepSalRegLib/sample_data/mni152_t1_fixed.nrrd \\
        DeepSalRegLib/sample_data/colin27_t1_moving.nrrd --model none --device cpu --iterations 100 \\
        --quiet --no-report -o /tmp/deepsalreg_results_3d
    python3 Resources/Screenshots/make_results_picture.py /tmp/deepsalreg_results_3d \\
        Resources/Screenshots/DeepSalReg-results-3d.png

Panels (axial and coronal middle slices, oriented as Slicer's views: patient right on the left): the
warped moving image with the deformation grid (lines of constant moving-space coordinate, i.e. contours of
p + d(p), every 15 mm), the joint saliency over the fixed image (inferno, transparent below 0.1, as the
module's overlay), and the Jacobian determinant (blue-white-red, window 0..2, as the module's display).
"""
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from DeepSalRegLib.sample_data import sample_pair  # noqa: E402


def main(result_dir: Path, out_png: Path) -> None:
    fixed_path, _ = sample_pair("3d")
    fixed_image = sitk.ReadImage(str(fixed_path))
    assert np.allclose(np.reshape(fixed_image.GetDirection(), (3, 3)), np.diag([-1, -1, 1])), "expects the sample's LPS grid"

    def read(path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)

    fixed = read(fixed_path)
    warped, saliency, jacobian = (read(result_dir / f"{name}.nrrd") for name in ("warped", "saliency", "jacobian"))
    displacement = read(result_dir / "displacement.nrrd")  # (k, j, i, 3), LPS mm
    metrics = json.loads((result_dir / "summary.json").read_text())["metrics"]

    origin, spacing = np.array(fixed_image.GetOrigin()), np.array(fixed_image.GetSpacing())
    nk, nj, ni = fixed.shape
    xs = origin[0] - spacing[0] * np.arange(ni)  # LPS x of each column (direction -1)
    ys = origin[1] - spacing[1] * np.arange(nj)
    zs = origin[2] + spacing[2] * np.arange(nk)

    # screen right = patient left (x_LPS), screen up = anterior (-y_LPS) or superior (z)
    views = [
        ("Axial", lambda a: a[nk // 2 + 1], -ys, lambda d: (d[..., 0], -d[..., 1])),
        ("Coronal", lambda a: a[:, nj // 2 + 1, :], zs, lambda d: (d[..., 0], d[..., 2])),
    ]
    titles = ["Moving aligned to fixed + deformation grid", "Joint saliency over the fixed image", "Jacobian determinant"]
    fig, axes = plt.subplots(2, 3, figsize=(12.8, 8.6), dpi=100, facecolor="black")
    for row, (name, cut, vertical, in_plane) in enumerate(views):
        h_order, v_order = np.argsort(xs), np.argsort(vertical)
        extent = (xs.min(), xs.max(), vertical.min(), vertical.max())

        def oriented(a):
            return a[np.ix_(v_order, h_order)]

        def show(ax, a, **kwargs):
            ax.imshow(oriented(a), extent=extent, origin="lower", interpolation="bilinear", **kwargs)

        ax = axes[row, 0]
        show(ax, np.clip(cut(warped) / 255.0, 0, 1), cmap="gray", vmin=0, vmax=1)
        H, V = np.meshgrid(xs[h_order], vertical[v_order])
        dh, dv = (oriented(c) for c in in_plane(cut(displacement)))
        for moving_coordinate in (H + dh, V + dv):
            ax.contour(H, V, moving_coordinate, levels=np.arange(-195, 200, 15.0), colors="#ffd23f", linewidths=0.9,
                       negative_linestyles="solid")
        ax = axes[row, 1]
        show(ax, np.clip(cut(fixed) / 255.0, 0, 1), cmap="gray", vmin=0, vmax=1)
        s = cut(saliency)
        rgba = matplotlib.colormaps["inferno"](np.clip(s, 0, 1))
        rgba[..., 3] = np.where(s > 0.1, 0.55, 0.0)
        show(ax, rgba)
        show(axes[row, 2], cut(jacobian), cmap="coolwarm", vmin=0, vmax=2)
        for column, ax in enumerate(axes[row]):
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            for spine in ax.spines.values():
                spine.set_color("#555555")
            ax.text(0.02, 0.97, name, transform=ax.transAxes, color="#9ecbff", fontsize=10, va="top")
            ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="#dddddd", fontsize=10, va="center")
            ax.text(0.98, 0.5, "L", transform=ax.transAxes, color="#dddddd", fontsize=10, va="center", ha="right")
            if row == 0:
                ax.set_title(titles[column], color="white", fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.91, bottom=0.14, wspace=0.03, hspace=0.08)
    for column, cmap, vmax, label in ((1, "inferno", 1, "joint saliency (0..1; below 0.1 transparent)"),
                                      (2, "coolwarm", 2, "det J: < 1 shrinks, 1 keeps, > 1 grows volume")):
        box = axes[1, column].get_position()
        cax = fig.add_axes([box.x0 + 0.1 * box.width, 0.095, 0.8 * box.width, 0.018])
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, vmax), cmap=cmap),
                           cax=cax, orientation="horizontal")
        bar.ax.tick_params(colors="white", labelsize=8)
        bar.set_label(label, color="white", fontsize=9)
    model = "refinement only" if str(metrics.get("model", "")).startswith("none") else f"model {metrics.get('model')}"
    fig.suptitle(f"DeepSalReg: Colin27 T1 registered to MNI152 T1 (shipped 3D sample; {model}, "
                 f"{metrics['iterations']} iterations, {metrics['device'].upper()})   NCC {metrics['ncc_before']:.3f} "
                 f"\u2192 {metrics['ncc_after']:.3f}, folding {100 * metrics['folding_fraction']:.2f} %",
                 color="white", fontsize=12, y=0.975)
    fig.text(0.5, 0.012, "Rendered with matplotlib from the registration's output files: the transform shown as a "
             "deformation grid, the joint saliency as a colour overlay, the Jacobian in a diverging map centred on 1.",
             color="#bbbbbb", ha="center", fontsize=9)
    fig.savefig(out_png, facecolor="black")
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
