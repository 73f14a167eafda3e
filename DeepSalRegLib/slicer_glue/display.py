"""How results are shown: colour maps, the deformation grid, the confidence / saliency overlay, the Jacobian.

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations


import numpy as np


# Key colours (RGB 0..1, evenly spaced) of the maps used when Slicer's colour files are not loaded
# (slicer-core, PythonSlicer): matplotlib's "inferno" and the blue-white-red "coolwarm".
_COLOUR_MAPS = {
    "Inferno": [
        (0.001, 0.0, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
        (0.736, 0.216, 0.33), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
        (0.988, 0.998, 0.645),
    ],
    "DivergingBlueRed": [
        (0.23, 0.299, 0.754), (0.384, 0.51, 0.918), (0.554, 0.69, 0.996), (0.724, 0.815, 0.976),
        (0.867, 0.864, 0.863), (0.96, 0.767, 0.674), (0.957, 0.598, 0.477), (0.865, 0.371, 0.296),
        (0.706, 0.016, 0.15),
    ],
}


def color_node_id(scene, name: str) -> str:
    """ID of a continuous colour table: Slicer's ``<name>.txt`` colour file when loaded, else our own copy.

    Args:
        name: ``"Inferno"`` (saliency) or ``"DivergingBlueRed"`` (Jacobian determinant).
    """
    slicer_id = f"vtkMRMLColorTableNodeFile{name}.txt"
    if scene.GetNodeByID(slicer_id) is not None:
        return slicer_id
    own_name = f"DeepSalReg {name}"
    existing = scene.GetFirstNodeByName(own_name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing.GetID()
    keys = np.asarray(_COLOUR_MAPS[name])
    positions = np.linspace(0.0, 1.0, len(keys))
    samples = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.interp(samples, positions, keys[:, c]) for c in range(3)], axis=1)
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", own_name)
    table.SetTypeToUser()
    table.SetNumberOfColors(len(rgb))
    for index, (r, g, b) in enumerate(rgb):
        table.SetColor(index, f"{index}", float(r), float(g), float(b), 1.0)
    table.SetAttribute("Category", "Continuous")
    return table.GetID()


def _scalar_display_node(volume):
    if volume.GetDisplayNode() is None:
        volume.CreateDefaultDisplayNodes()
    return volume.GetDisplayNode()


def show_transform_grid(transform_node, region=None, spacing_mm: float | None = None):
    """Show a transform as a deformed grid in the slice views (not in 3D).

    Args:
        region: the volume whose extent bounds the grid (the fixed volume).
        spacing_mm: grid line spacing; by default about 1/12 of the region's largest in-plane extent.
    Returns:
        The transform display node.
    """
    import slicer

    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    display = transform_node.GetDisplayNode()
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(False)
    if region is not None:
        display.SetAndObserveRegionNode(region)
        if spacing_mm is None and region.GetImageData() is not None:
            dims = np.asarray(region.GetImageData().GetDimensions(), dtype=float)
            extent = dims * np.asarray(region.GetSpacing())
            spacing_mm = float(np.round(max(extent.max() / 12.0, 1.0)))
    if spacing_mm is not None:
        display.SetGridSpacingMm(spacing_mm)
    return display


def _set_slice_layers(scene, background=None, foreground=None, foreground_opacity: float | None = None) -> None:
    """Set background/foreground volumes of every slice view of the scene (all slice composite nodes)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foreground_opacity is not None:
            composite.SetForegroundOpacity(foreground_opacity)


def show_saliency(scene, saliency, fixed=None, opacity: float = 0.4, threshold: float = 0.1):
    """Show the joint saliency map (0..1) in inferno colours as the foreground over the fixed volume.

    Values below ``threshold`` are transparent so that the fixed image shows where saliency is low.
    Returns the saliency display node.
    """
    display = _scalar_display_node(saliency)
    display.SetAndObserveColorNodeID(color_node_id(scene, "Inferno"))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetThreshold(threshold, 1.0e6)
    display.SetApplyThreshold(1)
    _set_slice_layers(scene, background=fixed, foreground=saliency, foreground_opacity=opacity)
    return display


#: what the confidence overlay means, for its colour legend and the node's description
CONFIDENCE_MEANING = ("Alignment confidence: how much the image content drove the deformation here (the weight of "
                      "the similarity: joint saliency, structure found in both images, fields of view, masks). "
                      "Bright: structure seen in both "
                      "images. Dark: structure in one image only (tumour, resection, contrast agent), flat tissue "
                      "or outside a mask: the deformation there follows its surroundings; check it by eye.")


def show_confidence(scene, confidence, fixed=None, opacity: float = 0.4):
    """Show the confidence map (0..1) in inferno colours over the fixed volume, with a colour legend titled
    "Alignment confidence" (its meaning in ``CONFIDENCE_MEANING``, also the node's description). Returns the
    confidence display node."""
    display = _scalar_display_node(confidence)
    display.SetAndObserveColorNodeID(color_node_id(scene, "Inferno"))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    confidence.SetDescription(CONFIDENCE_MEANING)
    legend = None
    for index in range(confidence.GetNumberOfDisplayNodes()):
        node = confidence.GetNthDisplayNode(index)
        if node is not None and node.IsA("vtkMRMLColorLegendDisplayNode"):
            legend = node
    if legend is None:
        if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # Slicer's Colors module does it
            import slicer

            scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
        legend = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode")
        confidence.AddAndObserveDisplayNodeID(legend.GetID())
    legend.SetAndObservePrimaryDisplayNode(display)
    legend.SetTitleText("Alignment confidence (dark: not driven by the images)")
    legend.SetVisibility(True)
    _set_slice_layers(scene, background=fixed, foreground=confidence, foreground_opacity=opacity)
    return display


def show_jacobian(scene, jacobian):
    """Colour the Jacobian determinant with a diverging map centred on 1 (blue: shrinks, red: grows).

    The window spans 0..2, so folding (determinant <= 0) takes the darkest blue. Returns the display node.
    """
    display = _scalar_display_node(jacobian)
    display.SetAndObserveColorNodeID(color_node_id(scene, "DivergingBlueRed"))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 2.0)
    return display
