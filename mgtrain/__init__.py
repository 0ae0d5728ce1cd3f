"""mgtrain: multiscale training of convolutional networks in JAX/Flax.

Submodules:
  hierarchy        resolution levels, restriction, batch sizes, checks
  mge              Multiscale Gradient Estimation (Algorithm 1, Eq. 5-6)
  transform        the optax transform combining per-level gradient terms
  workunits        #WU closed forms (Appendix B)
  full_multiscale  Full-Multiscale training (Algorithm 2) and its TrainState
  step_cache       compiled train steps on disk: a second run skips tracing
"""

from mgtrain import full_multiscale, hierarchy, mge, transform, workunits
from mgtrain.hierarchy import Hierarchy
from mgtrain.mge import mge_value_and_grad
from mgtrain.transform import multiscale

__version__ = "0.1.0"

__all__ = ["Hierarchy", "mge_value_and_grad", "multiscale", "full_multiscale",
           "hierarchy", "mge", "transform", "workunits", "__version__"]
