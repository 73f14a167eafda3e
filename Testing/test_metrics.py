"""The one definition of each evaluation metric (``DeepSalRegLib/metrics.py``), on numbers worked by hand."""
import numpy as np

from DeepSalRegLib.metrics import LOG_JACOBIAN_CLIP, dice_per_label, end_point_error, jacobian_statistics


def test_dice_of_known_overlaps():
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[:2] = 1  # 8 voxels
    b[1:3] = 1  # 8 voxels, 4 shared
    a[3, 3] = 2
    assert dice_per_label(a, b, [1, 2, 5]) == {1: 0.5, 2: 0.0}  # label 5 is in neither map: left out


def test_jacobian_statistics_count_folding_and_clip_the_logarithm():
    det = np.array([1.0, np.e, -1.0, 0.0])
    stats = jacobian_statistics(det)
    assert stats["folding_fraction"] == 0.5
    logs = np.log([1.0, np.e, LOG_JACOBIAN_CLIP, LOG_JACOBIAN_CLIP])
    assert np.isclose(stats["sd_log_jacobian"], logs.std())
    region = np.array([True, True, False, False])
    assert jacobian_statistics(det, region) == dict(folding_fraction=0.0, sd_log_jacobian=0.5)


def test_end_point_error_is_the_length_of_the_difference():
    field = np.zeros((2, 2, 3))
    truth = np.zeros((2, 2, 3))
    truth[0, 0] = [3.0, 4.0, 0.0]
    np.testing.assert_allclose(end_point_error(field, truth), [[5.0, 0.0], [0.0, 0.0]])


def test_training_loss_is_the_metric_on_channels_first_fields():
    """``losses.end_point_error_loss`` ((B, nd, *S) tensors) averages the metric ((*S, nd) arrays)."""
    import torch

    from DeepSalRegLib.losses import end_point_error_loss

    rng = np.random.default_rng(0)
    field, truth = rng.normal(size=(5, 6, 3)), rng.normal(size=(5, 6, 3))
    as_tensor = lambda a: torch.from_numpy(np.moveaxis(a, -1, 0)[None])  # noqa: E731
    metric = end_point_error(field, truth)
    assert np.isclose(float(end_point_error_loss(as_tensor(field), as_tensor(truth))), metric.mean(), atol=1e-6)
    mask = torch.zeros(1, 1, 5, 6)
    mask[..., :2, :] = 1
    assert np.isclose(float(end_point_error_loss(as_tensor(field), as_tensor(truth), mask)), metric[:2].mean(), atol=1e-6)
