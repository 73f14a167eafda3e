"""Networks: the global (coarse) network, the local regression network and the combined model.

Data flow of ``DeepSalRegNet.forward(fixed, moving)`` (fields follow ``warp.py``: voxels, fixed grid,
fixed->moving, channel = array axis)::

    pad to a multiple -> [downsample] -> GlobalNet(cat(moving, fixed)) -> coarse field u_c [upsample]
    W_c = M(x + u_c);  JSM = joint_saliency_map(F, W_c)
    LocalNet(cat(JSM, u_c, F, W_c, |F - W_c|)) -> residual du (zero at initialisation)
    u = u_c + du  (or exp(v_c + dv) when diffeomorphic);  W = M(x + u);  crop back

The thesis's variant (preset ``thesis-2d``) feeds only ``cat(JSM, u_c)`` to the local network and lets it
predict the full field. A checkpoint stores the constructor arguments so it rebuilds its own network.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ModelError
from .io import file_sha256  # noqa: F401  (re-exported: checkpoints are checked with it)
from .matching import MatchingNet
from .saliency import THESIS_OPTIONS, joint_saliency_map
from .warp import integrate_velocity, resize_field, spatial_dims, warp

__all__ = [
    "GlobalNet",
    "LocalNet",
    "DeepSalRegNet",
    "PRESETS",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "file_sha256",
]

CHECKPOINT_FORMAT = "deepsalreg-model"
CHECKPOINT_VERSION = 1


def _conv(nd):
    return nn.Conv2d if nd == 2 else nn.Conv3d


def _deconv(nd):
    return nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d


class _ConvAct(nn.Sequential):
    def __init__(self, nd, cin, cout, kernel=3, stride=1, dilation=1, slope=0.1):
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            _conv(nd)(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation),
            nn.LeakyReLU(slope),
        )


def _flow_head(nd, cin, activation: bool):
    conv = _conv(nd)(cin, nd, 3, padding=1)
    nn.init.normal_(conv.weight, std=1e-5)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.LeakyReLU(0.1)) if activation else conv


class GlobalNet(nn.Module):
    """FlowNetS-like encoder-decoder predicting a field at every scale (thesis topology, widths configurable).

    Args:
        ndim: 2 or 3.
        widths: per level ``(c_a, c_b)``; level 0 keeps full resolution, each further level halves it.
            The thesis (128 px cardiac) uses ``[(128,128), (256,256), (512,512), (1024,1024)]``.
        first_kernels: kernel sizes of the two full-resolution convolutions (thesis: 7 and 5).
        down_kernel: kernel of the first (stride-2) convolution of level 1 (thesis: 5).
        head_activation: LeakyReLU on the flow heads (thesis) instead of linear heads.
        upsample_flow: ``"deconv"`` (thesis: learned 4x4 stride-2) or ``"interp"`` (linear x2, values x2).
        in_channels: 2 (moving, fixed).
    Forward: ``(B, in_channels, *S)`` with ``S`` divisible by ``multiple`` -> ``(field, [coarser fields])``,
    fields in voxels of their own scale.
    """

    def __init__(self, ndim, widths, first_kernels=(3, 3), down_kernel=3, head_activation=False,
                 upsample_flow="interp", in_channels=2):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError("ndim must be 2 or 3")
        if upsample_flow not in ("deconv", "interp"):
            raise ValueError("upsample_flow must be 'deconv' or 'interp'")
        self.ndim, self.levels, self.upsample_flow = ndim, len(widths) - 1, upsample_flow
        self.multiple = 2 ** self.levels
        enc = [nn.Sequential(_ConvAct(ndim, in_channels, widths[0][0], first_kernels[0]),
                             _ConvAct(ndim, widths[0][0], widths[0][1], first_kernels[1]))]
        for level in range(1, len(widths)):
            k = down_kernel if level == 1 else 3
            enc.append(nn.Sequential(_ConvAct(ndim, widths[level - 1][1], widths[level][0], k, stride=2),
                                     _ConvAct(ndim, widths[level][0], widths[level][1], 3)))
        self.encoder = nn.ModuleList(enc)
        heads, ups, flow_ups = [], [], []
        feat = widths[-1][1]
        for level in range(self.levels, 0, -1):
            heads.append(_flow_head(ndim, feat, head_activation))
            skip = widths[level - 1][1]
            ups.append(nn.Sequential(_deconv(ndim)(feat, skip, 4, stride=2, padding=1), nn.LeakyReLU(0.1)))
            if upsample_flow == "deconv":
                flow_ups.append(_deconv(ndim)(ndim, ndim, 4, stride=2, padding=1, bias=False))
            feat = 2 * skip + ndim
        self.heads = nn.ModuleList(heads)
        self.ups = nn.ModuleList(ups)
        self.flow_ups = nn.ModuleList(flow_ups)
        self.final_head = _flow_head(ndim, feat, head_activation)

    def forward(self, x):
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        feat = skips[-1]
        coarse = []
        for i, level in enumerate(range(self.levels, 0, -1)):
            flow = self.heads[i](feat)
            coarse.append(flow)
            if self.upsample_flow == "deconv":
                up_flow = self.flow_ups[i](flow)
            else:
                up_flow = resize_field(flow, skips[level - 1].shape[2:])
            feat = torch.cat([skips[level - 1], self.ups[i](feat), up_flow], dim=1)
        return self.final_head(feat), coarse


class LocalNet(nn.Module):
    """Local regression network: stride-1 convolutions from the JSM, the coarse field and the images.

    Args:
        ndim: 2 or 3.
        in_channels: channels of the stacked input.
        widths: hidden widths (thesis: 128, 64, 32).
        dilations: one per convolution including the output one (thesis: all 1); dilations enlarge the
            receptive field at no cost.
        residual: zero-initialised output, so at initialisation it predicts no correction (modern); when
            False the last layer has LeakyReLU and predicts the full field (thesis).
    """

    def __init__(self, ndim, in_channels, widths=(32, 32, 16), dilations=None, residual=True):
        super().__init__()
        dilations = list(dilations or [1] * (len(widths) + 1))
        if len(dilations) != len(widths) + 1:
            raise ValueError("LocalNet needs one dilation per convolution (len(widths) + 1)")
        layers, cin = [], in_channels
        for width, dilation in zip(widths, dilations):
            layers.append(_ConvAct(ndim, cin, width, 3, dilation=dilation))
            cin = width
        out = _conv(ndim)(cin, ndim, 3, padding=dilations[-1], dilation=dilations[-1])
        if residual:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            layers.append(out)
        else:
            layers.append(nn.Sequential(out, nn.LeakyReLU(0.1)))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class DeepSalRegNet(nn.Module):
    """Global-to-local registration network coupled by the joint saliency map.

    Args:
        ndim: 2 or 3.
        global_widths, first_kernels, down_kernel, head_activation, upsample_flow: see ``GlobalNet``.
        global_type: ``"flownet"`` (``GlobalNet``, the thesis's encoder-decoder) or ``"matching"``
            (``matching.MatchingNet``: feature pyramid + cost volumes; ``matching_options`` are its arguments).
        global_downsample: run the global network at 1/k resolution and upsample its field (cheap 3D).
        local_widths, local_dilations: see ``LocalNet``.
        jsm_input: give the JSM to the local network (the forward coupling; False = ablation "2fcn_rf").
        local_images: also give it fixed, coarse-warped moving and their absolute difference.
        residual: the local network predicts a correction added to the coarse field (False = thesis).
        diffeomorphic: both networks predict stationary velocities, integrated by scaling and squaring.
        int_steps: scaling-and-squaring steps.
        jsm_options: keyword options of ``joint_saliency_map``.
    Forward: ``fixed, moving (B, 1, *S)`` of any size -> dict with ``flow_coarse``, ``flow`` (voxel fields),
    ``warped_coarse``, ``warped`` (None with ``warp_output=False``: inference that warps later itself),
    ``jsm`` (``(B,1,*S)``) and ``flows_multiscale`` (list, padded grid).
    """

    def __init__(self, ndim=2, global_widths=((16, 32), (32, 32), (64, 64), (64, 64)), first_kernels=(3, 3),
                 down_kernel=3, head_activation=False, upsample_flow="interp", global_downsample=1,
                 local_widths=(32, 32, 16), local_dilations=(1, 2, 4, 1), jsm_input=True, local_images=True,
                 residual=True, diffeomorphic=False, int_steps=7, jsm_options=None, global_type="flownet",
                 matching_options=None):
        super().__init__()
        self.config = dict(
            global_type=global_type, matching_options=dict(matching_options or {}),
            ndim=ndim, global_widths=[list(w) for w in global_widths], first_kernels=list(first_kernels),
            down_kernel=down_kernel, head_activation=head_activation, upsample_flow=upsample_flow,
            global_downsample=global_downsample, local_widths=list(local_widths),
            local_dilations=list(local_dilations) if local_dilations else None, jsm_input=jsm_input,
            local_images=local_images, residual=residual, diffeomorphic=diffeomorphic, int_steps=int_steps,
            jsm_options=dict(jsm_options or {}),
        )
        self.ndim = ndim
        if global_type == "flownet":
            self.global_net = GlobalNet(ndim, global_widths, first_kernels, down_kernel, head_activation, upsample_flow)
        elif global_type == "matching":
            self.global_net = MatchingNet(ndim, **dict(matching_options or {}))
        else:
            raise ValueError(f"global_type must be 'flownet' or 'matching', got {global_type!r}")
        self.global_downsample = int(global_downsample)
        self.multiple = self.global_net.multiple * self.global_downsample
        local_in = ndim + (1 if jsm_input else 0) + (3 if local_images else 0)
        self.local_net = LocalNet(ndim, local_in, local_widths, local_dilations, residual)
        self.jsm_input, self.local_images, self.residual = jsm_input, local_images, residual
        self.diffeomorphic, self.int_steps = diffeomorphic, int_steps
        self.jsm_options = dict(jsm_options or {})

    def _to_field(self, v):
        return integrate_velocity(v, self.int_steps) if self.diffeomorphic else v

    def forward(self, fixed, moving, warp_output: bool = True):
        nd = spatial_dims(fixed)
        if nd != self.ndim:
            raise ValueError(f"this model is {self.ndim}D but got {nd}D images")
        if fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must both be (B, 1, *S)")
        shape = fixed.shape[2:]
        padded = [(-n) % self.multiple for n in shape]
        pad = []
        for p in reversed(padded):
            pad += [0, p]
        x = F.pad(torch.cat([moving, fixed], dim=1), pad)
        if self.global_downsample > 1:
            pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
            x = pool(x, self.global_downsample)
        v_coarse, multiscale = self.global_net(x)
        v_coarse = resize_field(v_coarse, [n + p for n, p in zip(shape, padded)])
        crop = tuple([slice(None), slice(None)] + [slice(0, n) for n in shape])
        v_coarse = v_coarse[crop]
        flow_coarse = self._to_field(v_coarse)
        warped_coarse = warp(moving, flow_coarse)
        jsm = joint_saliency_map(fixed, warped_coarse, **self.jsm_options)
        inputs = [jsm] if self.jsm_input else []
        inputs.append(v_coarse)
        if self.local_images:
            inputs += [fixed, warped_coarse, (fixed - warped_coarse).abs()]
        delta = self.local_net(torch.cat(inputs, dim=1))
        v = v_coarse + delta if self.residual else delta
        flow = self._to_field(v)
        return dict(flow_coarse=flow_coarse, flow=flow, warped_coarse=warped_coarse,
                    warped=warp(moving, flow) if warp_output else None, jsm=jsm, flows_multiscale=multiscale)


_MODERN_LOSS = dict(similarity="lncc", gradient_weight=0.0, smoothness="diffusion", smoothness_weight=1.0,
                    jsm_weight="coarse+refined", coarse_weight=0.5, jsm_alpha=0.1)

#: Named configurations: ``model`` holds ``DeepSalRegNet`` arguments, ``loss`` the ``RegistrationLoss`` ones.
PRESETS = {
    # Thesis topology (LVQU 128x128 cardiac network, ~33 M parameters) and loss: LeakyReLU flow heads,
    # learned flow upsampling, local net on [JSM, coarse field] predicting the full field, batch-normalised
    # thesis JSM, Charbonnier data + 20 x gradient + TV smoothness, summed.
    "thesis-2d": dict(
        model=dict(ndim=2, global_widths=[[128, 128], [256, 256], [512, 512], [1024, 1024]], first_kernels=[7, 5],
                   down_kernel=5, head_activation=True, upsample_flow="deconv", local_widths=[128, 64, 32],
                   local_dilations=[1, 1, 1, 1], jsm_input=True, local_images=False, residual=False,
                   jsm_options=dict(THESIS_OPTIONS)),
        loss=dict(similarity="charbonnier", gradient_weight=20.0, smoothness="tv", smoothness_weight=1.0,
                  jsm_weight="none", coarse_weight=0.0, reduction="sum"),
    ),
    # Modern 2D: small widths, linear heads, residual local net with image inputs, JSM-weighted loss.
    "modern-2d": dict(
        model=dict(ndim=2, global_widths=[[16, 32], [32, 32], [64, 64], [64, 64]], local_widths=[32, 32, 16],
                   local_dilations=[1, 2, 4, 1]),
        loss=dict(similarity="lncc", gradient_weight=0.0, smoothness="diffusion", smoothness_weight=1.0,
                  jsm_weight="coarse+refined", coarse_weight=0.5, jsm_alpha=0.1),
    ),
    # Modern 3D: global network at half resolution, light full-resolution local network.
    "modern-3d": dict(
        model=dict(ndim=3, global_widths=[[8, 16], [16, 32], [32, 32], [64, 64]], global_downsample=2,
                   local_widths=[16, 16, 8], local_dilations=[1, 2, 4, 1]),
        loss=dict(similarity="lncc", gradient_weight=0.0, smoothness="diffusion", smoothness_weight=1.0,
                  jsm_weight="coarse+refined", coarse_weight=0.5, jsm_alpha=0.1),
    ),
    # Explicit matching (session 7, issue 13): the global network is a feature pyramid with cost volumes at
    # 1/8, 1/4, 1/2 (matching.py); the light local network refines at full resolution from the JSM.
    "matching-2d": dict(
        model=dict(ndim=2, global_type="matching",
                   matching_options=dict(feature_widths=[16, 32, 32], radii=[4, 3, 2], decoder_widths=[48, 32, 32]),
                   local_widths=[32, 32, 16], local_dilations=[1, 2, 4, 1]),
        loss=dict(_MODERN_LOSS),
    ),
    "matching-3d": dict(
        model=dict(ndim=3, global_type="matching",
                   matching_options=dict(feature_widths=[8, 16, 32], radii=[3, 2, 1], decoder_widths=[32, 24, 16]),
                   local_widths=[16, 16, 8], local_dilations=[1, 2, 4, 1]),
        loss=dict(_MODERN_LOSS),
    ),
}


def build_model(preset: str = "modern-2d", **overrides) -> DeepSalRegNet:
    """A fresh ``DeepSalRegNet`` from a preset name, with constructor arguments overridden by keyword."""
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(PRESETS[preset]["model"])
    config.update(overrides)
    return DeepSalRegNet(**config)


def save_checkpoint(path, model: DeepSalRegNet, **extra) -> Path:
    """Write weights with the constructor arguments (and ``extra`` plain data) atomically; returns the path.

    ``extra`` must hold only plain types (numbers, strings, lists, dicts, tensors) so that the file loads
    with ``torch.load(weights_only=True)``.
    """
    from .io import _write_atomically

    payload = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, config=model.config,
                   state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra)
    return _write_atomically(path, lambda tmp: torch.save(payload, tmp), "checkpoint")


def load_checkpoint(path, device="cpu", expected_sha256: str | None = None):
    """Rebuild a model from a checkpoint written by ``save_checkpoint``; returns ``(model, payload)``.

    Loads with ``weights_only=True`` (no unpickling of arbitrary objects). Raises ``ModelError`` with one
    clear sentence for a missing, corrupt, foreign or mismatched file (including a sha256 mismatch).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise ModelError(f"model file {path} is corrupt or was changed: sha256 {actual[:12]}... "
                             f"does not match the expected {expected_sha256[:12]}...")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            # a pickle of other objects (a whole model, an optimiser, ...): never unpickled here, and torch's
            # advice to retry with weights_only=False would run arbitrary code from the file
            raise ModelError(f"cannot read model file {path}: it holds more than weights and a network "
                             "description (not a DeepSalReg model file); export it with training/export_model.py") from None
        raise ModelError(f"cannot read model file {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a DeepSalReg model file")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise ModelError(f"{path} was written by a newer DeepSalReg (format version {payload['version']})")
    try:
        model = DeepSalRegNet(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path} does not match its own network description: {str(exc).splitlines()[0][:200]}") from None
    return model.to(device).eval(), payload
