"""VertebralFractureLib: vertebral compression fracture detection in CT, without Slicer's GUI."""

__version__ = "0.1.0"
