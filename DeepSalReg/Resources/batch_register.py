"""Register many image pairs with DeepSalReg in a headless 3D Slicer.

Usage::

    Slicer --no-main-window --python-script batch_register.py -- pairs.csv outdir [--model default]
           [--device auto|cpu|cuda] [--quality fast|balanced|accurate] [--time-budget S] [--iterations N]
           [--no-affine] [--report]

``pairs.csv`` has a header row with the columns ``fixed`` and ``moving`` and, optionally,
``fixed_landmarks``, ``moving_landmarks`` (CSV/.fcsv/.mrk.json, corresponding row by row), ``fixed_mask``,
``moving_mask`` (label maps: the alignment is measured only where they are nonzero) and ``name``. Relative
paths are relative to the folder of ``pairs.csv``: the format and reader of ``deepsalreg batch``
(``DeepSalRegLib/pairs.py``).

Each pair is loaded into the scene (volumes with their geometry, landmarks as point lists), registered in
this process with the library, and its results are saved by the library into ``outdir/<name>/``:
``transform.h5`` and ``displacement.nrrd`` (fixed -> moving, LPS), ``warped.nrrd``, ``saliency.nrrd``,
``jacobian.nrrd``, ``summary.json``, with ``--report`` ``report.png`` (needs matplotlib, which Slicer does
not bundle) and, with landmarks, ``tre.csv``. ``outdir/summary.csv``
gets one row per pair as soon as it is done. A pair that fails is reported on stderr, recorded with status
``failed`` and its error, and skipped.

Exit code: 0 when every pair succeeded, 6 when at least one failed, 2 when the batch could not start
(bad arguments, unreadable pair list, PyTorch missing): the codes of ``deepsalreg batch``, whose loop
(``DeepSalRegLib.batch.run_batch``: skip a failed pair, rewrite ``summary.csv`` after every pair) this
script shares.

Outside the Slicer application (Python with the ``slicer-core`` wheel, as the tests run it) the script makes
its own MRML scene.
"""
import argparse
import importlib.util
import sys
from pathlib import Path



def library():
    """``DeepSalRegLib.slicer_glue``, found next to this script's folder (installed extension:
    ``qt-scripted-modules/``) or two folders up (source checkout: the repository root) when not importable."""
    try:
        import DeepSalRegLib  # noqa: F401
    except ImportError:
        here = Path(__file__).resolve()
        for folder in (here.parents[1], here.parents[2]):
            if (folder / "DeepSalRegLib" / "__init__.py").is_file():
                sys.path.insert(0, str(folder))
                break
    from DeepSalRegLib import slicer_glue

    return slicer_glue


def parse_arguments(argv):
    argv = list(argv)
    if argv and argv[0] == "--":  # Slicer may pass the separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="batch_register.py",
        description="Register the pairs listed in a CSV file with DeepSalReg and write a summary CSV.",
    )
    parser.add_argument("pairs", type=Path, help="CSV file with columns fixed, moving[, fixed_landmarks, moving_landmarks, name]")
    parser.add_argument("outdir", type=Path, help="output folder (one subfolder per pair, plus summary.csv)")
    parser.add_argument("--model", default="default", help="model name or model file (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quality", default="balanced", choices=("fast", "balanced", "accurate"),
                        help="how long the refinement runs; it stops by itself when converged (default: %(default)s)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="end each pair's refinement early so that it takes about this long")
    parser.add_argument("--iterations", type=int, default=None,
                        help="expert: exactly this many refinement steps instead of the quality (0: none)")
    parser.add_argument("--report", action="store_true",
                        help="also write report.png per pair (needs matplotlib, which Slicer does not bundle)")
    parser.add_argument("--no-affine", dest="affine", action="store_false", help="skip the affine pre-alignment")
    return parser.parse_args(argv)


def read_pairs(path: Path) -> list:
    """Rows of the pair list with absolute paths and a unique ``name`` each (``DeepSalRegLib.pairs``, the reader
    ``deepsalreg batch`` uses too)."""
    library()
    from DeepSalRegLib.pairs import read_pairs as read

    return read(path)


def _remove_nodes(scene, nodes) -> None:
    for node in nodes:
        if node is None or scene.GetNodeByID(node.GetID()) is None:
            continue
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for index in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(index)
                if display is not None:
                    scene.RemoveNode(display)
        scene.RemoveNode(node)


def register_pair(scene, pair: dict, output: Path, options, register=None, log=print, report: bool = False) -> dict:
    """Load one pair into the scene, register it through the Slicer glue, save the results into ``output`` and
    remove its nodes again; returns its summary values (the TRE measured on the scene's markups through the
    transform node). Raises on failure (``DeepSalRegLib.batch.run_batch`` reports and skips the pair).

    ``report``: also write ``report.png`` (matplotlib); off by default because Slicer does not bundle it.
    """
    glue = library()
    from DeepSalRegLib.batch import summary_row
    from DeepSalRegLib.io import read_image, read_label_image, read_landmarks

    created = []
    try:
        fixed_image = read_image(pair["fixed"], "fixed image")
        moving_image = read_image(pair["moving"], "moving image")
        fixed = glue.image_to_volume_node(fixed_image, scene, f"{pair['name']} fixed")
        moving = glue.image_to_volume_node(moving_image, scene, f"{pair['name']} moving")
        created += [fixed, moving]
        fixed_markups = moving_markups = None
        if pair.get("fixed_landmarks") and pair.get("moving_landmarks"):
            nd = fixed_image.GetDimension()
            fixed_points, labels = read_landmarks(pair["fixed_landmarks"], nd)
            moving_points, _ = read_landmarks(pair["moving_landmarks"], nd)
            fixed_markups = glue.landmarks_to_markups(fixed_points, scene, labels, f"{pair['name']} fixed landmarks")
            moving_markups = glue.landmarks_to_markups(moving_points, scene, labels, f"{pair['name']} moving landmarks")
            created += [fixed_markups, moving_markups]

        def progress(fraction, message):
            log(f"[{pair['name']}] {100 * fraction:3.0f}% {message}")

        masks = {}
        for key in ("fixed_mask", "moving_mask"):
            if pair.get(key):
                label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{pair['name']} {key}")
                masks[key] = glue.image_to_volume_node(read_label_image(pair[key], key.replace("_", " ")), scene,
                                                       f"{pair['name']} {key}", node=label_map)
                created.append(masks[key])
        result = glue.register_nodes(scene, fixed, moving, options, fixed_landmarks=fixed_markups,
                                     moving_landmarks=moving_markups, register=register, progress=progress, show=False,
                                     **masks)
        created += [result.transform, result.warped, result.saliency, result.jacobian, result.confidence, result.tre_table]
        result.outputs.result.save(output, report=report)
        row = summary_row(result.outputs.result)
        if result.mean_tre is not None:
            row["tre_before_mm"], row["tre_after_mm"] = (f"{value:.3f}" for value in result.mean_tre)
        return row
    finally:
        _remove_nodes(scene, created)


def _default_scene():
    import slicer

    scene = getattr(slicer, "mrmlScene", None)
    return scene if scene is not None else slicer.vtkMRMLScene()


def main(argv=None, scene=None, register=None) -> int:
    """Run the batch; ``scene`` and ``register`` are for tests (default: Slicer's scene, the library)."""
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    glue = library()
    from DeepSalRegLib.threads import choose_wait_policy

    choose_wait_policy()  # before torch is imported (DeepSalRegLib.threads: idle vs busy machines)
    from DeepSalRegLib.errors import DeepSalRegError

    try:
        pairs = read_pairs(args.pairs)
        options = glue.RegistrationOptions(model=args.model, device=args.device, quality=args.quality,
                                           iterations=args.iterations, affine=args.affine,
                                           time_budget=args.time_budget)
    except (OSError, ValueError, DeepSalRegError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.report:
        if importlib.util.find_spec("matplotlib") is None:
            print("error: --report needs matplotlib, which this Python does not have (in Slicer: "
                  "slicer.util.pip_install('matplotlib')); run without --report.", file=sys.stderr)
            return 2
    if register is None:
        if importlib.util.find_spec("torch") is None:
            print("error: PyTorch is not installed in this Python. In Slicer, install the PyTorch extension (or press "
                  "Apply once in the DeepSalReg module, which offers to install it).", file=sys.stderr)
            return 2
    scene = scene if scene is not None else _default_scene()
    args.outdir.mkdir(parents=True, exist_ok=True)
    from DeepSalRegLib.batch import run_batch

    def one(pair, folder, label):
        print(f"{label}: registering", flush=True)
        return register_pair(scene, pair, folder, options, register=register, report=args.report)

    return run_batch(pairs, args.outdir, one, log=lambda line: print(line, flush=True))

if __name__ == "__main__":
    sys.exit(main())
