"""3x3 convolutions of tiny meshes as one matrix product (im2col).

A stride-1 ``SAME`` 3x3 convolution is, for every output pixel, a dot
product of the 3x3 neighbourhood of its input (zero outside the mesh) with
the kernel. Stacking the nine shifted copies of the zero-padded input along
the channel axis gives the *patch matrix*

  P[(b, y, x), (a, c, i)] = x_pad[b, y + a, x + c, i],   a, c in {0, 1, 2},

of shape ``(B H W, 9 C_in)``, and the convolution is one matrix product
``Y = P K`` with the HWIO kernel reshaped to ``(9 C_in, C_out)``. It does the
same multiplies as the direct method, padding taps included, and its
gradient (JAX's autodiff) is two more matrix products and the sum of the
nine shifted slices.

Why this is here. On the coarsest meshes of a multiscale step the images
are tiny: the reference UNet's deepest features are 2 x 2 on the 8 x 8 level
of a 4-level hierarchy at 64^2. There XLA's CPU convolution (Eigen's spatial
convolution) runs at a few GFLOP/s: a 128 -> 128 conv on ``(192, 2, 2)``
took 60 ms forward+backward, against 5.5 ms as a patch matrix product. In
the UNet's 8^2 pass of the MGE step (batch 192) the 2 x 2 convolutions were
64% of the step's time (docs/benchmark_cpu.md, 2026-12-04 night). Forward +
backward (gradient of ``0.5 sum(y^2)`` in input and kernel), median of 9,
2-core CPU, one process:

  ===================  ========  ==========  ========
  batch x mesh, C      lax.conv  Winograd    im2col
  ===================  ========  ==========  ========
  192 x 2^2, 128->128  60.3 ms   13.5 ms     5.5 ms
  192 x 2^2, 256->128  101.7 ms  28.2 ms     10.0 ms
  16 x 2^2, 128->128   3.1 ms    4.5 ms      0.9 ms
  192 x 2^2, 3->32     0.29 ms   0.59 ms     0.11 ms
  192 x 1^2, 128->128  2.9 ms    7.3 ms      1.8 ms
  192 x 3^2, 128->128  8.9 ms    8.4 ms      11.3 ms
  96 x 4^2, 128->128   7.7 ms    6.3 ms      9.9 ms
  ===================  ========  ==========  ========

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
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Tap order (row offset, column offset, channel) is the HWIO kernel's row-major order.
  patches = jnp.concatenate([xp[:, a:a + height, c:c + width]
                             for a in range(3) for c in range(3)], axis=-1)
  y = jnp.matmul(patches.reshape(n * height * width, 9 * c_in),
                 kernel.reshape(9 * c_in, kernel.shape[3]), precision=precision)
  return y.reshape(n, height, width, kernel.shape[3])

