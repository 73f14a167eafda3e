"""Ship a trained model: copy it into ``DeepSalRegLib/models``, register it and write its model card.

The card (``<name>.md`` next to the weights) records what a user needs to trust or rebuild the model:
the exact dataset and training commands, the configuration, data sources and their licences, seed,
training time and hardware (from the checkpoint's metadata), sha256, size and parameter count, and the
evaluation table written by ``evaluate.py`` (identity vs model on ``../shared/data``).

Only models trained on data whose terms allow shipping weights (synthetic data and the permissive
templates) may be exported; the data sources listed in the dataset file are checked against a list of
research-only folders of the shared data and refused.

Examples::

    python training/export_model.py runs/default-2d --name default-2d \\
        --description "2D default: synthetic deformations of permissive brain slices and shapes" \\
        --evaluation runs/eval-default-2d --train-command "python training/train.py --config training/configs/default-2d.yaml"
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py

from DeepSalRegLib.errors import DeepSalRegError, InputError
from DeepSalRegLib.models import MODELS_DIR, REGISTRY_FILE
from DeepSalRegLib.networks import file_sha256, load_checkpoint
from training.config import dump_config

#: Shared-data folders whose terms forbid shipping weights trained on them (see ../shared/data/README.md).
RESEARCH_ONLY = ("eth_liver", "brain_t1", "promise12", "drive", "anhir", "fair")
RESEARCH_ONLY_FILES = ("colin27_aal", "colin27_brodmann", "ants_mnia")  # AAL-like labels: research terms


SHARED = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def _dataset_sources(paths) -> tuple[list[str], list[str]]:
    """Source files and the make_dataset.py commands of the dataset(s), shared-data paths made relative."""
    names, history = [], []
    for path in paths if isinstance(paths, list) else [paths]:
        with h5py.File(path, "r") as f:
            names += sorted({(n.decode() if isinstance(n, bytes) else str(n)).split("[")[0] for n in f["names"][:]})
            history += [str(h) for h in f.attrs.get("history", [])]
    relative = lambda text: text.replace(SHARED, "../shared/data")  # noqa: E731
    return [relative(n) for n in names], [relative(h) for h in history]


def _check_licence(sources):
    for s in sources:
        parts = Path(s).parts
        if any(p in RESEARCH_ONLY for p in parts) or any(r in Path(s).name for r in RESEARCH_ONLY_FILES):
            raise InputError(f"the training data includes {s}, whose terms do not allow shipping weights "
                             "(research-only); such models may be built and evaluated, not exported.")


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_card(name, description, weights, payload, sources, history, train_command, evaluation_dir) -> str:
    training = payload.get("training", {})
    config = training.get("config", {})
    hardware = training.get("hardware") or {}
    best = training.get("best") or {}
    params = sum(v.numel() for k, v in payload["state_dict"].items() if k.endswith(("weight", "bias")))
    lines = [
        f"# Model card: `{name}`",
        "",
        description,
        "",
        "## Use",
        "",
        "```python",
        "import DeepSalRegLib",
        f'result = DeepSalRegLib.register("fixed.nrrd", "moving.nrrd", model="{name}")   # or model="default"',
        "```",
        "",
        f"- Network: `DeepSalRegNet` ({config.get('model', {}).get('preset', '?')} preset), {params / 1e6:.2f} M parameters, "
        f"{weights.stat().st_size / 1e6:.1f} MB; constructor arguments travel in the file.",
        f"- sha256: `{file_sha256(weights)}` (checked by the registry at load time).",
        f"- Field convention: voxels of the working grid, fixed -> moving (`DeepSalRegLib/warp.py`); "
        "`register()` returns it as a physical ITK displacement field.",
        "",
        "## Training",
        "",
        f"- Mode: {training.get('mode')} (see `training/modes.py`; the loss weights are in the configuration below); "
        f"seed {training.get('seed')}; exported checkpoint after {training.get('step')} optimiser steps; best validation "
        f"{best.get('metric')} {_number(best.get('value'))} at step {best.get('step')}.",
        f"- Time: {training.get('wall_seconds', '?')} s wall, {training.get('cpu_seconds', '?')} s CPU (this process) "
        f"until the exported checkpoint.",
        f"- Hardware: {hardware.get('processor', '?')} ({hardware.get('platform', '?')}), {hardware.get('cpu_count', '?')} cores "
        f"shared with other jobs, {hardware.get('threads', '?')} torch thread(s), device {hardware.get('device', '?')}"
        + (f" ({hardware['gpu']})" if hardware.get("gpu") else "") + f", {hardware.get('processes', 1)} process(es), "
        f"torch {hardware.get('torch', '?')}.",
        "",
        "Dataset (from the repository root; `../shared/data` is the shared data folder):",
        "",
        "```bash",
        *[f"python training/{h}" for h in history],
        "```",
        "",
        "Training:",
        "",
        "```bash",
        train_command,
        "```",
        "",
        "Configuration (as run):",
        "",
        "```yaml",
        dump_config(config).rstrip(),
        "```",
        "",
        "## Data and licences",
        "",
        "Trained only on data whose terms allow distributing derived weights: synthetic random-shape images and",
        "random smooth deformations (with synthetic outliers) of these permissive images (MNI ICBM152 2009a,",
        "Colin27, ANTs templates and slices, ITK / elastix examples; see `../shared/data/README.md`):",
        "",
        # a file used by several datasets (the same templates at two spacings) is listed once
        *[f"- `{s}`" for s in dict.fromkeys(s for s in sources if not s.startswith("synthetic"))],
        f"- synthetic shape images: {sum(s.startswith('synthetic') for s in sources)}",
        "",
    ]
    if evaluation_dir is not None:
        summary = Path(evaluation_dir) / "summary.md"
        command = Path(evaluation_dir) / "command.txt"
        lines += ["## Evaluation on `../shared/data` (identity vs this model)", ""]
        if command.is_file():
            lines += ["```bash", command.read_text().strip(), "```", ""]
        lines += [summary.read_text().strip() if summary.is_file() else "(no evaluation found)", ""]
        notes = Path(evaluation_dir) / "notes.md"
        if notes.is_file():
            lines += [notes.read_text().strip(), ""]
    return "\n".join(lines) + "\n"


def export(run, name, description, evaluation=None, train_command=None, checkpoint="model.pt",
           models_dir=MODELS_DIR) -> Path:
    """Copy ``run/checkpoint`` to ``models_dir/<name>.pt``, write ``<name>.md`` and update ``registry.json``."""
    run, models_dir = Path(run), Path(models_dir)
    registry_file = models_dir / REGISTRY_FILE.name
    src = run / checkpoint
    model, payload = load_checkpoint(src)  # validates the file
    training = payload.get("training", {})
    config = training.get("config")
    if not config:
        raise InputError(f"{src} carries no training metadata; export models written by training/train.py.")
    sources, history = _dataset_sources(config["data"]["path"])
    _check_licence(sources)
    weights = models_dir / f"{name}.pt"
    shutil.copyfile(src, weights)
    card = models_dir / f"{name}.md"
    card.write_text(write_card(name, description, weights, payload, sources, history,
                               train_command or f"python training/train.py --config {run / 'config.yaml'}", evaluation))
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else {}
    registry[name] = dict(file=weights.name, sha256=file_sha256(weights), ndim=model.ndim, card=card.name,
                          description=description)
    registry_file.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return weights


def main(argv=None) -> int:
    doc = __doc__.split("Examples::")
    p = argparse.ArgumentParser(prog="export_model.py", description=doc[0].strip().split("\n\n")[0],
                                epilog="Examples:\n" + doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="training output folder")
    p.add_argument("--name", required=True, help="registry name, e.g. default-2d")
    p.add_argument("--description", required=True, help="one-line description for the registry and the card")
    p.add_argument("--evaluation", help="evaluate.py output folder (summary.md, optional command.txt and notes.md)")
    p.add_argument("--train-command", help="the training command to print in the card")
    p.add_argument("--checkpoint", default="model.pt", help="which file of the run (default model.pt = best)")
    args = p.parse_args(argv)
    try:
        path = export(args.run, args.name, args.description, args.evaluation, args.train_command, args.checkpoint)
        print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB), card {path.with_suffix('.md')}, registry {REGISTRY_FILE}")
    except DeepSalRegError as exc:
        print(f"export_model.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
