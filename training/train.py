"""Train a DeepSalReg network, supervised (synthetic fields) or unsupervised (real pairs), on CPU or GPU(s).

One command for both modes, configured by a YAML/JSON file (``training/configs/*.yaml``) and
``--set key=value`` overrides. The output folder receives ``config.yaml``, ``state.pt`` (the resumable
training state), ``model.pt`` (best on the validation split: a ``networks.save_checkpoint`` file that
``register(model=PATH)`` loads), ``last.pt``, ``log.csv`` / ``val.csv`` and TensorBoard events in ``tb/``.

A killed run continues where its last checkpoint left it (model, optimiser, scheduler, RNG states and
data position), to the same weights an uninterrupted run reaches: rerun the same command. Several GPUs
(or CPU processes) run through ``torchrun`` and DistributedDataParallel; ``train.batch_size`` is per process.

Examples::

    python training/train.py --config training/configs/supervised-2d.yaml --data data/t2d.h5 --out runs/sup2d
    python training/train.py --config training/configs/unsupervised-3d.yaml --set train.lr=3e-4 --set data.crop=[64,64,64]
    python training/train.py --config runs/sup2d/config.yaml                # resume a killed run
    python -m torch.distributed.run --nproc_per_node=2 training/train.py --config cfg.yaml --backend gloo
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under torchrun) from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from DeepSalRegLib.errors import DeepSalRegError, InputError, ModelError
from DeepSalRegLib.networks import PRESETS, build_model, load_checkpoint, save_checkpoint
from training.checkpoints import load_state, save_state, set_rng_state, weights_digest
from training.config import dump_config, load_config
from training.datasets import FixedSampler, ResumableSampler
from training.modes import Objective, build_datasets

__all__ = ["train", "main"]


# --------------------------------------------------------------------------------------------------
# processes and devices
# --------------------------------------------------------------------------------------------------


class Distributed:
    """Process group facts; a single process when not started by ``torchrun``."""

    def __init__(self, backend: str, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        wants_cuda = device_name in ("auto", "cuda", "gpu") or device_name.startswith("cuda")
        if device_name.startswith("cuda") or device_name == "gpu":
            if not torch.cuda.is_available():
                raise InputError(f"train.device={device_name} but no CUDA GPU is available here; use cpu or auto.")
        elif device_name not in ("auto", "cpu"):
            raise InputError(f"unknown train.device {device_name!r}; use auto, cpu or cuda.")
        use_cuda = wants_cuda and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            backend = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
            dist.init_process_group(backend=backend)
        self.main = self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_mean(self, values: dict) -> dict:
        """Average of numbers over processes (for the logged loss)."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _amp_settings(config, device):
    amp = config["train"]["amp"]
    enabled = device.type == "cuda" if amp == "auto" else bool(amp)
    if enabled and device.type != "cuda":
        raise InputError("train.amp=true needs a CUDA device (mixed precision is not used on CPU).")
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    return enabled, dtype


# --------------------------------------------------------------------------------------------------
# model, optimiser, schedule
# --------------------------------------------------------------------------------------------------


def make_model(config):
    init = config["model"]["init"]
    if init:
        model, _ = load_checkpoint(init)
        return model.train()
    preset = config["model"]["preset"]
    if preset not in PRESETS:
        raise InputError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    try:
        return build_model(preset, **(config["model"]["overrides"] or {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"model.overrides: {exc}") from None


def make_scheduler(optimizer, config):
    t = config["train"]
    steps, warmup = int(t["steps"]), int(t["warmup_steps"])
    kind = t["scheduler"]
    if kind == "constant":
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif kind == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup), eta_min=0.05 * t["lr"])
    elif kind == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 3), gamma=0.3)
    else:
        raise InputError(f"train.scheduler must be cosine, constant or step, got {kind!r}.")
    if warmup <= 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.05, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


# --------------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------------


class CsvLog:
    """Append-only CSV with a fixed header; on resume rows after the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None):
        self.path, self.fields = path, fields
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= resume_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict):
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _progress_bar(config, total, initial):
    wanted = config["train"]["progress"]
    show = sys.stderr.isatty() if wanted == "auto" else bool(wanted)
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _loader(dataset, sampler, config, device):
    workers = int(config["data"]["workers"])
    return torch.utils.data.DataLoader(dataset, batch_size=config["train"]["batch_size"], sampler=sampler,
                                       num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def validate(model, objective, dataset, config, device, amp):
    """Mean validation metrics over the fixed validation samples (run by rank 0 on the bare model)."""
    if dataset is None:
        return None
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=config["train"]["batch_size"],
                                         sampler=FixedSampler(len(dataset)), num_workers=int(config["data"]["workers"]))
    sums = {}
    with torch.no_grad():
        for batch in loader:
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
                out = model(batch["fixed"], batch["moving"])
            for k, v in objective.metrics(out, batch).items():
                sums[k] = sums.get(k, 0) + v
    model.train()
    count = sums.pop("count", 0)
    result = {k: v / count for k, v in sums.items() if k in ("loss", "epe", "epe_identity")}
    if sums.get("epe_outlier_count"):
        result["epe_outlier"] = sums["epe_outlier_sum"] / sums["epe_outlier_count"]
    if sums.get("dice_count"):
        result["dice"] = sums["dice"] / sums["dice_count"]
        result["dice_identity"] = sums["dice_identity"] / sums["dice_count"]
    return result


def _check_resumable(state, config, model, path):
    old = state["config"]
    if old["mode"] != config["mode"]:
        raise ModelError(f"checkpoint {path} is a {old['mode']} run; this configuration is {config['mode']} "
                         "(use another --out to start a new run).")
    if state["model_config"] != model.config:
        diff = sorted(k for k in set(model.config) | set(state["model_config"])
                      if model.config.get(k) != state["model_config"].get(k))
        raise ModelError(f"checkpoint {path} holds a different network (differs in {', '.join(diff)}); "
                         "use the same model settings or another --out.")
    changed = sorted(f"{s}.{k}" for s in ("data", "loss", "train") for k in config[s]
                     if config[s][k] != old[s].get(k) and k not in ("steps", "max_minutes", "progress", "workers", "threads", "device"))
    return changed


def train(config: dict, resume: str = "auto", backend: str = "auto", interrupt_after: int | None = None) -> dict:
    """Run (or resume) one training; returns a summary dict (rank 0) with paths, best value and timings."""
    t_cfg = config["train"]
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if t_cfg["threads"]:
        torch.set_num_threads(int(t_cfg["threads"]))
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    dist = Distributed(backend, str(t_cfg["device"]))
    try:
        return _train(config, dist, resume, interrupt_after)
    finally:
        dist.close()
        # leave the calling process as we found it (train() is also called in-process, e.g. by tests)
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def _train(config, dist, resume, interrupt_after):
    t_cfg = config["train"]
    out = Path(config["output"]).expanduser()
    device = dist.device
    torch.manual_seed(config["seed"])
    objective = Objective(config)
    train_set, val_set = build_datasets(config)
    model = make_model(config).to(device)
    if model.ndim != train_set.ndim:
        raise ModelError(f"the model is {model.ndim}D but the dataset {config['data']['path']} is {train_set.ndim}D.")
    batch_size = int(t_cfg["batch_size"])
    if len(train_set) // dist.world < batch_size:
        raise InputError(f"an epoch of {len(train_set)} samples cannot fill batches of {batch_size} on {dist.world} "
                         "process(es); raise data.samples_per_epoch or lower train.batch_size.")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg["lr"], weight_decay=t_cfg["weight_decay"])
    scheduler = make_scheduler(optimizer, config)
    amp = _amp_settings(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp[0] and amp[1] == torch.float16 else None

    position = dict(step=0, epoch=0, batch=0, wall_s=0.0, cpu_s=0.0)  # times: this rank, summed over resumes
    best = dict(metric=objective.select, value=None, step=None)
    state_path = out / "state.pt"
    resume_from = None
    if resume not in ("auto", "never"):
        resume_from = Path(resume)
    elif resume == "auto" and state_path.is_file():
        resume_from = state_path
    elif resume == "never" and state_path.is_file():
        raise InputError(f"{out} already holds a run (state.pt); resume it (--resume auto) or choose another --out.")
    notes = []
    if resume_from is not None:
        state = load_state(resume_from)
        changed = _check_resumable(state, config, model, resume_from)
        if changed:
            notes.append("resumed with changed settings (the result will differ from an uninterrupted run): " + ", ".join(changed))
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        position, best = {"wall_s": 0.0, "cpu_s": 0.0, **state["position"]}, dict(state["best"])
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
        for note in notes:
            print(f"train.py: note: {note}", file=sys.stderr)
    dist.barrier()

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net.train()

    resumed_step = position["step"] if resume_from is not None else None
    hardware = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                    cpu_count=os.cpu_count(), torch=str(torch.__version__), device=str(device),
                    gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    threads=torch.get_num_threads(), processes=dist.world, amp=str(amp[1]) if amp[0] else None)
    logs = tb = bar = None
    if dist.main:
        parts_keys = ["epe", "epe_coarse", "epe_multiscale", "unsup_similarity", "unsup_similarity_coarse"] \
            if config["mode"] == "supervised" else []
        logs = dict(
            train=CsvLog(out / "log.csv", ["step", "epoch", "loss", *parts_keys, "similarity", "smoothness",
                                           "similarity_coarse", "smoothness_coarse", "lr", "pairs_per_s", "elapsed_s",
                                           "cpu_s"],
                         resumed_step),
            val=CsvLog(out / "val.csv", ["step", "loss", "epe", "epe_identity", "epe_outlier", "dice", "dice_identity"],
                       resumed_step),
        )
        if t_cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(out / "tb"), purge_step=(resumed_step + 1) if resumed_step else None)
            except ImportError:
                print("train.py: note: tensorboard is not installed; logging to CSV only", file=sys.stderr)
        bar = _progress_bar(config, int(t_cfg["steps"]), position["step"])

    clock = dict(wall=time.perf_counter(), cpu=time.process_time())

    def tick():
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        position["wall_s"] += now_wall - clock["wall"]
        position["cpu_s"] += now_cpu - clock["cpu"]
        clock.update(wall=now_wall, cpu=now_cpu)

    def metadata():
        return dict(training=dict(step=position["step"], mode=config["mode"], seed=config["seed"], best=dict(best),
                                  wall_seconds=round(position["wall_s"], 1), cpu_seconds=round(position["cpu_s"], 1),
                                  hardware=hardware, config=config))

    def checkpoint():
        tick()
        if dist.main:
            save_state(state_path, model, optimizer, scheduler, scaler, position, best, config)
            extra = metadata()
            save_checkpoint(out / "last.pt", model, **extra)
            if best["value"] is None or val_set is None:  # no validation: the latest model is the best one
                save_checkpoint(out / "model.pt", model, **extra)
        dist.barrier()

    def run_validation():
        if val_set is None:
            return
        if dist.main:
            metrics = validate(model, objective, val_set, config, device, amp)
            value = metrics.get(objective.select)
            if value is not None and not math.isnan(value):
                better = best["value"] is None or (value > best["value"] if objective.higher_is_better else value < best["value"])
                if better:
                    best.update(value=float(value), step=position["step"])
                    tick()
                    save_checkpoint(out / "model.pt", model, **metadata())
            logs["val"].write(dict(step=position["step"], **metrics))
            if tb is not None:
                for k, v in metrics.items():
                    tb.add_scalar(f"val/{k}", v, position["step"])
            if bar is None:
                print(f"step {position['step']}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                      file=sys.stderr, flush=True)
        dist.barrier()

    steps = int(t_cfg["steps"])
    t_start = time.perf_counter()
    window_t, window_pairs = time.perf_counter(), 0
    running = {}
    time_up = False
    while position["step"] < steps and not time_up:
        sampler = ResumableSampler(train_set, batch_size, position["epoch"], position["batch"], config["seed"],
                                   dist.rank, dist.world)
        for batch in _loader(train_set, sampler, config, device):
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
                output = net(batch["fixed"], batch["moving"])
            loss, parts = objective.loss(output, batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if t_cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg["grad_clip"])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            position["step"] += 1
            position["batch"] += 1
            window_pairs += batch_size * dist.world
            for k, v in dict(loss=float(loss.detach()), **parts).items():
                running[k] = running.get(k, 0.0) + v
            running["n"] = running.get("n", 0) + 1
            step = position["step"]
            if t_cfg["max_minutes"]:  # a wall-clock cap (the GPU recipe): every process stops at the same step
                over = (time.perf_counter() - t_start) / 60.0 >= float(t_cfg["max_minutes"])
                time_up = dist.all_mean({"over": float(over)})["over"] > 0
            if step % int(t_cfg["log_every"]) == 0 or step == steps:
                n = running.pop("n")
                means = dist.all_mean({k: v / n for k, v in running.items()})
                running = {}
                now = time.perf_counter()
                rate = window_pairs / max(now - window_t, 1e-9)
                window_t, window_pairs = now, 0
                if dist.main:
                    tick()
                    row = dict(step=step, epoch=position["epoch"], lr=scheduler.get_last_lr()[0], pairs_per_s=rate,
                               elapsed_s=position["wall_s"], cpu_s=position["cpu_s"], **means)
                    logs["train"].write(row)
                    if tb is not None:
                        for k, v in means.items():
                            tb.add_scalar(f"train/{k}", v, step)
                        tb.add_scalar("train/lr", row["lr"], step)
                        tb.add_scalar("train/pairs_per_s", rate, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{means['loss']:.4g}", pairs_s=f"{rate:.1f}")
                    else:
                        print(f"step {step}/{steps} loss {means['loss']:.4g} ({rate:.1f} pairs/s)", file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(1)
            if step % int(t_cfg["val_every"]) == 0 or step == steps or time_up:
                run_validation()
            if step % int(t_cfg["checkpoint_every"]) == 0 or step == steps or time_up:
                checkpoint()
                if interrupt_after is not None and step >= interrupt_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)  # testing aid: die like a killed job, no clean-up
            if step >= steps or time_up:
                break
        else:
            position["epoch"] += 1
            position["batch"] = 0
    digest = weights_digest(model)
    if dist.world > 1:
        (out / f"rank{dist.rank}.sha256").write_text(digest + "\n")
    dist.barrier()
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    tick()
    return dict(output=str(out), steps=position["step"], best=best, weights_sha256=digest,
                seconds=time.perf_counter() - t_start, wall_seconds=position["wall_s"], cpu_seconds=position["cpu_s"],
                model=str(out / "model.pt"))


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("Examples::")
    p = argparse.ArgumentParser(prog="train.py", description=doc[0].strip().split("\n\n")[0],
                                epilog="Examples:\n" + doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON configuration (see training/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 --set data.crop=[64,64] (repeatable)")
    p.add_argument("--data", help="shortcut for --set data.path=...")
    p.add_argument("--out", help="shortcut for --set output=...")
    p.add_argument("--mode", choices=("supervised", "unsupervised"), help="shortcut for --set mode=...")
    p.add_argument("--steps", type=int, help="shortcut for --set train.steps=...")
    p.add_argument("--seed", type=int, help="shortcut for --set seed=...")
    p.add_argument("--resume", default="auto", help="auto (continue the output folder's run if there is one; default), "
                   "never (refuse to reuse a folder), or a state.pt path")
    p.add_argument("--backend", default="auto", help="torch.distributed backend under torchrun: auto (nccl on GPU, gloo on CPU), gloo, nccl")
    p.add_argument("--interrupt-after", type=int, help=argparse.SUPPRESS)  # testing aid: SIGKILL itself after this step's checkpoint
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        overrides = list(args.overrides)
        for key, value in (("data.path", args.data), ("output", args.out), ("mode", args.mode),
                           ("train.steps", args.steps), ("seed", args.seed)):
            if value is not None:
                overrides.append(f"{key}={value}")
        config = load_config(args.config, overrides)
        summary = train(config, args.resume, args.backend, args.interrupt_after)
        if int(os.environ.get("RANK", "0")) == 0:
            best = summary["best"]
            best_text = f"best {best['metric']} {best['value']:.4g} at step {best['step']}" if best["value"] is not None else "no validation split"
            print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; {best_text}; model: {summary['model']}")
    except DeepSalRegError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
