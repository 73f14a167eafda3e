"""What each ``deepsalreg`` command does: register, warp, batch, demo."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from .output import _print_result, _Progress

EXIT_OK, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 130


def _register_one(args, fixed, moving, outdir, fixed_landmarks=None, moving_landmarks=None, fixed_mask=None,
                  moving_mask=None, label="", transform_file=None, report_file=None):
    from .. import io
    from ..registration import register

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
        from ..report import write_report

        paths["report"] = write_report(result, io.check_output_path(report_file, inputs))
    if transform_file:  # an ITK transform file gets the composite with the exact affine; an image the field
        is_image = io._extension(transform_file) not in io._TRANSFORM_FILES
        paths["transform"] = io.write_transform(result.displacement if is_image else result.transform, transform_file)
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

    from .. import geometry, io

    image = io.read_label_image(args.image, "image") if args.labels else io.read_image(args.image, "image")
    transform = io.read_transform(args.transform)
    if args.reference:
        reference = io.read_image(args.reference, "reference image")
    else:
        field = None
        parts = [transform]
        if isinstance(transform, sitk.CompositeTransform):  # e.g. affine + displacement field (register's .h5)
            parts = [transform.GetNthTransform(i) for i in range(transform.GetNumberOfTransforms())]
        for inner in parts:
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
    from .. import io
    from ..batch import run_batch, summary_row
    from ..pairs import read_pairs

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
    from .. import models
    from ..sample_data import SAMPLE_PAIRS

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
