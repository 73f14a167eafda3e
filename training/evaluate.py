"""Evaluate a model on registration pairs: TRE, Dice, folding, SD of log-Jacobian and time per pair.

Every real pair goes through ``DeepSalRegLib.register()`` (optionally with instance optimisation), so the
numbers are those a user gets; "identity" is the same pair before registration. Pairs come from

* ``--suite shared``: the real data in ``../shared/data`` (ETH liver landmark TRE, brain Dice over the
  30 evaluation labels in both directions, prostate gland Dice between centred cases, hand X-ray TRE);
* ``--pairs CSV``: columns ``fixed,moving`` and optional ``fixed_landmarks,moving_landmarks`` (LPS CSV,
  .fcsv, .mrk.json), ``fixed_labels,moving_labels``, ``labels`` (values separated by ``;``; default every
  non-zero value), ``centre`` (1: move the moving image's centre onto the fixed one first), ``dataset``,
  ``name``; paths relative to the CSV;
* ``--dataset H5``: the pair list of a dataset built by ``make_dataset.py`` (labels and landmarks kept);
* ``--dataset H5 --synthetic N``: N synthetic pairs (known fields, optionally with outliers) made from the
  dataset's images, scored by end-point error; the network runs directly on the stored grid.

Outputs (``--out DIR``): ``results.csv`` (one row per pair), ``results.json`` (rows and per-dataset
summary), ``summary.md`` (the table printed) and ``evaluation.png`` (training curves of ``--run`` folders
and the error distributions).

Examples::

    python training/evaluate.py --suite shared --model default --out runs/eval-default
    python training/evaluate.py --suite shared --only eth_liver brain --model runs/sup3d/model.pt --iterations 50
    python training/evaluate.py --pairs my_pairs.csv --model default-3d --out runs/eval-mine
    python training/evaluate.py --dataset runs/data/t2d.h5 --synthetic 64 --outliers 1.0 --model runs/a/model.pt
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from benchmarks import shared_data
from benchmarks.shared_data import SharedPair
from DeepSalRegLib import io
from DeepSalRegLib.errors import DeepSalRegError, InputError
from DeepSalRegLib.metrics import dice_per_label as dice_per_label_arrays
from DeepSalRegLib.metrics import end_point_error, jacobian_statistics

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
SUITE_PARTS = ("eth_liver", "brain", "prostate", "hands")


Case = SharedPair  # one evaluation pair: dataset, name, ndim and ``load()`` (keys in benchmarks/shared_data.py)


# --------------------------------------------------------------------------------------------------
# pair sources
# --------------------------------------------------------------------------------------------------


def _centre_moving(images: dict) -> dict:
    """Translate the moving image (and its labels and landmarks) so its centre falls on the fixed centre."""
    def centre(img):
        nd = img.GetDimension()
        matrix = np.array(img.GetDirection()).reshape(nd, nd) @ np.diag(img.GetSpacing())
        return np.asarray(img.GetOrigin()) + matrix @ ((np.asarray(img.GetSize()) - 1) / 2.0)

    shift = centre(images["fixed"]) - centre(images["moving"])
    for key in ("moving", "moving_labels"):
        if images.get(key) is not None:
            img = sitk.Image(images[key])
            img.SetOrigin((np.asarray(img.GetOrigin()) + shift).tolist())
            images[key] = img
    if images.get("moving_points") is not None:
        images["moving_points"] = images["moving_points"] + shift
    return images


def _read(path, labels=False):
    if path is None:
        return None
    return io.read_label_image(path) if labels else io.read_image(path)


def shared_suite(root, only=SUITE_PARTS, prostate_pairs: int = 6) -> list[Case]:
    """The real-data evaluation of ``../shared/data`` (see the module docstring)."""
    root = Path(root).expanduser()
    if not (root / "README.md").is_file():
        raise InputError(f"shared data not found at {root} (give --data-root).")
    unknown = set(only) - set(SUITE_PARTS)
    if unknown:
        raise InputError(f"unknown suite part(s) {', '.join(sorted(unknown))}; choose from {', '.join(SUITE_PARTS)}.")
    cases = []
    if "eth_liver" in only:
        cases += [Case("eth_liver", p.name, p.ndim, p.loader) for p in shared_data.liver_pairs(root)]
    if "brain" in only:
        cases += shared_data.brain_pairs(root)
    if "prostate" in only:
        ids = shared_data.prostate_ids(root)
        for pair in shared_data.prostate_pairs(root, list(zip(ids[:-1], ids[1:]))[:prostate_pairs]):
            cases.append(Case(pair.dataset, pair.name, pair.ndim, lambda pair=pair: _centre_moving(pair.load())))
    if "hands" in only:
        cases.append(shared_data.hands_pair(root))
    return cases


def cases_from_csv(path) -> list[Case]:
    """Pairs listed in a CSV (columns in the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.lstrip().startswith("#")))
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(f"{path} needs a header with at least the columns fixed,moving.")

    def resolve(value):
        value = (value or "").strip()
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else path.parent / p

    cases = []
    for k, row in enumerate(rows):
        def load(row=row):
            images = dict(fixed=_read(resolve(row["fixed"])), moving=_read(resolve(row["moving"])),
                          fixed_labels=_read(resolve(row.get("fixed_labels")), True),
                          moving_labels=_read(resolve(row.get("moving_labels")), True))
            if resolve(row.get("fixed_landmarks")) and resolve(row.get("moving_landmarks")):
                nd = images["fixed"].GetDimension()
                images["fixed_points"] = io.read_landmarks(resolve(row["fixed_landmarks"]), nd)[0]
                images["moving_points"] = io.read_landmarks(resolve(row["moving_landmarks"]), nd)[0]
            if (row.get("labels") or "").strip():
                images["label_values"] = [int(v) for v in row["labels"].split(";") if v.strip()]
            if (row.get("centre") or "").strip() in ("1", "true", "yes"):
                images = _centre_moving(images)
            return images
        name = (row.get("name") or "").strip() or f"{Path(row['fixed']).name}<-{Path(row['moving']).name}"
        nd = io.read_image(resolve(row["fixed"])).GetDimension() if k == 0 else cases[0].ndim
        cases.append(Case((row.get("dataset") or "").strip() or path.stem, name, nd, load))
    return cases


def cases_from_h5(path, kind="inter", split=None, limit=None) -> list[Case]:
    """Pairs of a dataset file, as images carrying each image's stored grid geometry."""
    from training.datasets import RegistrationH5

    data = RegistrationH5(path)
    pairs = data.pairs(kind, split)
    if limit:
        pairs = pairs[:limit]
    if not len(pairs):
        raise InputError(f"{path} has no {kind} pairs" + (f" in its {split} split" if split else "") + ".")

    def image(i, labels=False):
        array = data.labels(i)[0].numpy() if labels else data.image(i)[0].numpy()
        img = sitk.GetImageFromArray(array)
        img.CopyInformation(data.grid(i))
        return img

    cases = []
    for a, b in pairs:
        def load(a=int(a), b=int(b)):
            out = dict(fixed=image(a), moving=image(b))
            if data.has_labels(a) and data.has_labels(b):
                out.update(fixed_labels=image(a, True), moving_labels=image(b, True))
            fp, mp = data.landmarks(a), data.landmarks(b)
            if fp is not None and mp is not None and fp.shape == mp.shape:
                out.update(fixed_points=fp, moving_points=mp)
            return out
        cases.append(Case(Path(path).stem, f"{a}<-{b}", data.ndim, load))
    return cases


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def dice_per_label(fixed_labels: sitk.Image, moving_labels: sitk.Image, transform=None, values=None) -> dict:
    """Dice of each label between the fixed label map and the moving one mapped onto the fixed grid."""
    if transform is None:
        transform = sitk.Transform(fixed_labels.GetDimension(), sitk.sitkIdentity)
    warped = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0, moving_labels.GetPixelID())
    f = sitk.GetArrayViewFromImage(fixed_labels)
    if values is None:
        values = sorted(set(np.unique(f).tolist()) & set(np.unique(sitk.GetArrayViewFromImage(moving_labels)).tolist()) - {0})
    return dice_per_label_arrays(f, sitk.GetArrayViewFromImage(warped), values)


def evaluate_case(case: Case, model: str, iterations: int, device: str, affine: bool = True) -> dict:
    """Register one pair with ``register()`` (affine stage on unless ``affine=False``) and score it; a flat row."""
    from DeepSalRegLib import register

    data = case.load()
    t0 = time.perf_counter()
    result = register(data["fixed"], data["moving"], model=model, device=device, iterations=iterations,
                      affine=affine)
    seconds = time.perf_counter() - t0
    row = dict(dataset=case.dataset, case=case.name, model=model, iterations=iterations, affine=affine,
               folding_percent=100.0 * float(result.metrics["folding_fraction"]),
               sd_log_jacobian=float(result.metrics["sd_log_jacobian"]), seconds=seconds)
    if data.get("fixed_points") is not None:
        before = io.target_registration_error(None, data["fixed_points"], data["moving_points"])
        after = io.target_registration_error(result.transform, data["fixed_points"], data["moving_points"])
        row.update(tre_before=float(before.mean()), tre_after=float(after.mean()),
                   tre_before_all=before.tolist(), tre_after_all=after.tolist())
    if data.get("fixed_labels") is not None:
        values = data.get("label_values")
        before = dice_per_label(data["fixed_labels"], data["moving_labels"], None, values)
        after = dice_per_label(data["fixed_labels"], data["moving_labels"], result.transform, list(before) if values is None else values)
        row.update(dice_before=float(np.mean(list(before.values()))), dice_after=float(np.mean(list(after.values()))),
                   labels=len(before))
    return row


def evaluate_synthetic(dataset, count, model, iterations, device, outliers, max_displacement, crop=None, seed=0,
                       split=None) -> list[dict]:
    """End-point error on ``count`` synthetic pairs of a dataset's images (the network on the stored grid)."""
    import torch

    from DeepSalRegLib import models
    from DeepSalRegLib.optimise import instance_optimise
    from DeepSalRegLib.registration import resolve_device
    from DeepSalRegLib.warp import jacobian_determinant
    from training.datasets import Augmentation, FixedSampler, SyntheticPairs
    from training.synthetic import DeformationSettings, OutlierSettings

    pairs = SyntheticPairs(dataset, split, count, DeformationSettings(max_displacement=max_displacement),
                           OutlierSettings(probability=outliers), Augmentation(crop=crop), seed)
    dev = resolve_device(device)
    net = None if model == "identity" else models.load(model, pairs.ndim, dev)[0]
    rows = []
    for tag in FixedSampler(count):
        sample = pairs[tag]
        fixed, moving, truth = (sample[k].unsqueeze(0).to(dev) for k in ("fixed", "moving", "flow"))
        t0 = time.perf_counter()
        with torch.no_grad():
            flow = net(fixed, moving)["flow"] if net is not None else torch.zeros_like(truth)
        if iterations:
            flow = instance_optimise(fixed, moving, flow, iterations)
        seconds = time.perf_counter() - t0
        channels_last = (lambda t: t[0].movedim(0, -1).cpu().numpy())  # (1, nd, *S) -> (*S, nd)
        err = end_point_error(channels_last(flow), channels_last(truth))
        inside = (sample["outlier"][0] > 0.5).cpu().numpy()
        jac = jacobian_statistics(jacobian_determinant(flow)[0, 0].cpu().numpy())
        rows.append(dict(dataset=f"{Path(dataset).stem}-synthetic", case=str(tag[1]), model=model, iterations=iterations,
                         epe=float(err.mean()), epe_identity=float(torch.sqrt((truth ** 2).sum(1)).mean()),
                         epe_outlier=float(err[inside].mean()) if inside.any() else float("nan"),
                         folding_percent=100.0 * jac["folding_fraction"],
                         sd_log_jacobian=jac["sd_log_jacobian"], seconds=seconds))
    return rows


# --------------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------------


def _nanmean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def model_label(model) -> str:
    """Short display name: a registry name as is, a path as ``folder/file`` (runs differ by folder)."""
    path = Path(str(model))
    return f"{path.parent.name}/{path.name}" if path.suffix in (".pt", ".pth") and path.parent.name else path.name


def summarise(rows: list[dict]) -> dict:
    """Per dataset (and model): mean of each metric over its pairs."""
    out = {}
    for row in rows:
        key = f"{row['dataset']}|{row['model']}|{row['iterations']}"
        out.setdefault(key, []).append(row)
    summary = {}
    for key, group in out.items():
        keys = [k for k in group[0] if isinstance(group[0][k], (int, float)) and k not in ("iterations", "labels")]
        summary[key] = dict(dataset=group[0]["dataset"], model=group[0]["model"], iterations=group[0]["iterations"],
                            pairs=len(group), **{k: _nanmean([g.get(k) for g in group]) for k in keys})
    return summary


def table(summary: dict) -> str:
    """Markdown table: identity vs model per dataset."""
    lines = ["| dataset | model | it. | pairs | metric | identity | model | folding % | SD log J | s/pair |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    for s in summary.values():
        metrics = []
        if s.get("tre_after") is not None:
            metrics.append(("TRE mm", s["tre_before"], s["tre_after"]))
        if s.get("dice_after") is not None:
            metrics.append(("Dice", s["dice_before"], s["dice_after"]))
        if s.get("epe") is not None:
            metrics.append(("EPE vox", s["epe_identity"], s["epe"]))
            if s.get("epe_outlier") is not None:
                metrics.append(("EPE in outlier", None, s["epe_outlier"]))
        for name, before, after in metrics or [("-", None, None)]:
            lines.append(f"| {s['dataset']} | {model_label(s['model'])} | {s['iterations']} | {s['pairs']} | {name} | "
                         f"{fmt(before)} | {fmt(after)} | {fmt(s.get('folding_percent'), 4)} | "
                         f"{fmt(s.get('sd_log_jacobian'))} | {fmt(s.get('seconds'), 2)} |")
    return "\n".join(lines)


def _read_csv_log(path: Path):
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot(rows: list[dict], runs, path: Path) -> Path:
    """PNG: training curves of run folders (top) and per-dataset error distributions (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    ncols = max(2, len(datasets))
    fig, axes = plt.subplots(2, ncols, figsize=(4 * ncols, 7), squeeze=False)
    for run in runs or []:
        run = Path(run)
        log, val = _read_csv_log(run / "log.csv"), _read_csv_log(run / "val.csv")
        if log:
            axes[0, 0].plot([float(r["step"]) for r in log], [float(r["loss"]) for r in log], marker="." if len(log) < 30 else None,
                            label=f"{run.name} train loss")
        if val:
            key = "epe" if val[0].get("epe") else "loss"
            axes[0, 1].plot([float(r["step"]) for r in val], [float(r[key]) for r in val], marker="o", label=f"{run.name} val {key}")
    for ax, title in ((axes[0, 0], "training loss"), (axes[0, 1], "validation")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run folder given (--run)", ha="center", transform=ax.transAxes)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for ax, name in zip(axes[1], datasets):
        group = [r for r in rows if r["dataset"] == name]
        models_ = list(dict.fromkeys(f"{model_label(r['model'])} it{r['iterations']}" for r in group))

        def of(model_key):
            return [r for r in group if f"{model_label(r['model'])} it{r['iterations']}" == model_key]

        first = of(models_[0])
        if "tre_after_all" in group[0]:
            boxes = [np.concatenate([r["tre_before_all"] for r in first])]
            boxes += [np.concatenate([r["tre_after_all"] for r in of(m)]) for m in models_]
            ax.set_ylabel("TRE per landmark (mm)")
        elif "dice_after" in group[0]:
            boxes = [[r["dice_before"] for r in first]] + [[r["dice_after"] for r in of(m)] for m in models_]
            ax.set_ylabel("mean Dice per pair")
        elif "epe" in group[0]:
            boxes = [[r["epe_identity"] for r in first]] + [[r["epe"] for r in of(m)] for m in models_]
            ax.set_ylabel("EPE per pair (voxels)")
        else:  # pairs without landmarks, labels or true fields: show what there is
            boxes = [[r["folding_percent"] for r in of(m)] for m in models_]
            ax.boxplot(boxes)
            ax.set_xticks(range(1, len(boxes) + 1), models_, rotation=20, fontsize=7)
            ax.set_ylabel("folding % (no landmarks or labels)")
            ax.set_title(f"{name} ({len(first)} pairs)")
            continue
        ax.boxplot(boxes)
        ax.set_xticks(range(1, len(boxes) + 1), ["identity", *models_], rotation=20, fontsize=7)
        ax.set_title(f"{name} ({len(first)} pairs)")
    for ax in axes[1, len(datasets):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(rows, out: Path, runs=()) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    flat = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    (out / "results.json").write_text(json.dumps(dict(rows=rows, summary=list(summary.values())), indent=1) + "\n")
    (out / "summary.md").write_text(table(summary) + "\n")
    plot(rows, runs, out / "evaluation.png")
    return summary


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("Examples::")
    p = argparse.ArgumentParser(prog="evaluate.py", description=doc[0].strip().split("\n\n")[0],
                                epilog="Examples:\n" + doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("pairs (one of)")
    src.add_argument("--suite", choices=("shared",), help="the real-data suite of ../shared/data")
    src.add_argument("--pairs", help="CSV of pairs")
    src.add_argument("--dataset", help="a make_dataset.py .h5 file")
    p.add_argument("--only", nargs="+", default=list(SUITE_PARTS), help=f"suite parts ({', '.join(SUITE_PARTS)})")
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="the shared data folder (default ../shared/data)")
    p.add_argument("--prostate-pairs", type=int, default=6, help="consecutive prostate case pairs (default 6)")
    p.add_argument("--kind", default="inter", help="dataset pair list: intra, inter, atlas (default inter)")
    p.add_argument("--split", choices=("train", "val"), help="dataset split (default: all images / pairs)")
    p.add_argument("--limit", type=int, help="at most this many dataset pairs")
    p.add_argument("--synthetic", type=int, default=0, help="score N synthetic pairs of the dataset's images instead")
    p.add_argument("--outliers", type=float, default=0.0, help="synthetic: probability of an outlier per pair")
    p.add_argument("--max-displacement", type=float, default=8.0, help="synthetic: largest smooth displacement (voxels)")
    p.add_argument("--crop", type=int, nargs="+", help="synthetic: crop size (array order)")
    p.add_argument("--model", action="append", help="model name or .pt path (repeatable; default: default)")
    p.add_argument("--iterations", type=int, default=0, help="instance-optimisation steps after the network (default 0)")
    p.add_argument("--no-affine", dest="affine", action="store_false",
                   help="skip register()'s affine pre-alignment (score the network alone)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--run", action="append", default=[], help="training output folder whose curves to plot (repeatable)")
    p.add_argument("--out", help="folder for results.csv/json, summary.md and evaluation.png")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if sum(bool(x) for x in (args.suite, args.pairs, args.dataset)) != 1:
            raise InputError("give exactly one of --suite, --pairs or --dataset.")
        if args.synthetic and not args.dataset:
            raise InputError("--synthetic needs --dataset (the images to deform).")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        models_ = args.model or ["default"]
        rows = []
        if args.synthetic:
            for m in models_:
                rows += evaluate_synthetic(args.dataset, args.synthetic, m, args.iterations, args.device, args.outliers,
                                           args.max_displacement, tuple(args.crop) if args.crop else None,
                                           split=args.split)
                print(f"{m}: {len(rows)} synthetic pairs scored", file=sys.stderr, flush=True)
        else:
            if args.suite:
                cases = shared_suite(args.data_root, args.only, args.prostate_pairs)
            elif args.pairs:
                cases = cases_from_csv(args.pairs)
            else:
                cases = cases_from_h5(args.dataset, args.kind, args.split, args.limit)
            for m in models_:
                for case in cases:
                    row = evaluate_case(case, m, args.iterations, args.device, args.affine)
                    rows.append(row)
                    shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
                    print(f"{case.dataset} {case.name} [{m}]: {shown}", file=sys.stderr, flush=True)
        summary = write_outputs(rows, Path(args.out), args.run) if args.out else summarise(rows)
        print(table(summary))
    except DeepSalRegError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
