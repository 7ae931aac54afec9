"""OpenTrans: compress CLIP-based open-vocabulary semantic segmentation models and ship them to edge devices."""

__version__ = "0.1.0"
