"""sparseslice: sparse slice annotation for CT and MRI segmentation."""

__version__ = "0.1.0"
