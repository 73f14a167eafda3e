"""The deepsalreg command line as a user runs it: results, exit codes, one-line errors, untouched inputs."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSalRegLib import batch, cli, models
from DeepSalRegLib.cli import commands
from DeepSalRegLib.networks import build_model, save_checkpoint


def _blob_image(shape, centre_shift=0.0, spacing=None):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    c = [n / 2 + centre_shift for n in shape]
    r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
    arr = 100 * np.exp(-r2 / (2 * (min(shape) / 6) ** 2)) + 30 * (r2 < (min(shape) / 3) ** 2)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    if spacing:
        img.SetSpacing(spacing)
    return img


@pytest.fixture()
def pair2d(tmp_path):
    f, m = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"
    sitk.WriteImage(_blob_image((40, 44)), str(f))
    sitk.WriteImage(_blob_image((40, 44), 2.0), str(m))
    return f, m


def _digest(paths):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_register_writes_every_result_and_keeps_inputs(pair2d, tmp_path, capsys):
    f, m = pair2d
    before = _digest([f, m])
    out = tmp_path / "out"
    code, stdout, _ = _run(["register", f, m, "-o", out, "--model", "none", "--iterations", "20", "-q",
                            "--transform", tmp_path / "t.tfm", "--no-report"], capsys)
    assert code == 0, stdout
    for name in ("transform.h5", "displacement.nrrd", "warped.nrrd", "saliency.nrrd", "jacobian.nrrd", "summary.json"):
        assert (out / name).is_file(), name
    assert (tmp_path / "t.tfm").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["ncc_after"] > summary["metrics"]["ncc_before"]
    assert "similarity (NCC" in stdout and "time:" in stdout
    assert _digest([f, m]) == before
    assert not list(out.glob(".*tmp*"))  # no half-written files left behind
    # the .tfm and the .h5 move points the same way
    a, b = sitk.ReadTransform(str(out / "transform.h5")), sitk.ReadTransform(str(tmp_path / "t.tfm"))
    for p in [(10.0, 12.0), (20.5, 30.2)]:
        assert np.allclose(a.TransformPoint(p), b.TransformPoint(p), atol=1e-6)


def test_warp_command_reproduces_the_warped_image(pair2d, tmp_path, capsys):
    f, m = pair2d
    out = tmp_path / "out"
    assert _run(["register", f, m, "-o", out, "--model", "none", "--iterations", "10", "-q", "--no-report"], capsys)[0] == 0
    code, _, err = _run(["warp", m, out / "transform.h5", "-o", tmp_path / "w.nrrd"], capsys)
    assert code == 0, err
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nrrd")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nrrd")))
    assert np.allclose(ours, theirs, atol=1e-3)
    labels = tmp_path / "labels.nrrd"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(m)) > 50, sitk.sitkUInt8) * 3, str(labels))
    code, _, _ = _run(["warp", labels, out / "displacement.nrrd", "-o", tmp_path / "wl.nrrd", "--labels",
                       "--reference", f], capsys)
    assert code == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "wl.nrrd"))))) <= {0, 3}


def test_errors_found_before_the_work(pair2d, tmp_path, capsys, monkeypatch):
    """Wrong output targets are refused before the registration runs (not after minutes of work)."""
    from DeepSalRegLib import registration

    def never(*args, **kwargs):
        raise AssertionError("the registration ran although its outputs could not be written")

    monkeypatch.setattr(registration, "register", never)
    f, m = pair2d
    (tmp_path / "blocker").write_text("x")
    for extra in (["-o", tmp_path / "blocker"], ["-o", tmp_path / "blocker" / "sub"],
                  ["-o", tmp_path / "ok", "--report", tmp_path / "blocker" / "r.png"],
                  ["-o", tmp_path / "ok", "--transform", f]):
        code, _, err = _run(["register", f, m, "-q", *extra], capsys)
        assert code == 5 and err.startswith("deepsalreg: error:"), err


def test_results_folder_is_written_as_a_whole_with_its_provenance(pair2d, tmp_path, capsys, monkeypatch):
    f, m = pair2d
    out = tmp_path / "out"
    args = ["register", f, m, "-o", out, "--model", "none", "--iterations", "3", "-q", "--no-report"]
    assert _run(args, capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    prov = summary["provenance"]
    assert prov["inputs"]["fixed"]["sha256"] == _digest([f])[f]
    assert prov["inputs"]["moving"]["path"] == str(Path(m).resolve())
    assert prov["options"]["iterations"] == 3 and prov["options"]["model"] == "none"
    assert prov["command"] == ["deepsalreg", *[str(a) for a in args]]
    assert {"deepsalreg", "torch", "simpleitk", "numpy", "python"} <= set(prov["versions"])
    for name, digest in summary["outputs"].items():  # a folder mixing two runs is detectable
        assert _digest([out / name])[out / name] == digest, name
    (out / "keep.txt").write_text("the user's own file")
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    # a run that dies while writing leaves the earlier result complete (and nothing half-written)
    from DeepSalRegLib import io

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_image", dies)
    code, _, err = _run(args, capsys)
    assert code == cli.EXIT_INTERRUPTED, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert not list(out.glob(".deepsalreg-partial-*"))


def test_batch_reports_and_skips_a_failed_pair(pair2d, tmp_path, capsys):
    f, m = pair2d
    pairs = tmp_path / "pairs.csv"
    (tmp_path / "f.csv").write_text("x,y\n1,2\n")
    (tmp_path / "bad.fcsv").write_text("# columns = id,x,y\n1,2\n")
    pairs.write_text(f"fixed,moving,fixed_landmarks,moving_landmarks\n{f.name},{m.name},,\n{f.name},missing.nrrd,,\n"
                     f"{f.name},{m.name},f.csv,bad.fcsv\n{f.name},{m.name},,\n")
    code, stdout, err = _run(["batch", pairs, "-o", tmp_path / "b", "--model", "none", "--iterations", "5", "-q",
                              "--no-report"], capsys)
    assert code == batch.EXIT_BATCH_FAILURES == 6
    assert "FAILED" in err and "missing.nrrd" in err and "Traceback" not in err
    rows = (tmp_path / "b" / "summary.csv").read_text().splitlines()
    # a malformed landmark file fails its own pair only; the pairs after it still run
    assert len(rows) == 5 and '"ok"' in rows[1] and '"failed"' in rows[2] and '"failed"' in rows[3]
    assert '"ok"' in rows[4] and "bad.fcsv" in rows[3]


def test_batch_summary_is_written_after_every_pair(pair2d, tmp_path, capsys, monkeypatch):
    """A batch stopped half-way (or hit by an internal error) still has a summary of what it did."""
    f, m = pair2d
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving,name\n{f.name},{m.name},one\n{f.name},{m.name},two\n{f.name},{m.name},three\n")
    real = commands._register_one
    calls = []

    def flaky(args, fixed, moving, outdir, *rest, **kwargs):
        calls.append(outdir.name)
        if outdir.name == "two":
            raise ZeroDivisionError("a bug")
        if outdir.name == "three":
            rows = (tmp_path / "b" / "summary.csv").read_text().splitlines()
            assert len(rows) == 3  # written after pairs one and two, before three ends
            raise KeyboardInterrupt
        return real(args, fixed, moving, outdir, *rest, **kwargs)

    monkeypatch.setattr(commands, "_register_one", flaky)
    code, _, err = _run(["batch", pairs, "-o", tmp_path / "b", "--model", "none", "--iterations", "3", "-q",
                         "--no-report"], capsys)
    assert code == cli.EXIT_INTERRUPTED and calls == ["one", "two", "three"]
    rows = (tmp_path / "b" / "summary.csv").read_text().splitlines()
    assert '"ok"' in rows[1] and "internal error: ZeroDivisionError" in rows[2]


def test_progress_lines_for_programs(pair2d, tmp_path, capsys):
    f, m = pair2d
    code, stdout, _ = _run(["register", f, m, "-o", tmp_path / "o", "--model", "none", "--iterations", "10",
                            "--progress-lines", "--no-report"], capsys)
    lines = [l for l in stdout.splitlines() if l.startswith("PROGRESS ")]
    values = [int(l.split()[1]) for l in lines]
    assert code == 0 and values[0] == 0 and values[-1] == 100 and values == sorted(values)


def _write(tmp_path, name, image):
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("case,expected_code,message", [
    ("missing", 2, "does not exist"),
    ("4d", 2, "4D"),
    ("constant", 2, "constant"),
    ("nan", 2, "NaN"),
    ("2d3d", 2, "2D but the moving image is 3D"),
    ("cuda", 4, "cuda"),
    ("unwritable", 5, ""),
    ("overwrite_input", 5, "input"),
    ("corrupt_model", 3, "cannot read model"),
    ("unknown_model", 3, "unknown model"),
    ("no_memory", 2, "needs about"),
    ("no_overlap", 2, "do not overlap"),
    ("flipped", 2, "overlap"),
    ("truncated_nii", 2, "truncated"),
    ("truncated_niigz", 2, "truncated"),
    ("nan_landmark", 2, "not a finite number"),
    ("bad_fcsv", 2, "not a valid Slicer .fcsv"),
    ("bad_markups", 2, "not a valid Slicer markups"),
    ("output_is_a_file", 5, "is a file"),
    ("report_unwritable", 5, "is a file"),
    ("pickled_module", 3, "not a DeepSalReg model file"),
])
def test_bad_input_gives_one_line_and_exit_code(case, expected_code, message, pair2d, tmp_path, capsys, monkeypatch):
    f, m = pair2d
    out = tmp_path / "out"
    extra = ["--model", "none"]
    if case == "missing":
        m = tmp_path / "nope.nrrd"
    elif case == "4d":
        m = _write(tmp_path, "4d.nrrd", sitk.JoinSeries([sitk.Image([4, 5, 6], sitk.sitkFloat32)] * 3))
    elif case == "constant":
        m = _write(tmp_path, "const.nrrd", sitk.Image([40, 44], sitk.sitkFloat32) + 7)
    elif case == "nan":
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(m)))
        arr[3, 3] = np.nan
        m = _write(tmp_path, "nan.nrrd", sitk.GetImageFromArray(arr))
    elif case == "2d3d":
        m = _write(tmp_path, "vol.nrrd", _blob_image((12, 14, 16)))
    elif case == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra += ["--device", "cuda"]
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"
    elif case == "overwrite_input":
        extra += ["--transform", str(f)]
    elif case == "corrupt_model":
        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"\x00garbage")
        extra = ["--model", str(junk)]
    elif case == "unknown_model":
        extra = ["--model", "resnet-9000"]
    elif case in ("no_overlap", "flipped"):
        image = sitk.ReadImage(str(m))
        if case == "no_overlap":
            image.SetOrigin([o + 1000.0 for o in image.GetOrigin()])  # 1 m away
        else:
            image.SetDirection([-1.0, 0.0, 0.0, -1.0])  # the same voxels, mirrored through the origin
        m = _write(tmp_path, "far.nrrd", image)
    elif case.startswith("truncated"):
        name = "cut.nii" if case == "truncated_nii" else "cut.nii.gz"
        whole = _write(tmp_path, "whole" + name[3:], sitk.ReadImage(str(m)))
        data = whole.read_bytes()
        m = tmp_path / name
        m.write_bytes(data[: len(data) * 2 // 3])
    elif case in ("nan_landmark", "bad_fcsv", "bad_markups"):
        good = tmp_path / "f.csv"
        good.write_text("x,y\n1,2\n3,4\n")
        if case == "nan_landmark":
            bad = tmp_path / "m.csv"
            bad.write_text("x,y\n1,2\nnan,4\n")
        elif case == "bad_fcsv":
            bad = tmp_path / "m.fcsv"
            bad.write_text("# columns = id,x,y\n1,2\n")
        else:
            bad = tmp_path / "m.mrk.json"
            bad.write_text('{"markups": [5]}')
        extra += ["--fixed-landmarks", good, "--moving-landmarks", bad]
    elif case == "output_is_a_file":
        out = tmp_path / "a_file"
        out.write_text("x")
    elif case == "report_unwritable":
        (tmp_path / "blocker").write_text("x")
        extra += ["--report", tmp_path / "blocker" / "r.png"]
    elif case == "pickled_module":
        import torch

        path = tmp_path / "whole_model.pt"
        torch.save(build_model("modern-2d"), path)  # a pickled module, not weights
        extra = ["--model", str(path)]
    elif case == "no_memory":  # the estimate is checked before the work: a pair that cannot fit is refused
        from DeepSalRegLib import memory

        monkeypatch.setattr(memory, "available_bytes", lambda: 1e8)
    before = _digest([p for p in (f,) if Path(p).exists()])
    code, _, err = _run(["register", f, m, "-o", out, "--iterations", "2", "-q", "--no-report", *extra], capsys)
    assert code == expected_code, err
    lines = [l for l in err.strip().splitlines() if not l.startswith("deepsalreg: warning")]
    assert len(lines) == 1 and lines[0].startswith("deepsalreg: error:"), err
    assert message.lower() in lines[0].lower()
    assert "Traceback" not in err
    assert "weights_only=False" not in err  # never advise loading a file with arbitrary code
    assert _digest([f]) == before
    if case not in ("output_is_a_file",):
        assert not (out / "transform.h5").exists()  # refused before anything was written


def test_shipped_weights_are_verified(tmp_path, monkeypatch, pair2d, capsys):
    """A registry entry whose file does not match its sha256 is refused (exit 3), not loaded."""
    weights = save_checkpoint(tmp_path / "m.pt", build_model("modern-2d"))
    (tmp_path / "registry.json").write_text(json.dumps(
        {"default-2d": {"file": "m.pt", "sha256": "0" * 64, "ndim": 2}}))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(models, "REGISTRY_FILE", tmp_path / "registry.json")
    f, m = pair2d
    code, _, err = _run(["register", f, m, "-o", tmp_path / "o", "-q", "--no-report"], capsys)
    assert code == 3 and "sha256" in err
    # with the right checksum the same file is used
    from DeepSalRegLib.networks import file_sha256

    (tmp_path / "registry.json").write_text(json.dumps(
        {"default-2d": {"file": "m.pt", "sha256": file_sha256(weights), "ndim": 2}}))
    code, stdout, err = _run(["register", f, m, "-o", tmp_path / "o", "-q", "--no-report"], capsys)
    assert code == 0 and "default-2d" in stdout


def test_large_volume_is_downsampled_with_a_warning(tmp_path, capsys):
    f = _write(tmp_path, "f.nrrd", _blob_image((40, 40, 40)))
    m = _write(tmp_path, "m.nrrd", _blob_image((40, 40, 40), 1.5))
    code, stdout, err = _run(["register", f, m, "-o", tmp_path / "o", "--model", "none", "--iterations", "4",
                              "--max-voxels", str(16 ** 3), "-q", "--no-report"], capsys)
    assert code == 0, err
    assert "warning" in err and "coarser" not in err.lower() or "grid" in err
    assert sitk.ReadImage(str(tmp_path / "o" / "warped.nrrd")).GetSize() == (40, 40, 40)


def test_console_script_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "DeepSalRegLib.cli", "register", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "examples:" in out and "--iterations" in out and "exit codes" in out


def test_the_refinement_line_says_which_levels_were_not_kept():
    from DeepSalRegLib.cli.output import _refinement_line

    line = _refinement_line({"refinement": dict(quality="balanced", levels=[8, 4, 2, 1], steps=[40, 12, 15, 20],
                                                kept=[False, True, True, True])})
    assert line == "refinement (quality balanced): 87 steps (1/8: 40 not kept, 1/4: 12, 1/2: 15, 1/1: 20)"
    # summaries written before the check existed have no 'kept': every level counts as kept
    assert "not kept" not in _refinement_line({"refinement": dict(quality=None, levels=[2, 1], steps=[5, 5])})
