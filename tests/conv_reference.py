"""Helpers shared by the 3x3 convolution tests (Winograd, im2col, the dispatcher)."""

import jax
import jax.numpy as jnp


def direct(x, w, **kw):
  """XLA's own SAME 3x3 convolution of NHWC ``x`` with an HWIO ``w``: the reference."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def relative_error(a, b):
  """Largest absolute difference, relative to the largest entry of ``b``."""
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def primitives(fn, *args):
  """Names of the primitives in ``fn``'s jaxpr, and in the jaxprs nested in it
  (a ``custom_vjp_call``'s function, a loop's body)."""
  names = set()

  def walk(jaxpr):
    for e in jaxpr.eqns:
      names.add(str(e.primitive))
      for value in e.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(v, "jaxpr", v)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names
