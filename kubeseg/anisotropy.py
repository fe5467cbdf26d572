"""nnU-Net's anisotropy threshold, owned in one place.

An axis whose spacing is more than this many times the others' (or, for patches, a patch that is
this many times longer in-plane than through-plane) is treated separately: the planner's target
spacing, the resampling (that axis with nearest-neighbour/linear order) and the augmentation
(spatial transforms slice-wise in 2D) all use the same number, 3.
"""

ANISOTROPY_THRESHOLD = 3.0
