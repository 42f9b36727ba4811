"""Suite-wide settings: one torch thread per test process.

The suite runs under pytest-xdist on all cores, and the multi-process tests start
several workers each; more threads than cores slows small models down by 10x here.
"""

import torch

torch.set_num_threads(1)
