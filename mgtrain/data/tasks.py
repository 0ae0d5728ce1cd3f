"""Task degradations as pure JAX functions (usable under ``jit``/``vmap``).

A task maps a PRNG key and a batch of clean images ``y`` of shape
``(B, H, W, C)`` in model range (``[-1, 1]``, see
:func:`mgtrain.data.patches.to_model_range`) to a dict of arrays: the network
input ``'u'``, the target ``'y'`` and any extra inputs (``'t'`` for the
time-conditioned denoiser). Because a task is a pure function of
``(key, y)``, it can be applied to each level's restricted images inside one
jitted training step.

:data:`TASKS` maps task names to these functions; deblurring, inpainting
and super-resolution are added there with the same signature.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mgtrain.data import tasks
  >>> y = jnp.zeros((4, 8, 8, 3))
  >>> batch = tasks.TASKS['denoise'](jax.random.key(0), y)
  >>> {k: v.shape for k, v in batch.items()}
  {'t': (4,), 'u': (4, 8, 8, 3), 'y': (4, 8, 8, 3)}
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['TASKS', 'denoise', 'denoise_mix', 'fixed_denoise_set']

Array = jax.Array
Task = Callable[..., Dict[str, Array]]


def _float_dtype(y) -> jnp.dtype:
  dtype = jnp.result_type(y)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def denoise_mix(y: Array, t: Array, z: Array) -> Array:
  """The noisy input ``u = t * y + (1 - t) * z`` for given ``t`` and ``z``.

  Args:
    y: clean images, shape ``(B, ...)`` (usually ``(B, H, W, C)``).
    t: per-sample weights, shape ``(B,)``; broadcast over the other axes.
    z: noise, same shape as ``y``.

  Returns:
    ``u``, same shape as ``y``.

  Example:
    >>> import jax.numpy as jnp
    >>> y, z = jnp.ones((2, 1, 1, 1)), jnp.zeros((2, 1, 1, 1))
    >>> denoise_mix(y, jnp.array([1.0, 0.25]), z).ravel()
    Array([1.  , 0.25], dtype=float32)
  """
  t = jnp.reshape(t, (-1,) + (1,) * (jnp.ndim(y) - 1))
  return t * y + (1.0 - t) * z


@jax.jit
def denoise(key: Array, y: Array, *, t: Optional[Array] = None,
            noise_scale: Optional[Array] = None) -> Dict[str, Array]:
  """Time-conditioned denoising task of the MGE paper (Section 4).

  From the paper: "u^h = t y^h + (1 - t) z", with ``t ~ U[0, 1]`` drawn per
  sample and fed to the network, and ``z ~ N(0, I)`` white noise of the same
  shape as ``y``. ``t = 1`` is the clean image, ``t = 0`` pure noise. The
  network learns ``(u, t) -> y``.

  Pure function of ``(key, y)``, itself wrapped in ``jax.jit`` (one compile
  per shape when called eagerly; inlined when called inside another ``jit``),
  and vmap-compatible.

  Args:
    key: a JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
    y: clean images in model range, shape ``(B, H, W, C)``.
    t: optional per-sample ``t`` of shape ``(B,)`` (or a scalar, broadcast)
      to use instead of sampling it, e.g. to evaluate at a fixed noise level.
    noise_scale: optional standard deviation of ``z`` (default 1). A task
      drawn directly on a coarser mesh uses the law of the fine noise carried
      there, e.g. ``1/2`` per 2x2 block mean
      (:meth:`mgtrain.hierarchy.Hierarchy.white_noise_scale`).

  Returns:
    dict with ``'u'`` (noisy input, shape of ``y``), ``'y'`` (the clean
    target, unchanged) and ``'t'`` (shape ``(B,)``), all of ``y``'s float
    dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> y = jnp.zeros((2, 4, 4, 3))
    >>> out = denoise(jax.random.key(0), y, t=jnp.ones(2))
    >>> bool(jnp.array_equal(out['u'], y))
    True
  """
  dtype = _float_dtype(y)
  y = jnp.asarray(y, dtype)
  if y.ndim < 1:
    raise ValueError(f'y must have a batch axis, got shape {y.shape}.')
  batch = y.shape[0]
  key_t, key_z = jax.random.split(key)
  if t is None:
    t = jax.random.uniform(key_t, (batch,), dtype=dtype)
  else:
    t = jnp.broadcast_to(jnp.asarray(t, dtype), (batch,))
  z = jax.random.normal(key_z, y.shape, dtype=dtype)
  if noise_scale is not None:
    z = z * jnp.asarray(noise_scale, dtype)
  return {'u': denoise_mix(y, t, z), 'y': y, 't': t}


def fixed_denoise_set(y, seed: int) -> Dict[str, np.ndarray]:
  """A fixed denoising validation batch: :func:`denoise` with a seeded key.

  The same ``(y, seed)`` always gives the same ``u`` and ``t``, so
  validation numbers are comparable across runs and methods.

  Args:
    y: clean validation images in model range, shape ``(B, H, W, C)``
      (numpy or jax).
    seed: integer seed; the key is ``jax.random.key(seed)``.

  Returns:
    dict of numpy arrays ``'u'`` ``(B, H, W, C)``, ``'y'`` ``(B, H, W, C)``
    and ``'t'`` ``(B,)``.

  Example:
    >>> import numpy as np
    >>> val = fixed_denoise_set(np.zeros((3, 8, 8, 3), np.float32), seed=0)
    >>> val['u'].shape, val['t'].shape
    ((3, 8, 8, 3), (3,))
  """
  out = denoise(jax.random.key(int(seed)), jnp.asarray(y))
  return {k: np.asarray(v) for k, v in out.items()}


#: Task name -> degradation ``f(key, y, **kwargs) -> dict``.
TASKS: Dict[str, Task] = {
    'denoise': denoise,
}
