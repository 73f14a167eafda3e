"""The ``deepsalreg`` command line: register, warp, batch, demo.

Exit codes: 0 success; 1 internal error (a bug: the traceback is printed); 2 bad input; 3 model or
weights problem; 4 requested device unavailable; 5 output not writable; 6 batch finished with failed
pairs; 130 interrupted. A user error is one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import DeepSalRegError, InputError
from .quality import DEFAULT_QUALITY, PRESETS

EXIT_OK, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 130

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


class _Progress:
    """Progress for humans (a tqdm bar on stderr) or for programs (``PROGRESS <0-100> <message>`` lines)."""

    def __init__(self, lines: bool, quiet: bool, label: str = ""):
        self.lines, self.quiet, self.label = lines, quiet, label
        self.bar = None
        self.last = -1

    def __call__(self, fraction: float, message: str):
        percent = int(round(100 * fraction))
        if self.lines:
            if percent != self.last or fraction >= 1.0:
                print(f"PROGRESS {percent} {message}", flush=True)
                self.last = percent
            return
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=self.label or "registering", unit="%", file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}", leave=False)
        self.bar.n = percent
        self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _refinement_line(m) -> str:
    """'refinement: balanced, 112 steps (levels 1/8..1/1: 30, 30, 32, 20)' or 'no refinement'."""
    r = m.get("refinement") or {}
    if not r.get("steps"):
        return "no refinement (affine + network only)"
    how = f"quality {r['quality']}" if r.get("quality") else "fixed count"
    levels = ", ".join(f"1/{f}: {n}" for f, n in zip(r["levels"], r["steps"]))
    return f"refinement ({how}): {sum(r['steps'])} steps ({levels})"


def _print_result(result, outdir, paths, out=None):
    out = out or sys.stdout
    m, t = result.metrics, result.timings
    used = " (its field was not used: it did not improve the alignment)" if m.get("network_kept") is False else ""
    print(f"model: {m['model']}{used} on {m['device']}; working grid {'x'.join(map(str, m['working_grid']['size']))} "
          f"at {m['working_grid']['spacing_mm'][0]} mm; {_refinement_line(m)}", file=out)
    print(f"similarity (NCC, fixed vs moving): {m['ncc_before']:.3f} before -> {m['ncc_after']:.3f} after; "
          f"folding {100 * m['folding_fraction']:.3f} % of voxels; SD log|J| {m['sd_log_jacobian']:.3f}", file=out)
    if result.tre is not None:
        print(f"landmark error (mean TRE): {m['tre_before_mm']:.2f} mm before -> {m['tre_after_mm']:.2f} mm after "
              f"({len(result.tre['after'])} landmarks)", file=out)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if k != "total")
    print(f"time: {t['total']:.2f} s ({steps})", file=out)
    print(f"results in {outdir}: " + ", ".join(sorted(Path(p).name for p in paths.values())), file=out)


def _register_one(args, fixed, moving, outdir, fixed_landmarks=None, moving_landmarks=None, fixed_mask=None,
                  moving_mask=None, label="", transform_file=None, report_file=None):
    from . import io
    from .registration import register

    inputs = [p for p in (fixed, moving, fixed_landmarks, moving_landmarks, fixed_mask, moving_mask) if p]
    # every output target is checked before the work, not after it
    io.check_output_folder(outdir)
    for name in ("transform.h5", "summary.json"):
        io.check_output_path(Path(outdir) / name, inputs)
    for extra in (transform_file, report_file):
        if extra:
            io.check_output_path(extra, inputs)
            io.check_output_folder(Path(extra).expanduser().parent)
    progress = _Progress(args.progress_lines, args.quiet, label)
    try:
        result = register(fixed, moving, model=args.model, device=args.device, iterations=args.iterations,
                          quality=args.quality, time_budget=args.time_budget,
                          fixed_mask=fixed_mask, moving_mask=moving_mask, fixed_landmarks=fixed_landmarks,
                          moving_landmarks=moving_landmarks, progress=progress, max_voxels=args.max_voxels,
                          affine=args.affine)
    finally:
        progress.close()
    t0 = time.perf_counter()
    paths = result.save(outdir, report=not args.no_report, inputs=inputs, command=["deepsalreg", *args.argv])
    if report_file:
        from .report import write_report

        paths["report"] = write_report(result, io.check_output_path(report_file, inputs))
    if transform_file:
        paths["transform"] = io.write_transform(result.displacement, transform_file)
    result.timings["write"] = time.perf_counter() - t0
    return result, paths


def cmd_register(args):
    result, paths = _register_one(args, args.fixed, args.moving, Path(args.output), args.fixed_landmarks,
                                  args.moving_landmarks, args.fixed_mask, args.moving_mask,
                                  transform_file=args.transform, report_file=args.report)
    _print_result(result, args.output, paths)
    return EXIT_OK


def cmd_warp(args):
    import SimpleITK as sitk

    from . import geometry, io

    image = io.read_label_image(args.image, "image") if args.labels else io.read_image(args.image, "image")
    transform = io.read_transform(args.transform)
    if args.reference:
        reference = io.read_image(args.reference, "reference image")
    else:
        field = None
        inner = transform
        if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
            inner = transform.GetNthTransform(0)
        if hasattr(inner, "GetDisplacementField"):
            field = inner.GetDisplacementField()
        if field is None or field.GetNumberOfPixels() == 0:
            raise InputError("this transform has no grid of its own; give --reference (the fixed image).")
        reference = field
    if image.GetDimension() != transform.GetDimension():
        raise InputError(f"the image is {image.GetDimension()}D but the transform is {transform.GetDimension()}D.")
    io.check_output_path(args.output, [args.image, args.transform, args.reference])
    out = geometry.resample_onto(image, reference, labels=args.labels, transform=transform)
    io.write_image(out, args.output)
    print(f"wrote {args.output} ({'nearest' if args.labels else 'linear'} interpolation, "
          f"{'x'.join(map(str, reference.GetSize()))} grid)")
    return EXIT_OK


def cmd_batch(args):
    """Register every pair of the CSV (the loop, the summary and the failure rules: ``batch.run_batch``)."""
    from . import io
    from .batch import run_batch, summary_row
    from .pairs import read_pairs

    pairs = read_pairs(args.pairs)  # at least one pair, or InputError
    outdir = io.check_output_folder(args.output)
    io.check_output_path(outdir / "summary.csv", [args.pairs])
    outdir.mkdir(parents=True, exist_ok=True)

    def register_pair(pair, folder, label):
        result, _ = _register_one(args, pair["fixed"], pair["moving"], folder, pair["fixed_landmarks"],
                                  pair["moving_landmarks"], pair["fixed_mask"], pair["moving_mask"], label=label)
        return summary_row(result)

    return run_batch(pairs, outdir, register_pair)


def cmd_demo(args):
    from . import models
    from .sample_data import SAMPLE_PAIRS

    outdir = Path(args.output)
    shipped = models.registry()
    kinds = ["2d", "3d"] if args.which == "both" else [args.which]
    for kind in kinds:
        fixed, moving = SAMPLE_PAIRS[kind]
        name = f"default-{kind}"
        if args.model == "default":
            if name in shipped:
                print(f"== {kind.upper()} demo: {fixed.name} (fixed) <- {moving.name} (moving), shipped model "
                      f"{name} ({shipped[name].get('description', '')}), quality {args.quality}")
            else:
                print(f"== {kind.upper()} demo: no trained {name} model is shipped in this version; "
                      f"using instance optimisation only (quality {args.quality})")
        result, paths = _register_one(args, str(fixed), str(moving), outdir / kind, label=f"{kind} demo")
        _print_result(result, outdir / kind, paths)
    print(f"open {outdir}/2d/report.png and {outdir}/3d/report.png to see the results" if len(kinds) == 2 else
          f"open {outdir}/{kinds[0]}/report.png to see the result")
    return EXIT_OK


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
                   help="working-grid voxel budget; larger images are registered on a coarser grid")
    p.add_argument("--no-report", action="store_true", help="do not write report.png")
    p.add_argument("--progress-lines", action="store_true",
                   help="print 'PROGRESS <0-100> <message>' lines on stdout instead of a progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"deepsalreg: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    # OpenMP threads that spin while they wait make a registration many times slower on a busy machine
    # (2D sample pair with 40 refinement steps, 2 cores, 3 busy processes: 9.8 s spinning, 2.4 s passive,
    # 1.1 s on an idle machine either way). Set before torch is first imported; the user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if args.command is None:
        parser.print_help()
        return 2
    if (getattr(args, "iterations", None) or 0) < 0:
        parser.error("--iterations must be >= 0")
    if getattr(args, "time_budget", None) is not None and not args.time_budget > 0:
        parser.error("--time-budget must be a positive number of seconds")
    warnings.showwarning = _warning_line
    try:
        return args.func(args)
    except DeepSalRegError as exc:
        print(f"deepsalreg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("deepsalreg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("deepsalreg: error: out of memory; try a smaller --max-voxels or --device cpu", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            print("deepsalreg: error: the device ran out of memory; try a smaller --max-voxels or --device cpu",
                  file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
