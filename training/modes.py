"""The two training modes: what data they draw and what they minimise.

* **Supervised** (the thesis's ``flownet_supervised``): random smooth deformations of real images with
  known fields (optionally with a synthetic outlier in one image); loss = end-point error (EPE) of the
  refined field plus ``epe_coarse_weight`` times the coarse field's EPE plus ``epe_multiscale_weight``
  times the mean EPE of the global network's coarser fields (FlowNet deep supervision), optionally plus
  ``similarity_weight`` times the unsupervised loss (a hybrid). Validation metric: EPE in voxels.
* **Unsupervised** (the thesis's ``flownet_unsupervised``): real pairs from the dataset's pair lists;
  loss = ``RegistrationLoss`` (similarity + smoothness with the joint-saliency weighting of the core
  library). Validation: the same loss, and Dice of warped label maps when the pairs have them. With
  ``data.pairs: synthetic`` it trains on the supervised mode's synthetic pairs without looking at their
  fields (the loss stays unsupervised; validation then also reports the end-point error): the set-up of
  the JSM ablation, where the true field is needed to score what the similarity alone learnt.

Fields follow ``DeepSalRegLib/warp.py`` (voxels, fixed grid, fixed -> moving).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from DeepSalRegLib.errors import InputError
from DeepSalRegLib.losses import RegistrationLoss, end_point_error_loss, multiscale_end_point_error_loss
from DeepSalRegLib.networks import PRESETS
from DeepSalRegLib.warp import warp

from .datasets import Augmentation, RealPairs, SyntheticPairs
from .synthetic import DeformationSettings, IntensitySettings, OutlierSettings

__all__ = ["dice_score", "build_datasets", "Objective"]


def dice_score(fixed_labels: torch.Tensor, warped_labels: torch.Tensor, max_labels: int = 64) -> torch.Tensor:
    """Mean Dice over the non-zero labels of the fixed label map, per sample: ``(B,)`` (NaN without labels).

    Validation only (not differentiable): each sample is scored by ``DeepSalRegLib.metrics.dice_per_label``,
    the one Dice of the project.
    """
    from DeepSalRegLib.metrics import dice_per_label

    scores = []
    for f, w in zip(fixed_labels, warped_labels):
        f_np, w_np = f.detach().cpu().numpy(), w.detach().cpu().numpy()
        values = [v for v in np.unique(f_np).tolist() if v != 0][:max_labels]
        per = dice_per_label(f_np, w_np, values)
        scores.append(float(np.mean(list(per.values()))) if per else float("nan"))
    return torch.tensor(scores, dtype=torch.float32)


def _augmentation(data: dict) -> Augmentation:
    intensity = IntensitySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["intensity"].items()}) \
        if data["intensity"] else None
    crop = tuple(int(c) for c in data["crop"]) if data["crop"] else None
    return Augmentation(crop=crop, flip=float(data["flip"]), swap=float(data["swap"]), intensity=intensity)


def build_datasets(config: dict):
    """``(train dataset, validation dataset or None)`` for the configured mode."""
    data, seed = config["data"], config["seed"]
    if not data["path"]:
        raise InputError("no dataset given: set data.path (or --data) to an .h5 file built by training/make_dataset.py.")
    augmentation = _augmentation(data)
    val_augmentation = copy.copy(augmentation)
    val_augmentation.flip, val_augmentation.swap = 0.0, 0.0
    if config["mode"] == "supervised" or data["pairs"] == "synthetic":
        d = data["deformation"]
        deformation = DeformationSettings(max_displacement=float(d["max_displacement"]),
                                          control_points=tuple(int(c) for c in d["control_points"]),
                                          diffeomorphic=bool(d["diffeomorphic"]), rotation_deg=float(d["rotation_deg"]),
                                          scale=float(d["scale"]), translation=float(d["translation"]))
        o = data["outliers"]
        outliers = OutlierSettings(probability=float(o["probability"]), radius=tuple(o["radius"]), kinds=tuple(o["kinds"]))
        train = SyntheticPairs(data["path"], "train", data["samples_per_epoch"], deformation, outliers, augmentation, seed)
        try:
            val = SyntheticPairs(data["path"], "val", data["val_samples"], deformation, outliers, val_augmentation, seed)
        except InputError:
            val = None
    else:
        train = RealPairs(data["path"], data["pairs"], "train", data["samples_per_epoch"], augmentation, seed)
        try:
            val = RealPairs(data["path"], data["pairs"], "val", data["val_samples"], val_augmentation, seed)
        except InputError:
            val = None
    return train, val


class Objective:
    """Loss and validation metrics of one mode for a ``DeepSalRegNet``.

    Args:
        config: the run configuration (``mode``, ``loss``, ``model.preset``).
    """

    def __init__(self, config: dict):
        self.mode = config["mode"]
        loss_cfg = config["loss"]
        preset = config["model"]["preset"]
        if preset not in PRESETS:
            raise InputError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        reg = dict(PRESETS[preset]["loss"])
        reg.update(loss_cfg["registration"] or {})
        try:
            self.registration = RegistrationLoss(**reg)
        except (TypeError, ValueError) as exc:
            raise InputError(f"loss.registration: {exc}") from None
        self.epe_weight = float(loss_cfg["epe_weight"])
        self.epe_coarse_weight = float(loss_cfg["epe_coarse_weight"])
        self.epe_multiscale_weight = float(loss_cfg["epe_multiscale_weight"])
        self.similarity_weight = float(loss_cfg["similarity_weight"])
        select = config["train"]["select"]
        self.select = ("epe" if self.mode == "supervised" else "loss") if select == "auto" else select
        if self.select not in ("epe", "loss", "dice"):
            raise InputError(f"train.select must be auto, epe, loss or dice, got {select!r}.")
        if self.select == "epe" and self.mode != "supervised":
            raise InputError("train.select=epe needs mode=supervised (only synthetic pairs have true fields).")

    @property
    def higher_is_better(self) -> bool:
        return self.select == "dice"

    def loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """``(total, parts)`` for a model output dict and its batch (tensors on the model's device)."""
        out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}  # AMP: losses in float32
        fixed = batch["fixed"]
        if self.mode == "unsupervised":
            return self.registration(out, fixed)
        parts = {}
        epe = end_point_error_loss(out["flow"], batch["flow"])
        total = self.epe_weight * epe
        parts["epe"] = float(epe.detach())
        if self.epe_coarse_weight:
            epe_c = end_point_error_loss(out["flow_coarse"], batch["flow"])
            total = total + self.epe_coarse_weight * epe_c
            parts["epe_coarse"] = float(epe_c.detach())
        if self.epe_multiscale_weight and out.get("flows_multiscale"):
            epe_ms = multiscale_end_point_error_loss(out["flows_multiscale"], batch["flow"])
            total = total + self.epe_multiscale_weight * epe_ms
            parts["epe_multiscale"] = float(epe_ms.detach())
        if self.similarity_weight:
            sim, sim_parts = self.registration(out, fixed)
            total = total + self.similarity_weight * sim
            parts.update({f"unsup_{k}": v for k, v in sim_parts.items()})
        return total, parts

    @torch.no_grad()
    def metrics(self, out: dict, batch: dict, moving_labels_warp=True) -> dict:
        """Validation metrics of one batch (sums over its samples, with ``count``)."""
        out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
        total, _ = self.loss(out, batch)
        n = batch["fixed"].shape[0]
        result = {"loss": float(total) * n, "count": n}
        if "flow" in batch:
            err = torch.sqrt(((out["flow"] - batch["flow"]) ** 2).sum(1) + 1e-12).flatten(1).mean(1)
            result["epe"] = float(err.sum())
            identity = torch.sqrt((batch["flow"] ** 2).sum(1) + 1e-12).flatten(1).mean(1)
            result["epe_identity"] = float(identity.sum())
            if "outlier" in batch and batch["outlier"].sum() > 0:
                inside = batch["outlier"] > 0.5
                e = torch.sqrt(((out["flow"] - batch["flow"]) ** 2).sum(1, keepdim=True) + 1e-12)
                result["epe_outlier_sum"] = float(e[inside].sum())
                result["epe_outlier_count"] = int(inside.sum())
        if "has_labels" in batch and bool(batch["has_labels"].any()):
            keep = batch["has_labels"]
            warped = warp(batch["moving_labels"][keep].float(), out["flow"][keep], mode="nearest").to(batch["fixed_labels"].dtype)
            dice = dice_score(batch["fixed_labels"][keep], warped)
            before = dice_score(batch["fixed_labels"][keep], batch["moving_labels"][keep])
            result["dice"] = float(torch.nan_to_num(dice).sum())
            result["dice_identity"] = float(torch.nan_to_num(before).sum())
            result["dice_count"] = int(keep.sum())
        return result
