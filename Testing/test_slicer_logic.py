"""Tier B: running a registration from MRML nodes, and getting its results back as nodes, with real MRML.

The library itself is replaced where it would be slow, never Slicer: a fake process runner stands in for the
``deepsalreg register`` child process (SlicerNNUnet's pattern) and writes its outputs with the library's own
``RegistrationResult.save``; a few tests run real child processes (a stand-in command line, and the real one
when torch is installed). The batch script runs on a real scene. One smoke test imports the module file with
stand-ins for Qt and the scripted-module base classes (the only place where anything of Slicer is faked).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core==5.12.4.0 vtk==9.6.0)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core (no vtkMRMLScene); "
                "pip install slicer-core==5.12.4.0 vtk==9.6.0", allow_module_level=True)

from DeepSalRegLib import geometry, io, slicer_glue as glue  # noqa: E402
from DeepSalRegLib.errors import InputError, OutputError  # noqa: E402
from DeepSalRegLib.registration import RegistrationResult  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH_SCRIPT = REPO / "DeepSalReg" / "Resources" / "batch_register.py"
MODULE_FILE = REPO / "DeepSalReg" / "DeepSalReg.py"
SHIFT = np.array([3.0, -2.0, 1.5])  # LPS mm: the moving image is the fixed one moved by this


# ---------------------------------------------------------------------------------------------------------
# a known registration and a fake command line
# ---------------------------------------------------------------------------------------------------------


def phantom_pair(dimension=3, shift=SHIFT):
    """A fixed image and a moving image that is the same content moved by ``shift`` (LPS mm)."""
    size = (20, 16, 10)[:dimension]
    spacing = (1.5, 1.0, 2.0)[:dimension]
    origin = (-12.0, 30.0, 5.0)[:dimension]
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size[::-1]], indexing="ij")[::-1]
    images = []
    for offset in (np.zeros(dimension), np.asarray(shift[:dimension])):
        centre = (np.asarray(size) - 1) / 2 + offset / np.asarray(spacing)
        r2 = sum(((g - c) / (n / 4)) ** 2 for g, c, n in zip(grids, centre, size))
        image = sitk.GetImageFromArray((100 * np.exp(-r2)).astype(np.float32))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        images.append(image)
    return images


def known_result(fixed, moving, shift=SHIFT, fixed_landmarks=None, moving_landmarks=None) -> RegistrationResult:
    """A ``RegistrationResult`` whose field is the translation ``shift`` (what a perfect registration finds)."""
    nd = fixed.GetDimension()
    field = np.broadcast_to(np.asarray(shift[:nd], dtype=np.float64), sitk.GetArrayFromImage(fixed).shape + (nd,))
    displacement = sitk.GetImageFromArray(np.ascontiguousarray(field), isVector=True)
    displacement.CopyInformation(fixed)
    transform = geometry.displacement_transform(displacement)
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    saliency = sitk.Cast(sitk.RescaleIntensity(fixed, 0.0, 1.0), sitk.sitkFloat32)
    jacobian = sitk.Cast(fixed * 0 + 1, sitk.sitkFloat32)
    confidence = sitk.Cast(sitk.RescaleIntensity(fixed, 0.1, 1.0), sitk.sitkFloat32)
    tre = mapped = None
    if fixed_landmarks is not None:
        tre = dict(before=io.target_registration_error(None, fixed_landmarks, moving_landmarks),
                   after=io.target_registration_error(transform, fixed_landmarks, moving_landmarks))
        mapped = io.transform_points(transform, fixed_landmarks)
    return RegistrationResult(fixed=fixed, moving=moving, displacement=displacement, transform=transform, warped=warped,
                              saliency=saliency, jacobian=jacobian, timings={"total": 0.01}, metrics={"ncc_after": 0.99},
                              tre=tre, mapped_landmarks=mapped, confidence=confidence)


def _argument(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


class FakeProcess:
    """A started ``deepsalreg register``: it streams its lines one poll at a time, then ends with its code."""

    def __init__(self, lines, code):
        self._lines, self._code = list(lines), code
        self.cancelled = False

    def read_lines(self):
        return [self._lines.pop(0)] if self._lines else []

    def poll(self):
        return None if self._lines else self._code

    def cancel(self):
        self.cancelled, self._lines, self._code = True, [], -9


class FakeCommandLine:
    """Injected as ``start_process``: does what the command line does, with the registration replaced by
    ``known_result`` and the files written by the library's ``RegistrationResult.save`` (as the CLI does)."""

    def __init__(self, code=0, last_words=(), write=True):
        self.code, self.last_words, self.write = code, list(last_words), write
        self.calls = []
        self.process = None

    def __call__(self, args, env=None, cwd=None):
        self.calls.append(dict(args=list(args), env=env, cwd=cwd))
        i = args.index("register")
        fixed_path, moving_path, outdir = args[i + 1], args[i + 2], _argument(args, "-o")
        self.inputs = dict(fixed=fixed_path, moving=moving_path, fixed_landmarks=_argument(args, "--fixed-landmarks"),
                           moving_landmarks=_argument(args, "--moving-landmarks"))
        if self.code == 0 and self.write:
            fixed, moving = io.read_image(fixed_path), io.read_image(moving_path)
            landmarks = [None, None]
            if self.inputs["fixed_landmarks"]:
                landmarks = [io.read_landmarks(self.inputs[k], fixed.GetDimension())[0] for k in ("fixed_landmarks", "moving_landmarks")]
            known_result(fixed, moving, fixed_landmarks=landmarks[0], moving_landmarks=landmarks[1]).save(outdir, report=False)
        lines = ["PROGRESS 0 reading images", "PROGRESS 40 network", "a log line", "PROGRESS 100 done", *self.last_words]
        self.process = FakeProcess(lines, self.code)
        return self.process


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def scene(monkeypatch):
    mrml = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", mrml, raising=False)
    yield mrml
    mrml.Clear(1)


@pytest.fixture
def pair_nodes(scene):
    """Fixed and moving volume nodes of the phantom, with three corresponding landmarks each."""
    fixed_image, moving_image = phantom_pair()
    fixed = glue.image_to_volume_node(fixed_image, scene, "fixed")
    moving = glue.image_to_volume_node(moving_image, scene, "moving")
    points = np.array([fixed_image.TransformContinuousIndexToPhysicalPoint(p) for p in [(5, 5, 3), (12, 8, 5), (15, 3, 7)]])
    fixed_markups = glue.landmarks_to_markups(points, scene, ["A", "B", "C"], "fixed landmarks")
    moving_markups = glue.landmarks_to_markups(points + SHIFT, scene, ["A", "B", "C"], "moving landmarks")
    return types.SimpleNamespace(fixed=fixed, moving=moving, fixed_markups=fixed_markups, moving_markups=moving_markups,
                                 points=points)


def lps_point_mapped_by(node, point_lps):
    ras = glue.lps_to_ras(point_lps)[0]
    return glue.ras_to_lps(node.GetTransformFromParent().TransformPoint(ras.tolist()))[0]


# ---------------------------------------------------------------------------------------------------------
# the child-process job, with a fake command line
# ---------------------------------------------------------------------------------------------------------


def test_job_turns_the_command_line_results_into_displayed_nodes(scene, pair_nodes, tmp_path):
    fake = FakeCommandLine()
    progress = []
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, glue.RegistrationOptions(device="cpu"),
                               fixed_landmarks=pair_nodes.fixed_markups, moving_landmarks=pair_nodes.moving_markups,
                               start_process=fake, temp_root=tmp_path, on_progress=lambda f, m: progress.append((f, m)))
    result = job.wait(timeout=30, interval=0.001)

    assert job.state == "succeeded" and job.error is None
    assert [f for f, _ in progress] == [0.0, 0.0, 0.4, 1.0, 1.0]
    assert progress[2][1] == "network" and "a log line" in job.output_lines
    # the transform: the field the command line wrote, "from parent", applied to the moving volume and landmarks
    point = np.asarray(pair_nodes.fixed.GetOrigin()) * [-1, -1, 1] + [4.0, 5.0, 6.0]
    np.testing.assert_allclose(lps_point_mapped_by(result.transform, point), point + SHIFT, atol=1e-4)
    assert pair_nodes.moving.GetParentTransformNode() is result.transform
    assert pair_nodes.moving_markups.GetParentTransformNode() is result.transform
    assert pair_nodes.fixed_markups.GetParentTransformNode() is None
    role = slicer.vtkMRMLTransformNode
    assert result.transform.GetNodeReferenceID(role.GetMovingNodeReferenceRole()) == pair_nodes.moving.GetID()
    assert result.transform.GetNodeReferenceID(role.GetFixedNodeReferenceRole()) == pair_nodes.fixed.GetID()
    # moving landmarks shown through the transform land on the fixed ones (world = fixed space)
    world = [0.0, 0.0, 0.0]
    pair_nodes.moving_markups.GetNthControlPointPositionWorld(1, world)
    np.testing.assert_allclose(world, pair_nodes.fixed_markups.GetNthControlPointPosition(1), atol=1e-2)
    # display
    assert result.transform.GetDisplayNode().GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert result.saliency.GetDisplayNode().GetColorNodeID()
    assert result.jacobian.GetDisplayNode().GetWindowLevelMax() == pytest.approx(2.0)
    assert result.warped is None  # not asked for
    # TRE table: per point and mean, with the markups' labels
    table = result.tre_table
    assert [table.GetCellText(r, 0) for r in range(4)] == ["A", "B", "C", "mean"]
    assert float(table.GetCellText(3, 1)) == pytest.approx(np.linalg.norm(SHIFT), abs=1e-3)
    assert float(table.GetCellText(3, 2)) == pytest.approx(0.0, abs=1e-3)
    assert result.mean_tre == pytest.approx((np.linalg.norm(SHIFT), 0.0), abs=1e-3)
    # names and the scratch folder
    assert result.transform.GetName() == "moving to fixed transform"
    assert list(tmp_path.iterdir()) == []


def test_job_sends_the_nodes_as_files_with_their_geometry(scene, pair_nodes, tmp_path):
    fake = FakeCommandLine()
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, glue.RegistrationOptions(iterations=7),
                               fixed_landmarks=pair_nodes.fixed_markups, moving_landmarks=pair_nodes.moving_markups,
                               start_process=fake, workdir=tmp_path / "work")
    job.start()
    sent_fixed = sitk.ReadImage(fake.inputs["fixed"])
    expected = glue.volume_node_to_image(pair_nodes.fixed)
    assert sent_fixed.GetOrigin() == pytest.approx(expected.GetOrigin())
    assert sent_fixed.GetSpacing() == pytest.approx(expected.GetSpacing())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sent_fixed), sitk.GetArrayFromImage(expected))
    points, labels = io.read_landmarks(fake.inputs["moving_landmarks"])
    np.testing.assert_allclose(points, pair_nodes.points + SHIFT, atol=1e-9)
    assert labels == ["A", "B", "C"]
    args = fake.calls[0]["args"]
    assert args[:3] == [sys.executable, "-m", "DeepSalRegLib.cli"]
    assert args[args.index("--iterations") + 1] == "7" and "--progress-lines" in args and "--no-report" in args
    job.wait(timeout=30, interval=0.001)
    assert (tmp_path / "work" / "output" / "transform.h5").is_file()  # a given workdir is kept


def test_job_environment_finds_the_library_and_hides_cuda_for_cpu(scene, pair_nodes, tmp_path):
    fake = FakeCommandLine()
    glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, glue.RegistrationOptions(device="cpu"),
                         env={"PYTHONPATH": "/elsewhere", "KEEP": "1"}, start_process=fake, temp_root=tmp_path).start()
    env = fake.calls[0]["env"]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["KEEP"] == "1"
    assert Path(fake.calls[0]["cwd"]) == REPO
    fake = FakeCommandLine()
    glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, glue.RegistrationOptions(device="auto"),
                         env={}, start_process=fake, temp_root=tmp_path).start()
    assert "CUDA_VISIBLE_DEVICES" not in fake.calls[0]["env"]


def test_user_error_of_the_command_line_becomes_its_exception_and_no_result(scene, pair_nodes, tmp_path):
    fake = FakeCommandLine(code=2, last_words=["deepsalreg: error: Fixed image is constant (all voxels 0)."])
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=fake, temp_root=tmp_path)
    with pytest.raises(InputError, match=r"^Fixed image is constant \(all voxels 0\)\.$"):
        job.wait(timeout=30, interval=0.001)
    assert job.state == "failed"
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    assert pair_nodes.moving.GetParentTransformNode() is None


def test_exit_codes_map_to_the_library_errors():
    from DeepSalRegLib.errors import DeviceError, ModelError

    assert isinstance(glue.error_for_exit_code(3, ["deepsalreg: error: unknown model 'x'"]), ModelError)
    assert str(glue.error_for_exit_code(4, ["deepsalreg: error: no CUDA GPU"])) == "no CUDA GPU"
    assert isinstance(glue.error_for_exit_code(4, []), DeviceError)
    assert isinstance(glue.error_for_exit_code(5, ["x"]), OutputError)
    internal = glue.error_for_exit_code(1, ["Traceback (most recent call last):", '  File "x.py"', "ZeroDivisionError: boom"])
    assert type(internal) is RuntimeError and "exit code 1" in str(internal) and "ZeroDivisionError: boom" in str(internal)


def test_internal_error_keeps_the_traceback_for_the_user(scene, pair_nodes, tmp_path):
    fake = FakeCommandLine(code=1, last_words=["Traceback (most recent call last):", "ValueError: bug"])
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=fake, temp_root=tmp_path)
    with pytest.raises(RuntimeError, match="ValueError: bug"):
        job.wait(timeout=30, interval=0.001)


def test_missing_results_fail_the_job_instead_of_hanging(scene, pair_nodes, tmp_path):
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=FakeCommandLine(write=False),
                               temp_root=tmp_path)
    with pytest.raises(OutputError, match="no displacement.nrrd or transform.h5"):
        job.wait(timeout=30, interval=0.001)
    assert job.state == "failed"


def test_cancel_stops_the_process_and_keeps_the_scene(scene, pair_nodes, tmp_path):
    fake = FakeCommandLine()
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=fake, temp_root=tmp_path).start()
    assert job.poll() is False
    job.cancel()
    assert fake.process.cancelled and job.state == "cancelled" and job.poll() is True
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="cancelled"):
        job.wait()


def test_landmarks_need_both_lists_of_the_same_length(scene, pair_nodes, tmp_path):
    with pytest.raises(InputError, match="both"):
        glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, fixed_landmarks=pair_nodes.fixed_markups,
                             start_process=FakeCommandLine(), temp_root=tmp_path).start()
    pair_nodes.moving_markups.RemoveNthControlPoint(0)
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, fixed_landmarks=pair_nodes.fixed_markups,
                               moving_landmarks=pair_nodes.moving_markups, start_process=FakeCommandLine(), temp_root=tmp_path)
    with pytest.raises(InputError, match="3 fixed, 2 moving"):
        job.start()
    assert job.state == "failed" and list(tmp_path.iterdir()) == []


def test_results_fill_the_nodes_the_user_chose(scene, pair_nodes, tmp_path):
    chosen = glue.OutputNodes(transform=scene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform"),
                              saliency=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my saliency"),
                              warped=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped"))
    result = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, nodes=chosen, start_process=FakeCommandLine(),
                                  temp_root=tmp_path).wait(timeout=30, interval=0.001)
    assert result.transform is chosen.transform and result.transform.GetName() == "my transform"
    assert result.saliency is chosen.saliency and result.saliency.GetImageData() is not None
    assert result.warped is chosen.warped
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result.warped).shape, slicer.util.arrayFromVolume(pair_nodes.fixed).shape)
    assert result.tre_table is None  # no landmarks given


def test_results_follow_a_transformed_fixed_volume(scene, pair_nodes, tmp_path):
    """A fixed volume under a (manual) transform takes the results and the output transform along."""
    import vtk

    prealign = scene.AddNewNodeByClass("vtkMRMLTransformNode", "manual prealignment")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(1, 3, 25.0)  # 25 mm anterior, "to parent"
    prealign.SetMatrixTransformToParent(matrix)
    pair_nodes.fixed.SetAndObserveTransformNodeID(prealign.GetID())
    result = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=FakeCommandLine(),
                                  temp_root=tmp_path).wait(timeout=30, interval=0.001)
    for node in (result.transform, result.saliency, result.jacobian):
        assert node.GetParentTransformNode() is prealign
    # a moving point q = p + shift is shown where the fixed point p is shown: at p moved by the prealignment
    p = pair_nodes.points[1]
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(pair_nodes.moving.GetParentTransformNode(), None, to_world)
    shown = to_world.TransformPoint(glue.lps_to_ras(p + SHIFT)[0].tolist())
    np.testing.assert_allclose(shown, glue.lps_to_ras(p)[0] + [0.0, 25.0, 0.0], atol=1e-2)


def test_progress_lines_are_parsed():
    assert glue.parse_progress_line("PROGRESS 42 refining field") == (0.42, "refining field")
    assert glue.parse_progress_line("PROGRESS 100") == (1.0, "")
    assert glue.parse_progress_line("  PROGRESS 7.5 x\r") == (0.075, "x")
    assert glue.parse_progress_line("PROGRESS 250 x") == (1.0, "x")
    assert glue.parse_progress_line("progress: 10%") is None
    assert glue.parse_progress_line("deepsalreg: warning: PROGRESS 10") is None


# ---------------------------------------------------------------------------------------------------------
# in-process registration (batch, PythonSlicer)
# ---------------------------------------------------------------------------------------------------------


def test_in_process_registration_of_2d_images_stays_in_the_slice(scene):
    fixed_image, moving_image = phantom_pair(dimension=2)
    fixed = glue.image_to_volume_node(fixed_image, scene, "fixed 2d", z_ras=4.0)
    moving = glue.image_to_volume_node(moving_image, scene, "moving 2d", z_ras=4.0)
    point = np.asarray(fixed_image.TransformContinuousIndexToPhysicalPoint((6.5, 7.0)))
    fixed_markups = glue.landmarks_to_markups(point[None], scene, z_ras=4.0)
    moving_markups = glue.landmarks_to_markups(point[None] + SHIFT[:2], scene, z_ras=4.0)
    calls = []

    def register(fixed_arg, moving_arg, **kwargs):
        calls.append(kwargs)
        assert fixed_arg.GetDimension() == moving_arg.GetDimension() == 2
        return known_result(fixed_arg, moving_arg, fixed_landmarks=kwargs["fixed_landmarks"],
                            moving_landmarks=kwargs["moving_landmarks"])

    result = glue.register_nodes(scene, fixed, moving, glue.RegistrationOptions(model="none", iterations=5),
                                 fixed_landmarks=fixed_markups, moving_landmarks=moving_markups, register=register)
    assert calls[0]["model"] == "none" and calls[0]["iterations"] == 5
    np.testing.assert_allclose(calls[0]["moving_landmarks"], point[None] + SHIFT[:2])
    mapped = result.transform.GetTransformFromParent().TransformPoint([-point[0], -point[1], 4.0])
    np.testing.assert_allclose(mapped, [-point[0] - SHIFT[0], -point[1] - SHIFT[1], 4.0], atol=1e-4)
    assert _ijk_to_ras(result.saliency).GetElement(2, 3) == pytest.approx(4.0)  # results sit in the fixed slice
    assert result.mean_tre[1] == pytest.approx(0.0, abs=1e-6)
    assert result.outputs.result is not None  # the library's result travels along (batch saves it)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


# ---------------------------------------------------------------------------------------------------------
# real child processes
# ---------------------------------------------------------------------------------------------------------

STAND_IN_CLI = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    if Path(sys.argv[0]).stem.endswith("hang"):
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path(args[args.index("-o") + 1]).parent.joinpath("pids.txt").write_text(f"{grandchild.pid}")
        print("PROGRESS 10 working", flush=True)
        time.sleep(120)
    import SimpleITK as sitk
    from DeepSalRegLib import io
    fixed = io.read_image(args[1])
    out = Path(args[args.index("-o") + 1])
    print("PROGRESS 5 reading", flush=True)
    print("r\\xe9sum\\xe9 of a log line", flush=True)
    zero = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, fixed.GetDimension())
    zero.CopyInformation(fixed)
    io.write_transform(zero, out / "displacement.nrrd")
    print("PROGRESS 100 done", flush=True)
    """
)


def _stand_in(tmp_path, name):
    script = tmp_path / f"{name}.py"
    script.write_text(STAND_IN_CLI)
    return [sys.executable, str(script)]


def test_real_child_process_streams_progress_and_results(scene, pair_nodes, tmp_path):
    progress, logs = [], []
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, command=_stand_in(tmp_path, "cli"),
                               temp_root=tmp_path, on_progress=lambda f, m: progress.append(f), on_log=logs.append)
    result = job.wait(timeout=60)
    assert job.state == "succeeded"
    assert progress == [0.0, 0.05, 1.0, 1.0]
    assert "résumé of a log line" in logs
    assert pair_nodes.moving.GetParentTransformNode() is result.transform
    assert result.saliency is None and result.tre_table is None  # the stand-in wrote only the field


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc (Linux)")
def test_cancel_kills_the_child_and_its_children(scene, pair_nodes, tmp_path):
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, command=_stand_in(tmp_path, "cli_hang"),
                               workdir=tmp_path / "work").start()
    deadline = time.monotonic() + 60
    while job.progress < 0.1 and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.progress == pytest.approx(0.1), "the stand-in did not start"
    pids = [job._process.pid, int((tmp_path / "work" / "pids.txt").read_text())]
    job.cancel()
    assert job.state == "cancelled"

    def alive(pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state not in ("Z", "X")

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_real_command_line_registers_the_shipped_2d_sample(scene, tmp_path):
    """End to end: node -> files -> ``python -m DeepSalRegLib.cli register`` -> nodes (refinement only, CPU)."""
    from DeepSalRegLib.sample_data import sample_pair

    fixed_path, moving_path = sample_pair("2d")
    fixed = glue.image_to_volume_node(io.read_image(fixed_path), scene, "fixed")
    moving = glue.image_to_volume_node(io.read_image(moving_path), scene, "moving")
    job = glue.RegistrationJob(scene, fixed, moving, glue.RegistrationOptions(model="none", device="cpu", iterations=3),
                               temp_root=tmp_path)
    result = job.wait(timeout=300)
    assert job.state == "succeeded", job.output_lines
    assert moving.GetParentTransformNode() is result.transform
    assert result.saliency is not None and result.jacobian is not None
    assert np.isfinite(slicer.util.arrayFromVolume(result.jacobian)).all()


# ---------------------------------------------------------------------------------------------------------
# the batch script
# ---------------------------------------------------------------------------------------------------------


def _load_batch_script():
    spec = importlib.util.spec_from_file_location("deepsalreg_batch_register", BATCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_registers_each_pair_saves_results_and_skips_a_failed_one(scene, tmp_path, capsys):
    batch = _load_batch_script()
    data = tmp_path / "data"
    data.mkdir()
    fixed_image, moving_image = phantom_pair()
    sitk.WriteImage(fixed_image, str(data / "fixed.nrrd"))
    sitk.WriteImage(moving_image, str(data / "moving.nrrd"))
    points = np.array([fixed_image.TransformContinuousIndexToPhysicalPoint(p) for p in [(4, 4, 2), (10, 9, 6)]])
    io.write_landmarks(points, data / "fixed_points.csv")
    io.write_landmarks(points + SHIFT, data / "moving_points.csv")
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_landmarks,moving_landmarks,name\n"
        "data/fixed.nrrd,data/moving.nrrd,data/fixed_points.csv,data/moving_points.csv,with_points\n"
        "data/fixed.nrrd,data/missing.nrrd,,,broken\n"
        "data/fixed.nrrd,data/moving.nrrd,,,\n"
    )
    registered = []

    def register(fixed, moving, **kwargs):
        registered.append(kwargs)
        return known_result(fixed, moving, fixed_landmarks=kwargs["fixed_landmarks"], moving_landmarks=kwargs["moving_landmarks"])

    code = batch.main(["--", str(tmp_path / "pairs.csv"), str(tmp_path / "out"), "--iterations", "4"],
                      scene=scene, register=register)
    assert code == 6  # one pair failed: the exit code of deepsalreg batch
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["with_points", "broken", "003_moving"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "missing.nrrd" in rows[1]["error"] and "does not exist" in rows[1]["error"]
    assert float(rows[0]["tre_before_mm"]) == pytest.approx(np.linalg.norm(SHIFT), abs=1e-3)
    assert float(rows[0]["tre_after_mm"]) == pytest.approx(0.0, abs=1e-3)
    assert rows[2]["tre_before_mm"] == ""
    assert [k["iterations"] for k in registered] == [4, 4]
    saved = tmp_path / "out" / "with_points"
    for name in ("transform.h5", "displacement.nrrd", "saliency.nrrd", "jacobian.nrrd", "tre.csv", "summary.json"):
        assert (saved / name).is_file(), name
    # the saved transform is the registration's: fixed landmark -> moving landmark
    transform = io.read_transform(saved / "transform.h5")
    np.testing.assert_allclose(transform.TransformPoint(points[0].tolist()), points[0] + SHIFT, atol=1e-4)
    assert json.loads((saved / "summary.json").read_text())["tre_mm"]["after"]["mean"] == pytest.approx(0.0, abs=1e-6)
    # pairs are removed from the scene once saved
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    assert "[2/3] broken: FAILED, skipped: Moving image" in capsys.readouterr().err


def test_batch_refuses_a_pair_list_without_fixed_and_moving(scene, tmp_path, capsys):
    batch = _load_batch_script()
    (tmp_path / "pairs.csv").write_text("a,b\n1,2\n")
    assert batch.main([str(tmp_path / "pairs.csv"), str(tmp_path / "out")], scene=scene, register=lambda *a, **k: None) == 2
    assert "fixed and moving" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the module file (the one test with stand-ins for Qt and the scripted-module base classes)
# ---------------------------------------------------------------------------------------------------------


def _module_with_stand_ins(monkeypatch):
    """Import DeepSalReg.py with stand-ins for what slicer-core lacks (Qt, the scripted-module framework)."""
    import unittest

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    stand_ins = {
        "qt": types.ModuleType("qt"),
        "slicer.i18n": types.SimpleNamespace(tr=lambda text: text, translate=lambda context, text: text),
        "slicer.parameterNodeWrapper": types.SimpleNamespace(parameterNodeWrapper=lambda cls: cls,
                                                             WithinRange=lambda low, high: (low, high)),
        "slicer.ScriptedLoadableModule": types.SimpleNamespace(
            ScriptedLoadableModule=Base, ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleWidget=Base,
            ScriptedLoadableModuleTest=unittest.TestCase),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("DeepSalReg_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMPORT_IN_A_FRESH_PYTHON = textwrap.dedent(
    """
    import importlib.util, json, sys, types, unittest
    import slicer
    class Base:
        def __init__(self, *args, **kwargs):
            pass
    sys.modules["qt"] = types.ModuleType("qt")
    sys.modules["slicer.i18n"] = types.SimpleNamespace(tr=lambda t: t, translate=lambda c, t: t)
    sys.modules["slicer.parameterNodeWrapper"] = types.SimpleNamespace(parameterNodeWrapper=lambda c: c,
                                                                       WithinRange=lambda a, b: (a, b))
    sys.modules["slicer.ScriptedLoadableModule"] = types.SimpleNamespace(
        ScriptedLoadableModule=Base, ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleWidget=Base,
        ScriptedLoadableModuleTest=unittest.TestCase)
    spec = importlib.util.spec_from_file_location("DeepSalReg", sys.argv[1])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "DeepSalRegLib", "SimpleITK", "matplotlib"))))
    """
)


def test_module_file_imports_light_and_its_logic_registers_nodes(monkeypatch, scene, pair_nodes, tmp_path):
    import subprocess

    # in a fresh interpreter: importing the module file loads neither torch nor the library
    loaded = subprocess.run([sys.executable, "-c", IMPORT_IN_A_FRESH_PYTHON, str(MODULE_FILE)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == []

    module = _module_with_stand_ins(monkeypatch)
    fields = module.DeepSalRegParameterNode.__annotations__
    assert {"fixedVolume", "movingVolume", "outputTransform", "device", "iterations"} <= set(fields)
    assert [d.value for d in module.Device] == ["auto", "cpu", "cuda"]

    fake = FakeCommandLine()
    logic = module.DeepSalRegLogic(startProcess=fake)
    result = logic.process(pair_nodes.fixed, pair_nodes.moving, fixedLandmarks=pair_nodes.fixed_markups,
                           movingLandmarks=pair_nodes.moving_markups, device="cpu", iterations=3, timeout=30)
    assert fake.calls[0]["env"]["CUDA_VISIBLE_DEVICES"] == "-1"
    assert pair_nodes.moving.GetParentTransformNode() is result.transform
    assert logic.summaryText(result, 2.0).startswith("Done in 2.0 s; mean TRE")

    monkeypatch.setenv("DEEPSALREG_MODELS_DIR", str(tmp_path / "models"))
    assert logic.modelsFolder() == tmp_path / "models"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.pt").write_bytes(b"weights")
    models = logic.availableModels()
    assert (f"mine.pt (models folder)", str(tmp_path / "models" / "mine.pt")) in models
    assert models[-1][1] == "none"
    (tmp_path / "models" / "mine.md").write_text("card")
    (tmp_path / "models" / "notes.txt").write_text("someone else's file in a shared folder")
    (tmp_path / "models" / "sub").mkdir()
    assert logic.clearModelsFolder() == 2  # the model and its card, nothing else
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["notes.txt", "sub"]


def test_batch_runs_without_matplotlib_and_passes_the_quality(scene, tmp_path, monkeypatch):
    """Slicer does not bundle matplotlib: by default the batch writes no report.png, so every pair succeeds;
    ``--report`` without matplotlib is refused up front (exit 2) instead of failing each pair afterwards."""
    batch = _load_batch_script()
    fixed_image, moving_image = phantom_pair()
    sitk.WriteImage(fixed_image, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(moving_image, str(tmp_path / "moving.nrrd"))
    (tmp_path / "pairs.csv").write_text("fixed,moving,name\nfixed.nrrd,moving.nrrd,one\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now raises ImportError
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, real=importlib.util.find_spec: None if name == "matplotlib" else real(name, *a))
    seen = []

    def register(fixed, moving, **kwargs):
        seen.append(kwargs)
        return known_result(fixed, moving)

    code = batch.main([str(tmp_path / "pairs.csv"), str(tmp_path / "out"), "--quality", "fast"], scene=scene,
                      register=register)
    assert code == 0
    assert (tmp_path / "out" / "one" / "transform.h5").is_file()
    assert not (tmp_path / "out" / "one" / "report.png").exists()
    assert seen[0]["quality"] == "fast" and seen[0]["iterations"] is None
    assert batch.main([str(tmp_path / "pairs.csv"), str(tmp_path / "out2"), "--report"], scene=scene,
                      register=register) == 2
    assert not (tmp_path / "out2").exists()


def test_quality_travels_to_the_command_line_and_unknown_names_are_refused():
    options = glue.RegistrationOptions(quality="accurate", time_budget=12)
    args = glue.cli_arguments("f.nrrd", "m.nrrd", "out", options)
    assert args[args.index("--quality") + 1] == "accurate"
    assert float(args[args.index("--time-budget") + 1]) == 12.0
    assert "--iterations" not in args  # the preset's own stop, not a fixed count
    default = glue.cli_arguments("f.nrrd", "m.nrrd", "out", glue.RegistrationOptions())
    assert default[default.index("--quality") + 1] == "balanced"
    with pytest.raises(InputError, match="unknown quality"):
        glue.RegistrationOptions(quality="best")
    with pytest.raises(InputError, match="time budget"):
        glue.RegistrationOptions(time_budget=0)


def test_apply_is_disabled_while_a_registration_runs_in_slicers_process(monkeypatch):
    """'Run in Slicer's process' pumps events from the progress callback: a second click on Apply must not
    start a registration inside the first."""
    import contextlib

    module = _module_with_stand_ins(monkeypatch)
    monkeypatch.setattr(module.slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)
    monkeypatch.setattr(module.slicer, "util", types.SimpleNamespace(
        tryWithErrorDisplay=lambda *a, **k: contextlib.nullcontext(), resetSliceViews=lambda: None), raising=False)
    widget = module.DeepSalRegWidget()
    button = types.SimpleNamespace(enabled=True, toolTip="")
    widget.ui = types.SimpleNamespace(applyButton=button, iterationsSpinBox=types.SimpleNamespace(enabled=True),
                                      progressBar=types.SimpleNamespace(setVisible=lambda v: None, value=0),
                                      statusLabel=types.SimpleNamespace(text=""))
    widget._parameterNode = types.SimpleNamespace(
        fixedVolume=object(), movingVolume=object(), runInProcess=True, quality=module.Quality.BALANCED,
        iterations=0, model="default", device=module.Device.CPU, affine=True, outputTransform=None,
        fixedLandmarks=None, movingLandmarks=None, fixedMask=None, movingMask=None, warpedVolume=None,
        saliencyVolume=None, jacobianVolume=None,
        treTable=None)
    calls, seen = [], []

    class Logic:
        def installDependencies(self, askConfirmation=True):
            pass

        def process(self, inProcess=False, progressCallback=None, **kwargs):
            calls.append(kwargs)
            seen.append(button.enabled)
            widget.onApplyButton()  # the click that arrives while events are pumped
            progressCallback(0.5, "refining")
            return "result"

    widget.logic = Logic()
    monkeypatch.setattr(widget, "_showResult", lambda result, seconds: None, raising=False)
    widget._checkCanApply()
    assert button.enabled
    widget.onApplyButton()
    assert len(calls) == 1 and seen == [False]
    assert calls[0]["quality"] == "balanced" and calls[0]["iterations"] is None
    assert button.enabled  # enabled again afterwards


def test_the_child_process_needs_neither_matplotlib_nor_tqdm(tmp_path):
    """What the panel runs (its exact arguments) succeeds in a Python without matplotlib and tqdm, which is
    why the module does not ask to install them (``PIP_REQUIREMENTS``)."""
    from DeepSalRegLib.sample_data import sample_pair

    fixed, moving = sample_pair("2d")
    args = glue.cli_arguments(fixed, moving, tmp_path / "out", glue.RegistrationOptions(model="none", iterations=2))
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None; "
            "from DeepSalRegLib.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "transform.h5").is_file() and not (tmp_path / "out" / "report.png").exists()


def _mask_node(scene, volume, name, lo=(2, 2, 1), hi=(14, 10, 6)):
    """A label map on the grid of ``volume``: 1 inside the box [lo, hi) of voxel indices, 0 elsewhere."""
    image = glue.volume_node_to_image(volume)
    array = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    return glue.image_to_volume_node(mask, scene, name, node=node), array


def test_masks_travel_to_the_command_line_and_to_the_library(scene, pair_nodes, tmp_path):
    """The panel's fixed/moving mask selectors (the manual override of the joint saliency map): the child gets
    them as files on their own geometry; an in-process registration gets them as images."""
    fixed_mask, fixed_array = _mask_node(scene, pair_nodes.fixed, "fixed mask")
    moving_mask, moving_array = _mask_node(scene, pair_nodes.moving, "moving mask", lo=(0, 0, 0), hi=(9, 9, 9))
    fake = FakeCommandLine()
    job = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=fake, workdir=tmp_path / "w",
                               fixed_mask=fixed_mask, moving_mask=moving_mask)
    job.start()
    args = fake.calls[0]["args"]
    for flag, array, volume in (("--fixed-mask", fixed_array, pair_nodes.fixed),
                                ("--moving-mask", moving_array, pair_nodes.moving)):
        written = sitk.ReadImage(_argument(args, flag))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), array)
        assert written.GetOrigin() == pytest.approx(glue.volume_node_to_image(volume).GetOrigin())
    job.wait(timeout=30, interval=0.001)
    seen = {}

    def register(fixed, moving, **kwargs):
        seen.update(kwargs)
        return known_result(fixed, moving)

    glue.register_nodes(scene, pair_nodes.fixed, pair_nodes.moving, register=register, show=False,
                        fixed_mask=fixed_mask, moving_mask=moving_mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seen["fixed_mask"]), fixed_array)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seen["moving_mask"]), moving_array)


def test_the_confidence_map_is_the_overlay_with_its_meaning_in_the_legend(scene, pair_nodes, tmp_path):
    """The weight the refinement actually used comes back as its own volume (from the command line's
    confidence.nrrd), is overlaid on the fixed volume and carries a colour legend and a description that say
    what dark means for the reader."""
    for composite_class in ("vtkMRMLSliceCompositeNode",):
        if scene.GetNumberOfNodesByClass(composite_class) == 0:
            scene.AddNewNodeByClass(composite_class)
    result = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=FakeCommandLine(),
                                  temp_root=tmp_path).wait(timeout=30, interval=0.001)
    assert result.confidence is not None
    values = slicer.util.arrayFromVolume(result.confidence)
    assert 0.0 <= values.min() and values.max() <= 1.0 + 1e-6
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == result.confidence.GetID()
    assert composite.GetBackgroundVolumeID() == pair_nodes.fixed.GetID()
    legends = [result.confidence.GetNthDisplayNode(i) for i in range(result.confidence.GetNumberOfDisplayNodes())]
    legends = [n for n in legends if n is not None and n.IsA("vtkMRMLColorLegendDisplayNode")]
    assert len(legends) == 1 and "confidence" in legends[0].GetTitleText().lower()
    assert "one image only" in result.confidence.GetDescription()


def test_a_transform_already_on_the_moving_volume_is_kept_and_used_as_the_start(scene, pair_nodes, tmp_path):
    """A manual pre-alignment of the moving volume (Transforms module) is neither dropped nor ignored: the
    moving volume is sent as displayed through it, and the result transform goes above it."""
    import vtk

    prealign = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual prealignment")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # 10 mm towards R ("to parent")
    prealign.SetMatrixTransformToParent(matrix)
    pair_nodes.moving.SetAndObserveTransformNodeID(prealign.GetID())
    pair_nodes.moving_markups.SetAndObserveTransformNodeID(prealign.GetID())
    fake = FakeCommandLine()
    result = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=fake,
                                  fixed_landmarks=pair_nodes.fixed_markups, moving_landmarks=pair_nodes.moving_markups,
                                  workdir=tmp_path / "w").wait(timeout=30, interval=0.001)
    stored = glue.volume_node_to_image(pair_nodes.moving)
    sent = sitk.ReadImage(fake.inputs["moving"])
    np.testing.assert_allclose(sent.GetOrigin(), np.asarray(stored.GetOrigin()) + [-10.0, 0.0, 0.0], atol=1e-6)  # LPS
    sent_points, _ = io.read_landmarks(fake.inputs["moving_landmarks"])
    np.testing.assert_allclose(sent_points, pair_nodes.points + SHIFT + [-10.0, 0.0, 0.0], atol=1e-6)
    assert pair_nodes.moving.GetParentTransformNode() is prealign  # kept
    assert prealign.GetParentTransformNode() is result.transform  # the result on top of it
    # a second run with the same output transform re-registers from the pre-alignment, not from the result
    again = FakeCommandLine()
    glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=again,
                         nodes=glue.OutputNodes(transform=result.transform), workdir=tmp_path / "w2").wait(
        timeout=30, interval=0.001)
    np.testing.assert_allclose(sitk.ReadImage(again.inputs["moving"]).GetOrigin(), sent.GetOrigin(), atol=1e-6)
    assert prealign.GetParentTransformNode() is result.transform
    # ... and so does one that creates a new output transform: the earlier result (tagged with this moving
    # volume) is replaced, not treated as part of the pre-alignment
    third = FakeCommandLine()
    newer = glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=third,
                                 workdir=tmp_path / "w3").wait(timeout=30, interval=0.001)
    np.testing.assert_allclose(sitk.ReadImage(third.inputs["moving"]).GetOrigin(), sent.GetOrigin(), atol=1e-6)
    assert newer.transform is not result.transform and prealign.GetParentTransformNode() is newer.transform


def test_a_non_linear_transform_on_the_moving_volume_is_refused_with_a_reason(scene, pair_nodes, tmp_path):
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "a warp")
    image = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    glue.displacement_to_transform_node(image, scene, node=grid)
    pair_nodes.moving.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform 'a warp'; harden it"):
        glue.RegistrationJob(scene, pair_nodes.fixed, pair_nodes.moving, start_process=FakeCommandLine(),
                             workdir=tmp_path / "w").start()


def test_both_batch_faces_read_the_same_pair_list_with_masks(scene, tmp_path, capsys):
    """One reader (DeepSalRegLib.pairs) behind `deepsalreg batch` and the Slicer batch script: the mask
    columns reach the registration in both."""
    from DeepSalRegLib import cli
    from DeepSalRegLib.cli import commands

    batch = _load_batch_script()
    fixed_image, moving_image = phantom_pair()
    sitk.WriteImage(fixed_image, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(moving_image, str(tmp_path / "moving.nrrd"))
    mask = sitk.Cast(fixed_image > float(np.median(sitk.GetArrayFromImage(fixed_image))), sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_mask\nfixed.nrrd,moving.nrrd,mask.nrrd\n")
    seen = []

    def register(fixed, moving, **kwargs):
        seen.append(kwargs)
        return known_result(fixed, moving)

    assert batch.main([str(tmp_path / "pairs.csv"), str(tmp_path / "slicer_out")], scene=scene, register=register) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seen[0]["fixed_mask"]), sitk.GetArrayFromImage(mask))
    assert (tmp_path / "slicer_out" / "001_moving" / "transform.h5").is_file()
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # cleaned up with the pair
    calls = []
    real = commands._register_one

    def spy(args, fixed, moving, outdir, fixed_landmarks=None, moving_landmarks=None, fixed_mask=None, *rest, **kw):
        calls.append(dict(fixed_mask=fixed_mask, name=Path(outdir).name))
        return real(args, fixed, moving, outdir, fixed_landmarks, moving_landmarks, fixed_mask, *rest, **kw)

    import unittest.mock

    with unittest.mock.patch.object(commands, "_register_one", spy):
        code = cli.main(["batch", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "cli_out"), "--model", "none",
                         "--iterations", "2", "-q", "--no-report"])
    assert code == 0 and calls == [dict(fixed_mask=str(tmp_path / "mask.nrrd"), name="001_moving")]
