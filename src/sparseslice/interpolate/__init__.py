"""Filling the slices between annotated slices of a sparse label.

Methods (``METHODS``):

- ``none``: nothing is filled; unknown stays unknown.
- ``nearest``: each slice copies the nearest annotated slice (ties go to the lower one).
- ``sdf``: shape-based interpolation. On the two annotated slices around a gap, signed
  distance maps (millimetres, real in-plane spacing) of the foreground and of each label are
  interpolated linearly along the slice axis (slice positions are evenly spaced, so the
  weights are the same in millimetres); the foreground is where the interpolated foreground
  distance is positive, and each foreground voxel takes the label with the largest
  interpolated distance. Touching labels therefore never open a hole between them and no
  voxel gets two labels. Plain distance interpolation shrinks a shape that shifts between
  the two slices (the middle is nearly their intersection), so the foreground of each
  filled slice is the voxels with the highest interpolated distance whose number varies
  linearly between the two slices' areas. Topology changes are handled per connected
  component: a component with no overlapping counterpart on the other side ends inside the
  gap (rounded end) instead of being pulled towards a distant shape.
- ``mci``: ITK's morphological contour interpolation (see :mod:`sparseslice.interpolate.mci`).

Rules shared by all methods: only slices strictly between two annotated slices are filled;
annotated slices (including empty ones and border slices) are never changed; beyond the first
and last annotated slice voxels stay unknown. Only whole annotated slices are inputs: a partly
labelled slice (nnU-Net's ignore label on some of its voxels) is filled like an unknown one,
then keeps the voxels its annotator labelled. A structure present on one side of a gap and
absent on the other (an annotated empty slice) ends inside the gap: for ``sdf`` it shrinks
to nothing half-way (a rounded end: erosion ``depth * (1 - sqrt(1 - x))``), or at the border
when the empty slice is a border slice outside the known extent; ``mci`` ends it at the
empty slice.

Memory: ``nearest`` works one gap at a time; ``sdf`` fills runs of consecutive gaps whose
distance maps fit a fixed budget (about 64 MB of values: a whole hippocampus volume at once,
a few slices of a 512x512 CT), on the bounding box of their annotated slices' foreground, so
a 512x512x1000 volume needs little more than its label.

Layout: :mod:`~sparseslice.interpolate.methods` (the registry of methods, name -> fill
function), :mod:`~sparseslice.interpolate.label` (one label), :mod:`~sparseslice.interpolate.dataset`
(a dataset on disk), :mod:`~sparseslice.interpolate.sdf` and :mod:`~sparseslice.interpolate.mci`
(the two methods' machinery).
"""

from sparseslice.interpolate.dataset import interpolate_dataset
from sparseslice.interpolate.label import Interpolation, interpolate_label
from sparseslice.interpolate.methods import FILLS, METHODS, check_available, check_method
from sparseslice.interpolate.sdf import signed_distance

__all__ = ["FILLS", "METHODS", "Interpolation", "check_available", "check_method", "interpolate_dataset",
           "interpolate_label", "signed_distance"]
