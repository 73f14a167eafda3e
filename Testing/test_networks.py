"""Networks: shapes for any size, zero-initialised refinement, ablation switches, checkpoints."""
import pytest
import torch

from DeepSalRegLib.errors import ModelError
from DeepSalRegLib.networks import PRESETS, build_model, file_sha256, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("preset,shape", [
    ("modern-2d", (2, 1, 37, 51)),
    ("modern-2d", (1, 1, 64, 64)),
    ("modern-3d", (1, 1, 19, 23, 17)),
    ("modern-3d", (1, 1, 32, 48, 40)),
])
def test_field_shapes_for_odd_sizes(preset, shape):
    model = build_model(preset)
    fixed, moving = torch.rand(shape), torch.rand(shape)
    out = model(fixed, moving)
    nd = len(shape) - 2
    assert out["flow"].shape == (shape[0], nd, *shape[2:])
    assert out["flow_coarse"].shape == out["flow"].shape
    assert out["warped"].shape == shape and out["jsm"].shape == shape
    assert torch.isfinite(out["flow"]).all()


def test_thesis_preset_is_the_thesis_topology():
    model = build_model("thesis-2d")
    n_params = sum(p.numel() for p in model.global_net.parameters())
    assert 32e6 < n_params < 34e6  # method.md: about 33 M
    out = model(torch.rand(1, 1, 40, 40), torch.rand(1, 1, 40, 40))
    assert out["flow"].shape == (1, 2, 40, 40)
    assert model.local_net.body[0][0].in_channels == 3  # [JSM, coarse field] only


def test_refined_equals_coarse_at_initialisation():
    model = build_model("modern-2d")
    out = model(torch.rand(1, 1, 48, 40), torch.rand(1, 1, 48, 40))
    assert torch.equal(out["flow"], out["flow_coarse"])
    assert torch.equal(out["warped"], out["warped_coarse"])


def test_ablation_switches_change_the_local_input():
    assert build_model("modern-2d", jsm_input=False).local_net.body[0][0].in_channels == 5
    assert build_model("modern-2d", local_images=False).local_net.body[0][0].in_channels == 3
    model = build_model("modern-2d", diffeomorphic=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    out = model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert out["flow"].abs().max() > 0


def test_gradients_reach_the_global_network_through_the_jsm():
    """The thesis's backward path (b2): loss on the refined warp -> JSM -> coarse field -> global net."""
    model = build_model("modern-2d", local_images=False)
    with torch.no_grad():
        for p in model.local_net.parameters():
            p.normal_(0, 0.05)
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    out = model(fixed, moving)
    grad = torch.autograd.grad(out["jsm"].sum(), model.global_net.final_head.weight, allow_unused=True)[0]
    assert grad is not None and grad.abs().sum() > 0


def test_checkpoint_rebuilds_its_own_network(tmp_path):
    model = build_model("modern-3d", local_widths=[8, 8, 4])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "m.pt", model, note="test", step=3)
    loaded, payload = load_checkpoint(path, expected_sha256=file_sha256(path))
    assert payload["note"] == "test" and payload["step"] == 3
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x, x.flip(2))["flow"], model.eval()(x, x.flip(2))["flow"])


def test_bad_checkpoints_give_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="cannot read"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelError, match="not a DeepSalReg model"):
        load_checkpoint(foreign)
    good = save_checkpoint(tmp_path / "good.pt", build_model("modern-2d"))
    with pytest.raises(ModelError, match="sha256"):
        load_checkpoint(good, expected_sha256="0" * 64)
    payload = torch.load(good, weights_only=True)
    payload["config"]["local_widths"] = [8, 8, 8]
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ModelError, match="does not match"):
        load_checkpoint(tmp_path / "mismatch.pt")
    with pytest.raises(ModelError, match="unknown preset"):
        build_model("resnet")


def test_presets_are_plain_data():
    for preset in PRESETS.values():
        assert set(preset) == {"model", "loss"}
