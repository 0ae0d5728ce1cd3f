"""3x3 convolutions of tiny meshes as one matrix product (im2col).

A stride-1 ``SAME`` 3x3 convolution is, for every output pixel, a dot
product of the 3x3 neighbourhood of its input (zero outside the mesh) with
the kernel. Stacking the nine shifted copies of the zero-padded input along
the channel axis gives the *patch matrix*

  P[(b, y, x), (a, c, i)] = x_pad[b, y + a, x + c, i],   a, c in {0, 1, 2},

of shape ``(B H W, 9 C_in)``, and the convolution is one matrix product
``Y = P K`` with the HWIO kernel reshaped to ``(9 C_in, C_out)``. It does the
same multiplies as the direct method, padding taps included (except on a
side of one pixel, whose outer taps are left out), and its
gradient (JAX's autodiff) is two more matrix products and the sum of the
nine shifted slices.

Why this is here. On the coarsest meshes of a multiscale step the images
are tiny: the reference UNet's deepest features are 2 x 2 on the 8 x 8 level
of a 4-level hierarchy at 64^2. There XLA's CPU convolution (Eigen's spatial
convolution) runs at a few GFLOP/s. In the UNet's 8^2 pass of the MGE step
(batch 192) the 2 x 2 convolutions took 64% of the pass's time
(docs/benchmark_cpu.md, 2026-12-04 night). Forward + backward (gradient of
``0.5 sum(y^2)`` in input and kernel), ``C -> C`` channels, median of 7,
2-core CPU, one process (``python -m experiments.winograd_thresholds
--channels 32 128 256 --shapes 1x192 2x16 2x192 3x96 4x96``; the 1 x 1 rows
from a second run, after the outer taps were left out there):

  ==============  ====  ==============  =============  ============
  batch x mesh    C     lax.conv (ms)   Winograd / it  im2col / it
  ==============  ====  ==============  =============  ============
  192 x 2^2       32    2.46            0.50           0.30
  192 x 2^2       128   30.1            0.23           0.14
  192 x 2^2       256   248.6           0.14           0.07
  16 x 2^2        128   3.14            1.24           0.32
  192 x 1^2       128   2.64            5.18           0.15
  96 x 3^2        128   4.14            1.14           1.33
  96 x 4^2        128   7.28            0.65           1.34
  ==============  ====  ==============  =============  ============

From 3 x 3 on, the patch matrix (nine copies of the input) costs more than
it saves, so :class:`mgtrain.nn.conv_dispatch.Conv3x3Dispatch` uses this
only on meshes of at most 2 x 2.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jax.random.normal(jax.random.key(0), (4, 2, 2, 8))
  >>> w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
  >>> direct = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
  ...     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> bool(jnp.allclose(im2col_conv3x3(x, w), direct, atol=1e-5))
  True
"""

from __future__ import annotations

import jax.numpy as jnp


def im2col_conv3x3(x: jnp.ndarray, kernel: jnp.ndarray, *, precision=None) -> jnp.ndarray:
  """``SAME`` 3x3 convolution, stride 1, of NHWC ``x`` with an HWIO ``kernel``.

  Same result as ``lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` up to the order of the
  float additions, for any mesh; it is fast only on tiny ones (see the module
  docstring).

  Args:
    x: ``(B, H, W, C_in)``.
    kernel: ``(3, 3, C_in, C_out)``, same dtype as ``x``.
    precision: passed to the matrix product (``lax.Precision``).

  Returns:
    ``(B, H, W, C_out)``.
  """
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
    raise ValueError(f"expected NHWC input and a (3, 3, C_in, C_out) kernel, got "
                     f"{x.shape} and {kernel.shape}")
  n, height, width, c_in = x.shape
  if kernel.shape[2] != c_in:
    raise ValueError(f"kernel expects {kernel.shape[2]} input channels, input has {c_in}")
  if kernel.dtype != x.dtype:
    raise ValueError(f"input and kernel must have one dtype, got {x.dtype} and {kernel.dtype}")
  # On a side of one pixel the outer taps only ever see the zero padding:
  # leave them out (a 1 x 1 mesh is then a plain channel map).
  rows = (1,) if height == 1 else (0, 1, 2)
  cols = (1,) if width == 1 else (0, 1, 2)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Tap order (row offset, column offset, channel) is the HWIO kernel's row-major order.
  patches = jnp.concatenate([xp[:, a:a + height, c:c + width] for a in rows for c in cols],
                            axis=-1)
  taps = kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  y = jnp.matmul(patches.reshape(n * height * width, taps.shape[0] * taps.shape[1] * c_in),
                 taps.reshape(-1, kernel.shape[3]), precision=precision)
  return y.reshape(n, height, width, kernel.shape[3])

