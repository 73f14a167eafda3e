"""Running the library on nodes: in this process, or as a child process (the command line) with progress
lines and cancel; the options both take.

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import SimpleITK as sitk

from ..errors import DeviceError, InputError, ModelError, OutputError
from ..quality import DEFAULT_QUALITY, preset
from .coordinates import _numpy_matrix
from .landmarks import _in_frame, _landmark_inputs
from .results import OutputNodes, ResultNodes, import_outputs, outputs_from_folder, outputs_from_result
from .transforms import own_linear_transforms
from .volumes import volume_node_to_image


@dataclass
class RegistrationOptions:
    """What the library is asked to do (mirrors ``register()`` and ``deepsalreg register``)."""

    model: str = "default"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    quality: str = DEFAULT_QUALITY  # quality.PRESETS: the refinement stops by itself when converged
    iterations: int | None = None  # expert: a fixed refinement step count instead (0 = none)
    affine: bool = True  # affine pre-alignment before the network
    time_budget: float | None = None  # seconds: the refinement ends early to finish about then

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        self.quality = preset(self.quality).name
        if self.iterations is not None:
            if int(self.iterations) < 0:
                raise InputError(f"iterations must be >= 0, got {self.iterations}")
            self.iterations = int(self.iterations)
        if self.time_budget is not None:
            if not float(self.time_budget) > 0:
                raise InputError(f"the time budget must be a positive number of seconds, got {self.time_budget}")
            self.time_budget = float(self.time_budget)
        self.affine = bool(self.affine)


def _moving_inputs(fixed, moving, fixed_landmarks, moving_landmarks, output=None):
    """``(fixed_image, moving_image, fixed_points, moving_points, labels)`` as registered: the moving volume
    and its landmarks through the moving volume's own linear transforms (``own_linear_transforms``)."""
    import vtk

    fixed_image = volume_node_to_image(fixed)
    dimension = fixed_image.GetDimension()
    chain, matrix = own_linear_transforms(moving, fixed, output)
    moving_image = volume_node_to_image(moving, dimension=dimension, to_frame=matrix if chain else None)
    fixed_points, moving_points, labels = _landmark_inputs(fixed_landmarks, moving_landmarks, dimension)
    if chain and moving_points is not None:
        to_frame = vtk.vtkMatrix4x4()
        if not type(chain[0]).GetMatrixTransformBetweenNodes(moving_landmarks.GetParentTransformNode(),
                                                            chain[-1].GetParentTransformNode(), to_frame):
            raise InputError("the moving landmarks are under a non-linear transform; harden it first")
        moving_points = _in_frame(moving_points, _numpy_matrix(to_frame))
    return fixed_image, moving_image, fixed_points, moving_points, labels


def _mask_image(node, dimension: int, name: str):
    """A mask volume node (label map or scalar volume; nonzero = use) as a SimpleITK image, or None."""
    if node is None:
        return None
    image = volume_node_to_image(node, dimension=dimension)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {name} {node.GetName()!r} has several components; use a label map")
    return sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8)


def register_nodes(scene, fixed, moving, options: RegistrationOptions | None = None, nodes: OutputNodes | None = None,
                   fixed_landmarks=None, moving_landmarks=None, register: Callable | None = None,
                   progress: Callable[[float, str], None] | None = None, show: bool = True,
                   fixed_mask=None, moving_mask=None) -> ResultNodes:
    """Register two volume nodes in this process (batch, PythonSlicer) and import the results.

    Args:
        fixed_mask, moving_mask: optional label map (or scalar volume) nodes: the similarity counts only where
            they are nonzero (e.g. leave out a tumour or resection cavity); on their own grids.
        register: the library call (default ``DeepSalRegLib.register``); tests pass a stand-in.
        progress: ``progress(fraction, message)``, passed on to the library.
    """
    options = options or RegistrationOptions()
    fixed_image, moving_image, fixed_points, moving_points, labels = _moving_inputs(
        fixed, moving, fixed_landmarks, moving_landmarks, (nodes or OutputNodes()).transform)
    if register is None:
        from .. import register
    masks = {}
    if fixed_mask is not None:
        masks["fixed_mask"] = _mask_image(fixed_mask, fixed_image.GetDimension(), "fixed mask")
    if moving_mask is not None:
        masks["moving_mask"] = _mask_image(moving_mask, fixed_image.GetDimension(), "moving mask")
    result = register(fixed_image, moving_image, model=options.model, device=options.device, **masks,
                      iterations=options.iterations, quality=options.quality, time_budget=options.time_budget,
                      affine=options.affine, fixed_landmarks=fixed_points,
                      moving_landmarks=moving_points, progress=progress)
    return import_outputs(scene, outputs_from_result(result), fixed, moving, nodes, moving_landmarks, labels, show)


_PROGRESS_LINE = re.compile(r"^PROGRESS\s+([0-9]+(?:\.[0-9]*)?)\s*(.*)$")


def parse_progress_line(line: str) -> tuple[float, str] | None:
    """``(fraction 0..1, message)`` of a ``PROGRESS <0-100> <message>`` line, else ``None``."""
    match = _PROGRESS_LINE.match(line.strip())
    if match is None:
        return None
    return min(max(float(match.group(1)) / 100.0, 0.0), 1.0), match.group(2).strip()


def cli_arguments(fixed_path, moving_path, output_folder, options: RegistrationOptions,
                  fixed_landmarks_path=None, moving_landmarks_path=None, report: bool = False,
                  fixed_mask_path=None, moving_mask_path=None) -> list[str]:
    """Arguments of ``deepsalreg register`` (after the program) for one pair, with progress lines on.

    ``report=False`` skips ``report.png``: Slicer shows the results itself.
    """
    args = ["register", str(fixed_path), str(moving_path), "-o", str(output_folder),
            "--model", options.model, "--device", options.device, "--quality", options.quality, "--progress-lines"]
    if options.iterations is not None:
        args += ["--iterations", str(options.iterations)]
    if options.time_budget is not None:
        args += ["--time-budget", repr(options.time_budget)]
    if not options.affine:
        args.append("--no-affine")
    if not report:
        args.append("--no-report")
    if fixed_landmarks_path is not None and moving_landmarks_path is not None:
        args += ["--fixed-landmarks", str(fixed_landmarks_path), "--moving-landmarks", str(moving_landmarks_path)]
    if fixed_mask_path is not None:
        args += ["--fixed-mask", str(fixed_mask_path)]
    if moving_mask_path is not None:
        args += ["--moving-mask", str(moving_mask_path)]
    return args


_EXIT_ERRORS = {2: InputError, 3: ModelError, 4: DeviceError, 5: OutputError}


def error_for_exit_code(code: int, output_lines: Sequence[str]) -> Exception:
    """The exception that a command-line exit code stands for, carrying the process's last words."""
    lines = [line for line in output_lines if line.strip()]
    if code in _EXIT_ERRORS:
        message = lines[-1].strip() if lines else f"exit code {code}"
        # "deepsalreg: error: <what>" (or argparse's "usage ... error: <what>") -> "<what>"
        message = re.sub(r"^[\w .:-]*?\berror:\s*", "", message, count=1, flags=re.I) or message
        return _EXIT_ERRORS[code](message)
    if code < 0:
        return RuntimeError(f"the registration process was stopped by signal {-code}")
    tail = "\n".join(lines[-20:])
    return RuntimeError(f"the registration process failed (exit code {code}):\n{tail}")


class Process(Protocol):
    """What ``RegistrationJob`` needs from a started process (``ChildProcess``, or a fake in tests)."""

    def read_lines(self) -> list[str]: ...

    def poll(self) -> int | None: ...

    def cancel(self) -> None: ...


class ChildProcess:
    """A command running in the background; a reader thread collects its output lines for ``read_lines``.

    stderr is merged into stdout. Undecodable bytes are replaced (Slicer users run non-UTF-8 locales).
    ``cancel`` kills the whole process tree: PythonSlicer is a launcher that starts the real interpreter as
    its own child, so killing only the launcher would leave the work running.
    """

    def __init__(self, args: Sequence[str], env: dict | None = None, cwd=None):
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                      cwd=None if cwd is None else str(cwd), text=True, encoding="utf-8", errors="replace", bufsize=1)
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group, so cancel reaches grandchildren
        self.args = [str(a) for a in args]
        self._popen = subprocess.Popen(self.args, **kwargs)
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="DeepSalReg output reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _read(self) -> None:
        with self._popen.stdout as stream:
            for line in stream:
                self._lines.put(line.rstrip("\r\n"))

    def read_lines(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def poll(self) -> int | None:
        """The exit code once the process has ended and all its output has been read, else ``None``."""
        if self._reader.is_alive():
            return None
        return self._popen.wait()

    def cancel(self) -> None:
        if self._popen.poll() is not None and not self._reader.is_alive():
            return
        try:
            import psutil  # shipped with Slicer; optional elsewhere

            parent = psutil.Process(self._popen.pid)
            for child in parent.children(recursive=True):
                child.kill()
            parent.kill()
        except ImportError:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._popen.pid)], capture_output=True,
                               creationflags=subprocess.CREATE_NO_WINDOW)
            else:
                try:
                    os.killpg(self._popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except Exception:  # psutil.NoSuchProcess: it ended meanwhile
            pass
        if os.name != "nt":
            try:  # grandchildren that psutil missed (double fork) share the process group
                os.killpg(self._popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def library_parent_folder() -> Path:
    """The folder that holds the ``DeepSalRegLib`` package (put on the child's ``PYTHONPATH``)."""
    return Path(__file__).resolve().parents[2]  # DeepSalRegLib/slicer_glue/running.py


class RegistrationJob:
    """One registration of two volume nodes by the command line in a child process, polled by the caller.

    ``start()`` writes the inputs (volumes with their geometry, landmarks as CSV) into ``workdir`` and
    launches ``python -m DeepSalRegLib.cli register ... --progress-lines``; ``poll()`` (call it from a timer
    in the GUI thread) forwards progress and, at the end, imports the results into the scene; ``wait()``
    polls until done (console and scripts); ``cancel()`` kills the process tree.

    States: ``"ready"``, ``"running"``, ``"succeeded"``, ``"failed"`` (see ``error``), ``"cancelled"``.

    Args:
        scene, fixed, moving: the MRML scene and the two volume nodes.
        options: model, device and iterations.
        nodes: nodes to fill with the results (``None`` members are created).
        fixed_landmarks, moving_landmarks: optional markups nodes (both or neither).
        fixed_mask, moving_mask: optional label map nodes: the similarity counts only where they are nonzero.
        python: interpreter for the child (in Slicer: the ``PythonSlicer`` launcher).
        env: environment of the child (default: this process's); ``DeepSalRegLib``'s folder is prepended
            to ``PYTHONPATH`` and, for ``device="cpu"``, CUDA is hidden.
        command: the program to run instead of ``[python, "-m", "DeepSalRegLib.cli"]`` (tests).
        start_process: ``start_process(args, env, cwd) -> Process`` (default ``ChildProcess``; tests inject fakes).
        workdir: folder for inputs and outputs, kept afterwards (default: a new temporary folder inside
            ``temp_root``, removed when the job ends).
        temp_root: where the temporary folder is made (default: the system's temporary folder).
        on_progress: ``on_progress(fraction, message)``.
        on_log: ``on_log(line)`` for every other output line.
        show: set up the views when the results arrive.
    """

    def __init__(self, scene, fixed, moving, options: RegistrationOptions | None = None, nodes: OutputNodes | None = None,
                 fixed_landmarks=None, moving_landmarks=None, python: str | None = None, env: dict | None = None,
                 command: Sequence[str] | None = None, start_process: Callable[..., Process] | None = None,
                 workdir=None, temp_root=None, on_progress: Callable[[float, str], None] | None = None,
                 on_log: Callable[[str], None] | None = None, show: bool = True, fixed_mask=None, moving_mask=None):
        if fixed is None or moving is None:
            raise InputError("select a fixed and a moving volume")
        self.scene, self.fixed, self.moving = scene, fixed, moving
        self.options = options or RegistrationOptions()
        self.nodes = nodes or OutputNodes()
        self.fixed_landmarks, self.moving_landmarks = fixed_landmarks, moving_landmarks
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.command = list(command) if command else [python or sys.executable, "-m", "DeepSalRegLib.cli"]
        self.env = dict(os.environ if env is None else env)
        self.start_process = start_process or ChildProcess
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.temp_root = temp_root
        self.on_progress, self.on_log, self.show = on_progress, on_log, show
        self.state = "ready"
        self.error: Exception | None = None
        self.result: ResultNodes | None = None
        self.progress = 0.0
        self.message = ""
        self.output_lines: collections.deque[str] = collections.deque(maxlen=200)
        self.started_at = self.finished_at = None
        self._process: Process | None = None
        self._labels = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @property
    def output_folder(self) -> Path:
        return self.workdir / "output"

    def _child_environment(self) -> dict:
        env = dict(self.env)
        library_folder = str(library_parent_folder())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_folder, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if self.options.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def write_inputs(self) -> list[str]:
        """Write the inputs into ``workdir/input`` and return the command-line arguments that use them."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="DeepSalReg-", dir=self.temp_root))
        inputs = self.workdir / "input"
        inputs.mkdir(parents=True, exist_ok=True)
        fixed_image, moving_image, fixed_points, moving_points, self._labels = _moving_inputs(
            self.fixed, self.moving, self.fixed_landmarks, self.moving_landmarks, self.nodes.transform)
        dimension = fixed_image.GetDimension()
        sitk.WriteImage(fixed_image, str(inputs / "fixed.nrrd"))
        sitk.WriteImage(moving_image, str(inputs / "moving.nrrd"))
        landmark_paths = (None, None)
        if fixed_points is not None:
            from ..io import write_landmarks

            landmark_paths = (inputs / "fixed_landmarks.csv", inputs / "moving_landmarks.csv")
            write_landmarks(fixed_points, landmark_paths[0], self._labels)
            write_landmarks(moving_points, landmark_paths[1], self._labels)
        mask_paths = []
        for node, name in ((self.fixed_mask, "fixed_mask"), (self.moving_mask, "moving_mask")):
            mask = _mask_image(node, dimension, name.replace("_", " "))
            if mask is not None:
                sitk.WriteImage(mask, str(inputs / f"{name}.nrrd"), True)
            mask_paths.append(None if mask is None else inputs / f"{name}.nrrd")
        return cli_arguments(inputs / "fixed.nrrd", inputs / "moving.nrrd", self.output_folder, self.options,
                             *landmark_paths, fixed_mask_path=mask_paths[0], moving_mask_path=mask_paths[1])

    def start(self) -> "RegistrationJob":
        if self.state != "ready":
            raise RuntimeError(f"this job was already started (state {self.state})")
        try:
            args = self.write_inputs()
            self.started_at = time.monotonic()
            self._process = self.start_process(self.command + args, env=self._child_environment(),
                                               cwd=library_parent_folder())
        except Exception as error:
            self._finish("failed", error)
            raise
        self.state = "running"
        self._report(0.0, "started")
        return self

    def _report(self, fraction: float, message: str) -> None:
        self.progress, self.message = fraction, message
        if self.on_progress is not None:
            self.on_progress(fraction, message)

    def poll(self) -> bool:
        """Forward new output; at the end import the results. Returns ``True`` once the job has finished."""
        if self.state != "running":
            return self.finished
        for line in self._process.read_lines():
            progress = parse_progress_line(line)
            if progress is not None:
                self._report(*progress)
                continue
            self.output_lines.append(line)
            if self.on_log is not None:
                self.on_log(line)
        code = self._process.poll()
        if code is None:
            return False
        if code != 0:
            self._finish("failed", error_for_exit_code(code, list(self.output_lines)))
            return True
        try:
            outputs = outputs_from_folder(self.output_folder)
            self.result = import_outputs(self.scene, outputs, self.fixed, self.moving, self.nodes,
                                         self.moving_landmarks, self._labels, self.show)
        except Exception as error:  # results missing or unreadable: report, do not leave the job running
            self._finish("failed", error)
            return True
        self._report(1.0, "done")
        self._finish("succeeded", None)
        return True

    def wait(self, timeout: float | None = None, idle: Callable[[], None] | None = None,
             interval: float = 0.05) -> ResultNodes:
        """Poll until the job ends; ``idle()`` runs between polls (e.g. ``slicer.app.processEvents``).

        Returns the result nodes, or raises the job's error (``DeepSalRegError`` for user errors).
        """
        if self.state == "ready":
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"registration did not finish within {timeout} s")
            if idle is not None:
                idle()
            time.sleep(interval)
        if self.state == "cancelled":
            raise RuntimeError("registration was cancelled")
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        if self.state == "running":
            self._process.cancel()
            self._finish("cancelled", None)
            self._report(self.progress, "cancelled")

    def _finish(self, state: str, error: Exception | None) -> None:
        self.state, self.error = state, error
        self.finished_at = time.monotonic()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def seconds(self) -> float | None:
        """Wall time of the run so far (or in total, once finished)."""
        if self.started_at is None:
            return None
        return (self.finished_at or time.monotonic()) - self.started_at
