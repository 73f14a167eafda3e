"""The ``deepsalreg`` arguments: one sub-command each for register, warp, batch and demo."""
from __future__ import annotations

import argparse

from ..quality import DEFAULT_QUALITY, PRESETS
from .commands import cmd_batch, cmd_demo, cmd_register, cmd_warp

EXAMPLES = """\
examples:
  deepsalreg demo                                   # register the shipped sample pairs -> demo_output/
  deepsalreg register fixed.nrrd moving.nrrd -o out/                  # quality balanced (the default)
  deepsalreg register fixed.nrrd moving.nrrd -o out/ --quality fast     # or accurate; --time-budget 10
  deepsalreg register fixed.nii.gz moving.nii.gz -o out/ --iterations 0 --transform out/fixed_to_moving.tfm
  deepsalreg register exhale.mha inhale.mha -o out/ --fixed-landmarks f.csv --moving-landmarks m.csv
  deepsalreg warp moving_labels.nrrd out/transform.h5 -o labels_on_fixed.nrrd --reference fixed.nrrd --labels
  deepsalreg batch pairs.csv -o results/            # columns: fixed,moving[,fixed_landmarks,moving_landmarks,...]

The transform maps FIXED physical points to MOVING physical points (ITK resampling convention, Slicer
"from parent"); .h5/.tfm give an ITK transform file, .nrrd/.mha/.nii.gz a displacement-field image.
exit codes: 0 ok, 2 bad input, 3 model/weights, 4 device unavailable, 5 output not writable,
6 batch with failed pairs, 1 internal error.
"""



def _add_common(p):
    p.add_argument("--model", default="default",
                   help="shipped model name (default picks default-2d/default-3d), a .pt checkpoint, or 'none' "
                        "(instance optimisation only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute (default: auto)")
    p.add_argument("--quality", default=DEFAULT_QUALITY, choices=list(PRESETS),
                   help="how long the refinement after the network runs; it stops by itself when converged: "
                        + "; ".join(f"{q.name} = {q.description}" for q in PRESETS.values()))
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="end the refinement early so that the registration takes about this long")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="expert: exactly N refinement steps instead of the quality's convergence stop "
                        "(0 = affine + network only)")
    p.add_argument("--no-affine", dest="affine", action="store_false",
                   help="skip the affine pre-alignment (network alone: fastest, for roughly aligned pairs)")
    p.add_argument("--max-voxels", type=int, default=None, metavar="N",
                   help="working-grid voxel budget (default: 2^20 in 3D, 2^18 with --quality fast; 1024^2 in "
                        "2D); larger images are registered on a coarser grid")
    p.add_argument("--no-report", action="store_true", help="do not write report.png")
    p.add_argument("--progress-lines", action="store_true",
                   help="print 'PROGRESS <0-100> <message>' lines on stdout instead of a progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="deepsalreg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Deformable registration with a global-to-local network and a joint saliency map, "
                    "in 2D and 3D, in physical space.")
    parser.add_argument("--version", action="version", version=f"deepsalreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("register", help="register MOVING to FIXED and write the transform and results",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("fixed", help="fixed image (NRRD, NIfTI, MHA, PNG/JPEG or a DICOM folder)")
    p.add_argument("moving", help="moving image")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the results")
    p.add_argument("--transform", metavar="FILE", help="also write the transform here (.h5/.tfm or .nrrd/.mha/.nii.gz)")
    p.add_argument("--fixed-landmarks", metavar="F", help="fixed landmarks (.csv LPS mm, .fcsv, .mrk.json)")
    p.add_argument("--moving-landmarks", metavar="M", help="moving landmarks, row i matching row i of the fixed ones")
    p.add_argument("--fixed-mask", metavar="F", help="fixed mask (nonzero = use)")
    p.add_argument("--moving-mask", metavar="M", help="moving mask (nonzero = use)")
    p.add_argument("--report", metavar="PNG", help="also write the report picture here")
    _add_common(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("warp", help="apply a transform file to an image (resample it onto the fixed grid)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("image", help="image to warp (on the moving side)")
    p.add_argument("transform", help="transform file written by 'register' (or any ITK fixed->moving transform)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output image file")
    p.add_argument("--reference", metavar="REF", help="grid of the output (default: the displacement field's grid)")
    p.add_argument("--labels", action="store_true", help="label map: nearest-neighbour, keep the label values")
    p.set_defaults(func=cmd_warp)

    p = sub.add_parser("batch", help="register many pairs listed in a CSV; a failed pair is reported and skipped",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("pairs", help="CSV with columns fixed,moving[,fixed_landmarks,moving_landmarks,fixed_mask,"
                                 "moving_mask,name]; relative paths are relative to the CSV")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="one sub-folder per pair + summary.csv")
    _add_common(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("demo", help="register the shipped 2D and 3D sample pairs and write reports")
    p.add_argument("-o", "--output", default="demo_output", metavar="OUTDIR", help="default: demo_output")
    p.add_argument("--which", default="both", choices=["2d", "3d", "both"])
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser
