"""Models and layers: conv factory, mesh-free and spectral convs, ResNet, UNet.

:func:`init_params` initialises any of them (or any Flax module) in one
compiled program.
"""

from __future__ import annotations

import functools

import jax

from mgtrain.step_cache import cached_call


def init_params(module, key: jax.Array, *example_inputs, step_cache=None,
                on_platform: str | None = None, **kwargs):
  """``module.init(key, *example_inputs)`` as one jitted program.

  Flax's ``init`` run eagerly dispatches (and compiles) every initializer and
  every op of the forward pass one at a time. For the reference UNet
  (2,537,187 params) at 64^2 that took 21 s on a 2-core CPU; jitted it took
  9.0 s cold and 1.7 s from JAX's persistent compilation cache (same
  values; one process each). On CPU it is compiled at LLVM level 1
  (:func:`mgtrain.step_cache.one_off_compiler_options`): 3.9-4.1 s against
  7.2-7.8 s for the whole ``init`` phase of ``experiments.first_step``,
  bitwise the same parameters. The example inputs only fix shapes: the
  forward pass they trace is dead code in the compiled program.

  With a :class:`mgtrain.step_cache.StepCache` a later run loads the
  compiled initialiser without tracing it (UNet at 64^2: trace, lower and
  cached compile took 2.1 s). Its key is ``repr(module)`` and ``kwargs``;
  put the package defining ``module`` in the cache's ``source_packages``.

  ``on_platform="cpu"`` runs the initialiser on the host's CPU and puts the
  parameters on the default device (``jax.devices()[0]``). On a GPU this
  compiles the initialiser, which is mostly random-number kernels, for the
  CPU instead of the GPU, and the parameters are then the ones a CPU run
  initialises from the same key (threefry is bitwise the same on both, but
  the float maths that turns its bits into normals need not be). The
  platform must be one JAX has started (``jax_platforms``).

  >>> import jax.numpy as jnp
  >>> from mgtrain.nn.resnet import ResNet
  >>> params = init_params(ResNet(), jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))
  >>> sorted(params["params"])[:2]
  ['block_0', 'block_1']
  """
  init = jax.jit(functools.partial(module.init, **kwargs))
  cache_key = f"mgtrain.nn.init_params {module!r} kwargs={sorted(kwargs.items())!r}"
  if on_platform is None:
    return cached_call(step_cache, init, key, *example_inputs, key=cache_key)
  try:
    device = jax.devices(on_platform)[0]
  except RuntimeError as e:
    raise ValueError(f"cannot initialise on platform {on_platform!r}: {e}") from None
  # Committed inputs make the jitted initialiser run where they are.
  args = jax.device_put((key, *example_inputs), device)
  params = cached_call(step_cache, init, *args, key=f"{cache_key} on={on_platform}")
  return jax.device_put(params, jax.devices()[0])
