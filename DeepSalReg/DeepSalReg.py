"""DeepSalReg: deformable registration with a joint saliency map, as a 3D Slicer module.

The module is a thin face on ``DeepSalRegLib``: the panel (``DeepSalRegWidget``), the Python console and
batch scripts all call ``DeepSalRegLogic``, which hands the work to the library through
``DeepSalRegLib.slicer_glue`` (nodes <-> images, transforms, landmarks, display). The registration runs in
a child process (PythonSlicer running ``python -m DeepSalRegLib.cli register ...``) so Slicer stays
responsive and the run can be cancelled; ``inProcess=True`` runs it inside Slicer (batch, debugging).

At file scope this module imports only the standard library, vtk, qt and slicer: torch and the library
are imported when a registration starts, and nothing is installed or downloaded before the user asks.

Console use (see the README for more)::

    logic = slicer.util.getModuleLogic("DeepSalReg")
    result = logic.process(getNode("MRBrainTumor1"), getNode("MRBrainTumor2"), device="cpu")
    result.transform, result.saliency, result.jacobian, result.mean_tre
"""
import enum
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: torch comes through the PyTorch extension (PyTorchUtils), never plain pip.
TORCH_REQUIREMENT = ">=2.1"
#: Other packages the registrations run from Slicer need that Slicer does not bundle; installed with the
#: user's consent. None: the child process runs ``deepsalreg register --no-report --progress-lines``, which
#: needs neither matplotlib (report.png) nor tqdm (the progress bar). numpy and SimpleITK are Slicer's own
#: and must never be reinstalled.
PIP_REQUIREMENTS = ()


#
# DeepSalReg
#


class DeepSalReg(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and Help section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepSalReg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepSalReg developers"]
        self.parent.helpText = _(
            "Unsupervised deep deformable registration (2D/3D) guided by a joint saliency map. "
            "Pick a fixed and a moving volume and press Apply: an affine pre-alignment, the networks and a "
            "test-time refinement that stops when converged (Quality: fast, balanced, accurate) compute a "
            "deformable transform, applied "
            "to the moving volume (on top of a linear pre-alignment it already has), shown as a grid in the "
            "slice views, with the alignment confidence as a colour overlay (dark: not driven by the images, "
            "e.g. structure in one image only), the Jacobian determinant and, when landmarks are given, a table "
            "of target registration errors. Optional fixed/moving masks leave regions out of the alignment. "
            "The registration runs in a separate process and can be cancelled. "
            'See the <a href="https://github.com/deepsalreg/SlicerDeepSalReg#3d-slicer">documentation</a> '
            "for console and batch use."
        )
        self.parent.acknowledgementText = _(
            "DeepSalReg is developed as open source (Apache 2.0). It uses PyTorch (through the PyTorch "
            "extension), SimpleITK and 3D Slicer."
        )


#
# DeepSalRegParameterNode
#


class Device(enum.Enum):
    """Where the network runs; the value is what the library's ``--device`` takes."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self):
        return {Device.AUTO: _("Automatic (GPU if available)"), Device.CPU: _("CPU"), Device.GPU: _("GPU (CUDA)")}[self]


class Quality(enum.Enum):
    """How long the refinement after the network runs; the value is what the library's ``--quality`` takes
    (``DeepSalRegLib/quality.py``). ``FIXED`` uses the expert's fixed step count (``iterations``) instead."""

    FAST = "fast"
    BALANCED = "balanced"
    ACCURATE = "accurate"
    FIXED = "fixed"

    def label(self):
        return {Quality.FAST: _("Fast"), Quality.BALANCED: _("Balanced (default)"), Quality.ACCURATE: _("Accurate"),
                Quality.FIXED: _("Fixed step count")}[self]


@parameterNodeWrapper
class DeepSalRegParameterNode:
    """What the panel shows, kept in the scene so that a saved scene restores it.

    fixedVolume, movingVolume - the pair to register (results live on the fixed grid).
    fixedLandmarks, movingLandmarks - optional corresponding point lists, for the TRE table.
    fixedMask, movingMask - optional label maps: the alignment is measured only where they are nonzero
        (leave out a tumour, a resection cavity, contrast agent: structure the other image does not have).
    model - a shipped model name or the path of a model file in the models folder.
    device - auto, CPU or GPU.
    quality - how long the refinement after the network runs (it stops by itself when converged), or FIXED.
    iterations - with quality FIXED: exactly this many refinement steps (0: affine pre-alignment and network only).
    affine - affine pre-alignment before the network.
    outputTransform, warpedVolume, saliencyVolume, jacobianVolume, treTable - outputs (empty: created).
    runInProcess - run inside Slicer's process (blocks the GUI; for debugging).
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    fixedMask: vtkMRMLLabelMapVolumeNode
    movingMask: vtkMRMLLabelMapVolumeNode
    model: str = "default"
    device: Device = Device.AUTO
    quality: Quality = Quality.BALANCED
    iterations: Annotated[int, WithinRange(0, 1000)] = 0
    affine: bool = True
    outputTransform: vtkMRMLTransformNode
    warpedVolume: vtkMRMLScalarVolumeNode
    saliencyVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    treTable: vtkMRMLTableNode
    runInProcess: bool = False


#
# DeepSalRegWidget
#


class DeepSalRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, settings, outputs, Apply/Cancel, a progress bar and a status line."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._inProcessRunning = False  # a registration running in Slicer's process (Apply disabled)
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSalReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSalRegLogic()

        # The child process is polled from the GUI thread, so results are imported where MRML expects them.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChosen)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.clearModelsFolderButton.connect("clicked(bool)", self.onClearModelsFolder)
        self.ui.progressBar.setVisible(False)
        self.ui.modelsFolderLabel.text = str(self.logic.modelsFolder())

        self.initializeParameterNode()
        self._refreshModelList()

    def cleanup(self) -> None:
        if self._job is not None and not self._job.finished:
            self._job.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._refreshModelList()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and not self._job.finished:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            if volumes:
                self._parameterNode.fixedVolume = volumes[0]
                if len(volumes) > 1 and not self._parameterNode.movingVolume:
                    self._parameterNode.movingVolume = volumes[1]

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _running(self) -> bool:
        return self._inProcessRunning or (self._job is not None and not self._job.finished)

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        # the step count is the expert's alternative to the quality's convergence stop
        self.ui.iterationsSpinBox.enabled = bool(p) and p.quality == Quality.FIXED
        if self._running():
            self.ui.applyButton.enabled = False
            return
        if p and p.fixedVolume and p.movingVolume:
            self.ui.applyButton.toolTip = _("Register the moving volume to the fixed volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select a fixed and a moving volume.")
            self.ui.applyButton.enabled = False

    # --- models ---

    def _refreshModelList(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for label, value in self.logic.availableModels():
            combo.addItem(label, value)
        current = self._parameterNode.model if self._parameterNode else "default"
        index = combo.findData(current)
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(wasBlocked)
        if self._parameterNode and index < 0:
            self._parameterNode.model = combo.itemData(0)

    def _onModelChosen(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        if not slicer.util.confirmOkCancelDisplay(
            _("Delete all model files in {folder}? Shipped models are not affected.").format(folder=folder)
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to clear the models folder."), waitCursor=True):
            removed = self.logic.clearModelsFolder()
            self._refreshModelList()
            self.ui.statusLabel.text = _("Removed {count} file(s) from the models folder.").format(count=removed)

    # --- running ---

    def _processArguments(self) -> dict:
        p = self._parameterNode
        return dict(
            fixedVolume=p.fixedVolume,
            movingVolume=p.movingVolume,
            outputTransform=p.outputTransform,
            fixedLandmarks=p.fixedLandmarks,
            movingLandmarks=p.movingLandmarks,
            fixedMask=p.fixedMask,
            movingMask=p.movingMask,
            model=p.model or "default",
            device=p.device.value,
            quality=p.quality.value if p.quality != Quality.FIXED else "balanced",
            iterations=p.iterations if p.quality == Quality.FIXED else None,
            affine=p.affine,
            warpedVolume=p.warpedVolume,
            saliencyVolume=p.saliencyVolume,
            jacobianVolume=p.jacobianVolume,
            treTable=p.treTable,
        )

    def _setRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.value = 0
        self._checkCanApply()

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onApplyButton(self) -> None:
        if self._running():  # a click queued while a registration runs
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            self.logic.installDependencies(askConfirmation=True)
            arguments = self._processArguments()
            if self._parameterNode.runInProcess:
                self.ui.progressBar.setVisible(True)

                def progress(fraction, message):
                    self._onProgress(fraction, message)
                    slicer.app.processEvents()

                # the progress callback pumps events: a second click must not start a registration inside this one
                self._inProcessRunning = True
                self._checkCanApply()
                try:
                    result = self.logic.process(**arguments, inProcess=True, progressCallback=progress)
                finally:
                    self._inProcessRunning = False
                    self.ui.progressBar.setVisible(False)
                    self._checkCanApply()
                self._showResult(result, None)
                return
            self._job = self.logic.startProcess(**arguments, progressCallback=self._onProgress)
            self._setRunning(True)
            self._pollTimer.start()

    def onCancelButton(self) -> None:
        if self._running():
            self._job.cancel()
            self._onPollTimer()

    def _onPollTimer(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        if not job.poll():
            return
        self._pollTimer.stop()
        self._setRunning(False)
        if job.state == "succeeded":
            self._showResult(job.result, job.seconds)
        elif job.state == "cancelled":
            self.ui.statusLabel.text = _("Registration cancelled.")
        else:
            firstLine = (str(job.error).splitlines() or [type(job.error).__name__])[0]
            self.ui.statusLabel.text = _("Registration failed: {error}").format(error=firstLine)
            details = "\n".join(job.output_lines)
            slicer.util.errorDisplay(_("Registration failed:\n{error}").format(error=job.error), detailedText=details)

    def _showResult(self, result, seconds) -> None:
        """Select the created nodes in the output selectors and summarise the run in the status line."""
        p = self._parameterNode
        p.outputTransform = result.transform
        if result.saliency is not None:
            p.saliencyVolume = result.saliency
        if result.jacobian is not None:
            p.jacobianVolume = result.jacobian
        if result.warped is not None:
            p.warpedVolume = result.warped
        if result.tre_table is not None:
            p.treTable = result.tre_table
        slicer.util.resetSliceViews()
        self.ui.statusLabel.text = self.logic.summaryText(result, seconds)


#
# DeepSalRegLogic
#


class DeepSalRegLogic(ScriptedLoadableModuleLogic):
    """Registration of two volume nodes, usable without the panel (console, batch scripts, tests).

    Args:
        startProcess: how the child process is started, ``startProcess(args, env, cwd)`` returning an object
            with ``read_lines()``, ``poll()`` and ``cancel()`` (default: a real child process). Tests inject
            a fake here instead of faking Slicer.
    """

    def __init__(self, startProcess=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.startProcessFunction = startProcess

    def getParameterNode(self):
        return DeepSalRegParameterNode(super().getParameterNode())

    # --- the library ---

    @staticmethod
    def library():
        """The ``DeepSalRegLib.slicer_glue`` module; adds the source tree to ``sys.path`` when needed.

        In an installed extension ``DeepSalRegLib`` sits next to this file in ``qt-scripted-modules``. When the
        module is used from a source checkout (``DeepSalReg/`` added to the module paths), the library is
        the sibling folder of ``DeepSalReg/``, which Slicer does not put on ``sys.path``.
        """
        try:
            import DeepSalRegLib  # noqa: F401
        except ImportError:
            here = Path(__file__).resolve().parent
            for folder in (here, here.parent):
                if (folder / "DeepSalRegLib" / "__init__.py").is_file():
                    if str(folder) not in sys.path:
                        sys.path.insert(0, str(folder))
                    break
        from DeepSalRegLib import slicer_glue

        return slicer_glue

    # --- dependencies and models ---

    @staticmethod
    def torchInstalled() -> bool:
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def installDependencies(self, askConfirmation: bool = True) -> None:
        """Make torch and the library's other packages available, asking the user first.

        torch is installed by the PyTorch extension (it picks the CUDA build that fits the driver); the rest
        by ``slicer.packaging.pip_ensure`` (Slicer >= 5.11) or ``slicer.util.pip_install``. numpy and
        SimpleITK are Slicer's own and are never reinstalled. In testing mode nothing is installed.
        """
        if not self.torchInstalled():
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    _("DeepSalReg needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart "
                      "Slicer and press Apply again.")
                ) from None
            if slicer.app.testingEnabled():
                raise RuntimeError(_("PyTorch is not installed (not installing it in testing mode)."))
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT
            )
            if torch is None:
                raise RuntimeError(_("PyTorch is needed; its installation was cancelled."))
        self._ensurePipRequirements(askConfirmation)

    @staticmethod
    def _missingPipRequirements() -> list:
        import importlib.util

        return [r for r in PIP_REQUIREMENTS if importlib.util.find_spec(r.split(">")[0].split("=")[0].strip()) is None]

    @staticmethod
    def _keepSlicerPackagesConstraints() -> str:
        """A pip constraints file that pins Slicer's own numpy and SimpleITK, so pip can never replace them."""
        import importlib.metadata

        pins = []
        for name in ("numpy", "SimpleITK"):
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass  # not installed as a distribution: pip then sees nothing it could upgrade
        path = Path(slicer.app.temporaryPath) / "DeepSalReg-constraints.txt"
        path.write_text("\n".join(pins) + "\n", encoding="utf-8")
        return str(path)

    def _ensurePipRequirements(self, askConfirmation: bool) -> None:
        try:
            import slicer.packaging as packaging
        except ImportError:  # Slicer < 5.11
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(list(PIP_REQUIREMENTS), constraints=self._keepSlicerPackagesConstraints(),
                                 prompt_install=askConfirmation, requester="DeepSalReg")
            return
        missing = self._missingPipRequirements()
        if not missing or slicer.app.testingEnabled():
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("DeepSalReg needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))
        ):
            raise RuntimeError(_("Python packages {packages} are needed.").format(packages=", ".join(missing)))
        slicer.util.pip_install(missing + ["-c", self._keepSlicerPackagesConstraints()])

    @staticmethod
    def modelsFolder() -> Path:
        """Where this user's model files live: ``$DEEPSALREG_MODELS_DIR``, else ``<Slicer cache>/DeepSalReg/models``.

        Never inside the extension's install tree (it may be read-only and is replaced on update).
        """
        override = os.environ.get("DEEPSALREG_MODELS_DIR")
        if override:
            return Path(override)
        cache = Path(slicer.app.cachePath) if hasattr(slicer, "app") else Path.home() / ".cache"
        return cache / "DeepSalReg" / "models"

    def availableModels(self) -> list:
        """``(label, value)`` of the models to offer: the shipped ones (``default`` picks 2D or 3D), the model
        files (``*.pt``) in the models folder, and ``none`` (refinement only, no network)."""
        self.library()
        from DeepSalRegLib import models as shippedModels

        shipped = sorted(shippedModels.registry())
        models = [("default", "default")] if shipped else []
        models += [(name, name) for name in shipped]
        folder = self.modelsFolder()
        if folder.is_dir():
            models += [(f"{path.name} (models folder)", str(path)) for path in sorted(folder.glob("*.pt"))]
        models.append((_("none (refinement only)"), "none"))
        return models

    def clearModelsFolder(self) -> int:
        """Delete the model files (``*.pt`` and their ``*.md`` / ``*.json`` cards) directly in the models folder;
        returns how many were removed. Nothing else is touched: ``$DEEPSALREG_MODELS_DIR`` may point at a shared
        folder."""
        folder = self.modelsFolder()
        if not folder.is_dir():
            return 0
        removed = 0
        for path in sorted(folder.glob("*.pt")):
            for item in (path, path.with_suffix(".md"), path.with_suffix(".json")):
                if item.is_file():
                    item.unlink()
                    removed += 1
        return removed

    # --- registration ---

    @staticmethod
    def pythonExecutable() -> str:
        """The interpreter of the child process: Slicer's ``PythonSlicer`` (outside Slicer: this Python)."""
        if not hasattr(slicer, "app"):
            return sys.executable
        executable = shutil.which("PythonSlicer")
        if executable is None:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer; reinstall Slicer."))
        return executable

    @staticmethod
    def childEnvironment():
        """The environment Slicer started with (PythonSlicer sets up its own paths from it)."""
        if hasattr(slicer, "app"):
            return slicer.util.startupEnvironment()
        return None

    def _outputNodes(self, outputTransform, warpedVolume, saliencyVolume, jacobianVolume, treTable, createWarped):
        glue = self.library()
        return glue.OutputNodes(transform=outputTransform, warped=warpedVolume, saliency=saliencyVolume,
                                jacobian=jacobianVolume, tre_table=treTable, create_warped=createWarped)

    def startProcess(self, fixedVolume, movingVolume, outputTransform=None, fixedLandmarks=None, movingLandmarks=None,
                     model="default", device="auto", iterations=None, warpedVolume=None, saliencyVolume=None,
                     jacobianVolume=None, treTable=None, createWarped=False, progressCallback=None, showResults=True,
                     affine=True, quality="balanced", timeBudget=None, fixedMask=None, movingMask=None):
        """Start a registration in a child process and return its ``RegistrationJob`` at once.

        Call ``job.poll()`` regularly from the GUI thread (the panel uses a timer) until it returns True, then
        read ``job.state``, ``job.result`` (a ``ResultNodes``) or ``job.error``; ``job.cancel()`` stops it.
        Arguments are those of ``process``.
        """
        glue = self.library()
        job = glue.RegistrationJob(
            slicer.mrmlScene,
            fixedVolume,
            movingVolume,
            options=glue.RegistrationOptions(model=model, device=device, quality=quality, iterations=iterations,
                                             affine=affine, time_budget=timeBudget),
            nodes=self._outputNodes(outputTransform, warpedVolume, saliencyVolume, jacobianVolume, treTable, createWarped),
            fixed_landmarks=fixedLandmarks,
            moving_landmarks=movingLandmarks,
            fixed_mask=fixedMask,
            moving_mask=movingMask,
            python=self.pythonExecutable(),
            env=self.childEnvironment(),
            start_process=self.startProcessFunction,
            temp_root=slicer.app.temporaryPath if hasattr(slicer, "app") else None,
            on_progress=progressCallback,
            on_log=lambda line: logging.info(f"DeepSalReg: {line}"),
            show=showResults,
        )
        return job.start()

    def process(self, fixedVolume, movingVolume, outputTransform=None, fixedLandmarks=None, movingLandmarks=None,
                model="default", device="auto", iterations=None, warpedVolume=None, saliencyVolume=None,
                jacobianVolume=None, treTable=None, createWarped=False, inProcess=False, progressCallback=None,
                showResults=True, timeout=None, affine=True, quality="balanced", timeBudget=None, fixedMask=None,
                movingMask=None):
        """Register ``movingVolume`` to ``fixedVolume`` and return the result nodes (waits until done).

        Args:
            fixedVolume, movingVolume: scalar volume nodes (2D images are single-slice volumes).
            outputTransform: transform node to fill (default: a new one). It receives the displacement field
                as its "from parent" transform, is applied to the moving volume and shows a grid.
            fixedLandmarks, movingLandmarks: optional point lists, corresponding point by point; give both to
                get the TRE table.
            fixedMask, movingMask: optional label maps; the alignment is measured only where they are nonzero
                (the manual override of the joint saliency map: leave out what the other image lacks).
            model: a shipped model ("default" picks "default-2d" or "default-3d"), the path of a model file, or
                "none" (no network: refinement from the identity).
            device: "auto", "cpu" or "cuda".
            quality: "fast", "balanced" (default) or "accurate": how long the refinement after the network runs
                (it stops by itself when converged) and, for "fast", a coarser 3D working grid
                (``DeepSalRegLib/quality.py``; costs in the README).
            iterations: expert: exactly this many refinement steps instead (0: affine + network only).
            timeBudget: optional seconds: the refinement ends early so the registration takes about this long.
            affine: affine pre-alignment before the network (off only for roughly aligned pairs).
            warpedVolume, saliencyVolume, jacobianVolume, treTable: nodes to fill (default: new ones; the warped
                volume only with ``createWarped=True`` or when given).
            inProcess: run the library inside this process (blocks Slicer; no cancel) instead of a child.
            progressCallback: ``progressCallback(fraction, message)``.
            showResults: set up the slice views (grid, saliency overlay, colour maps).
            timeout: seconds after which a child process is cancelled.
        Returns:
            ``DeepSalRegLib.slicer_glue.ResultNodes`` with ``transform``, ``warped``, ``saliency``, ``jacobian``,
            ``tre_table``, ``outputs`` and ``mean_tre``.
        Raises:
            DeepSalRegLib.errors.DeepSalRegError: a problem the user can fix (bad input, model, device, output).
        """
        if inProcess:
            glue = self.library()
            return glue.register_nodes(
                slicer.mrmlScene,
                fixedVolume,
                movingVolume,
                options=glue.RegistrationOptions(model=model, device=device, quality=quality, iterations=iterations,
                                                 affine=affine, time_budget=timeBudget),
                nodes=self._outputNodes(outputTransform, warpedVolume, saliencyVolume, jacobianVolume, treTable, createWarped),
                fixed_landmarks=fixedLandmarks,
                moving_landmarks=movingLandmarks,
                progress=progressCallback,
                show=showResults,
                fixed_mask=fixedMask,
                moving_mask=movingMask,
            )
        job = self.startProcess(fixedVolume, movingVolume, outputTransform, fixedLandmarks, movingLandmarks, model, device,
                                iterations, warpedVolume, saliencyVolume, jacobianVolume, treTable, createWarped,
                                progressCallback, showResults, affine, quality, timeBudget, fixedMask, movingMask)
        idle = slicer.app.processEvents if hasattr(slicer, "app") else None
        return job.wait(timeout=timeout, idle=idle)

    @staticmethod
    def summaryText(result, seconds=None) -> str:
        """One line for the status label: time, and mean TRE before -> after when landmarks were given."""
        parts = [_("Done") if seconds is None else _("Done in {seconds:.1f} s").format(seconds=seconds)]
        tre = result.mean_tre
        if tre is not None:
            parts.append(_("mean TRE {before:.2f} mm -> {after:.2f} mm").format(before=tre[0], after=tre[1]))
        return "; ".join(parts) + "."


#
# DeepSalRegTest
#


class DeepSalRegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (``slicer_add_python_unittest``, or Reload & Test in developer mode).

    Downloads nothing: it loads the small 3D sample pair shipped inside ``DeepSalRegLib/sample_data``
    (MNI152 and Colin27 T1, 64 x 80 x 64) with Slicer's own reader. Without torch (Slicer's build machines)
    the registration is replaced by a known translation, which still checks every step from nodes to the
    displayed results; where torch is installed the real library also runs in a child process.
    """

    SHIFT_LPS = (4.0, -2.0, 1.5)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_results_become_nodes()
        self.setUp()
        self.test_registration_in_child_process()

    def _loadSamplePair(self):
        """Fixed and moving volume nodes of the shipped 3D sample, and corresponding landmarks (moving = fixed + shift)."""
        import numpy as np

        glue = DeepSalRegLogic.library()
        from DeepSalRegLib.sample_data import sample_pair

        fixedPath, movingPath = sample_pair("3d")
        fixed = slicer.util.loadVolume(str(fixedPath))
        moving = slicer.util.loadVolume(str(movingPath))
        fixedImage = glue.volume_node_to_image(fixed)
        fixedPoints = np.array([fixedImage.TransformIndexToPhysicalPoint(v) for v in [(32, 40, 32), (20, 50, 30), (44, 30, 36)]])
        fixedMarkups = glue.landmarks_to_markups(fixedPoints, slicer.mrmlScene, name="DeepSalRegTest fixed landmarks")
        movingMarkups = glue.landmarks_to_markups(fixedPoints + np.array(self.SHIFT_LPS), slicer.mrmlScene,
                                                  name="DeepSalRegTest moving landmarks")
        return fixed, moving, fixedMarkups, movingMarkups, fixedPoints

    def test_results_become_nodes(self):
        """A known translation goes through the in-process path and comes back as displayed nodes."""
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Results of a known translation become nodes")
        glue = DeepSalRegLogic.library()
        fixed, moving, fixedMarkups, movingMarkups, fixedPoints = self._loadSamplePair()
        shift = np.array(self.SHIFT_LPS)

        class KnownTranslation:
            """What ``DeepSalRegLib.register`` returns, for a registration that finds ``shift``."""

            def __init__(self, fixedImage, fixedLandmarks, movingLandmarks):
                field = np.broadcast_to(shift, sitk.GetArrayFromImage(fixedImage).shape + (3,)).astype(np.float64)
                self.displacement = sitk.GetImageFromArray(np.ascontiguousarray(field), isVector=True)
                self.displacement.CopyInformation(fixedImage)
                self.warped = fixedImage
                self.saliency = sitk.Cast(sitk.RescaleIntensity(fixedImage, 0, 1), sitk.sitkFloat32)
                self.jacobian = sitk.Cast(fixedImage * 0 + 1, sitk.sitkFloat32)
                self.confidence = sitk.Cast(sitk.RescaleIntensity(fixedImage, 0.1, 1), sitk.sitkFloat32)
                self.tre = {"before": np.linalg.norm(fixedLandmarks - movingLandmarks, axis=1),
                            "after": np.linalg.norm(fixedLandmarks + shift - movingLandmarks, axis=1)}
                self.timings, self.metrics = {}, {}

        def register(fixedImage, movingImage, fixed_landmarks=None, moving_landmarks=None, **kwargs):
            return KnownTranslation(fixedImage, fixed_landmarks, moving_landmarks)

        result = glue.register_nodes(slicer.mrmlScene, fixed, moving, fixed_landmarks=fixedMarkups,
                                     moving_landmarks=movingMarkups, register=register)
        point = fixedPoints[0]
        mapped = result.transform.GetTransformFromParent().TransformPoint(glue.lps_to_ras(point)[0].tolist())
        np.testing.assert_allclose(glue.ras_to_lps(mapped)[0], point + shift, atol=1e-3)
        self.assertEqual(moving.GetParentTransformNode(), result.transform)
        self.assertEqual(movingMarkups.GetParentTransformNode(), result.transform)
        self.assertEqual(result.transform.GetDisplayNode().GetVisualizationMode(),
                         slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
        self.assertEqual(result.saliency.GetDisplayNode().GetColorNodeID(), "vtkMRMLColorTableNodeFileInferno.txt")
        self.assertEqual(result.jacobian.GetDisplayNode().GetColorNodeID(), "vtkMRMLColorTableNodeFileDivergingBlueRed.txt")
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            self.assertEqual(composite.GetForegroundVolumeID(), result.confidence.GetID())  # the overlay
            self.assertEqual(composite.GetBackgroundVolumeID(), fixed.GetID())
        legends = [result.confidence.GetNthDisplayNode(i) for i in range(result.confidence.GetNumberOfDisplayNodes())]
        self.assertTrue(any(n.IsA("vtkMRMLColorLegendDisplayNode") and "confidence" in n.GetTitleText()
                            for n in legends))
        self.assertEqual(result.tre_table.GetNumberOfRows(), 4)
        self.assertAlmostEqual(float(result.tre_table.GetCellText(3, 2)), 0.0, places=6)
        self.delayDisplay("Test passed")

    def test_registration_in_child_process(self):
        """The real library in a child process (only where torch is installed)."""
        import numpy as np

        if not DeepSalRegLogic.torchInstalled():
            self.delayDisplay("torch is not installed: skipping the child-process registration")
            return
        self.delayDisplay("Registering the sample pair in a child process")
        fixed, moving, fixedMarkups, movingMarkups, _ = self._loadSamplePair()
        logic = DeepSalRegLogic()
        model = logic.availableModels()[0][1]  # "default" when models are shipped, else "none" (refinement only)
        progress = []
        result = logic.process(fixed, moving, fixedLandmarks=fixedMarkups, movingLandmarks=movingMarkups, model=model,
                               device="cpu", iterations=0 if model != "none" else 5,
                               progressCallback=lambda f, m: progress.append(f), timeout=600)
        self.assertEqual(moving.GetParentTransformNode(), result.transform)
        self.assertIsNotNone(result.saliency)
        self.assertIsNotNone(result.tre_table)
        self.assertTrue(progress and progress[-1] == 1.0)
        before, after = result.mean_tre
        self.assertTrue(np.isfinite(after))
        self.delayDisplay(f"Test passed (mean TRE {before:.2f} -> {after:.2f} mm)")
