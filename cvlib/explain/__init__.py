"""The explain stage: Grad-CAM, feature maps and the HTML report. Options:
:mod:`cvlib.explain.options`."""
