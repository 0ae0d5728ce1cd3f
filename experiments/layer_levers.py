"""A/B of layer-level levers in one process: each layer's default vs a rewrite.

``experiments.levers`` switches XLA options on a whole train step; this
module rewrites one layer and times its forward+backward (value and gradient
of ``0.5 sum(y^2)`` with respect to the input and the parameters) next to
the default, in the same process, as a median of ``--repeats`` calls after
a warm-up. Every rewrite computes the same function as its default (the
tests check values and gradients), so the only question is speed. Levers:

* ``winograd``: a SAME 3x3 convolution as Winograd's F(2x2, 3x3) algorithm
  (Lavin & Gray 2016) written in XLA ops, against ``lax.conv_general_dilated``.
  Each 2x2 output tile comes from a 4x4 input tile ``d`` as
  ``Y = A^T [(G g G^T) . (B^T d B)] A``: 16 multiplies per tile and channel
  pair instead of 36, so the contraction over input channels does 2.25x
  fewer flops, as 16 batched GEMMs ``(tiles x C_in) @ (C_in x C_out)``. The
  price is that the transformed input and the GEMM outputs are 4x the size
  of the image (16 values per 4 pixels), and XLA cannot fuse the transforms
  into the GEMMs. The lever also times :func:`mgtrain.nn.winograd.winograd_conv3x3`,
  F(4x4, 3x3): 4x fewer flops and a transformed input 2.25x the image. That
  one won (2026-12-04) and is what ``standard_conv`` uses on CPU.
* ``host-fft``: the mesh-free conv's spectral filter
  (``irfft2(S rfft2(v))`` and its closed-form adjoint,
  :func:`mgtrain.nn.meshfree._spectral_filter`) with every FFT done by
  ``scipy.fft`` (``workers=2``) inside ``jax.pure_callback``, so that the FFTs
  run on scipy's threads instead of XLA's FFT thunk (which loses a thread
  on a pool worker, docs/benchmark_cpu.md). CPU only; the callback copies
  arrays between XLA and NumPy.
* ``bias-dot``: a convolution's bias gradient ``sum_{n,h,w} g`` as a GEMV
  with a vector of ones instead of XLA's reduction, which its CPU backend
  turns into a slow ``reduce-window`` when the kept (channel) axis is minor.

Results on this 2-core CPU are in docs/benchmark_cpu.md (2026-12-02,
evening): none of the three was kept. F(4x4, 3x3) was added to the
``winograd`` lever on 2026-12-04 and kept (:mod:`mgtrain.nn.winograd`).

Usage::

  python -m experiments.layer_levers --levers winograd host-fft bias-dot \\
      --size 64 --batch 16 --channels 128
  python -m experiments.layer_levers --config smoke --workdir /tmp/ll

Writes ``WORKDIR/layer_levers.json`` and ``WORKDIR/layer_levers.md``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  >>> w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
  >>> bool(jnp.allclose(winograd_conv3x3(x, w), conv3x3(x, w), atol=1e-4))
  True
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cli import positive_int
from experiments.timing import median_seconds
from mgtrain.nn import meshfree, winograd

LEVERS = ("winograd", "host-fft", "bias-dot")
CONFIGS = {
    # (size, batch, channels, repeats)
    "cpu": (64, 16, 128, 5),
    "smoke": (8, 2, 4, 2),
}


def conv3x3(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """SAME 3x3 convolution, stride 1: ``x`` ``(N, H, W, C)``, ``w`` ``(3, 3, C, D)``."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _overlapping_tiles(p: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Windows of 4 at stride 2 along ``axis`` (length ``2m + 2``) -> ``(..., m, 4, ...)``.

  Window ``i`` is pair ``i`` followed by pair ``i + 1`` of the axis split
  into pairs, so no gather is needed.
  """
  n = p.shape[axis]
  pairs = p.reshape(p.shape[:axis] + (n // 2, 2) + p.shape[axis + 1:])
  first = jax.lax.slice_in_dim(pairs, 0, n // 2 - 1, axis=axis)
  second = jax.lax.slice_in_dim(pairs, 1, n // 2, axis=axis)
  return jnp.concatenate([first, second], axis=axis + 1)


def _rows(a: jnp.ndarray, axis: int, count: int):
  return [jax.lax.index_in_dim(a, i, axis, keepdims=False) for i in range(count)]


def _input_transform(d: jnp.ndarray, axis: int) -> jnp.ndarray:
  """``B^T d`` along ``axis`` (length 4), new axis first.

  ``B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]``.
  """
  d0, d1, d2, d3 = _rows(d, axis, 4)
  return jnp.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3])


def _filter_transform(g: jnp.ndarray, axis: int) -> jnp.ndarray:
  """``G g`` along ``axis`` (length 3), new axis first.

  ``G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]``.
  """
  g0, g1, g2 = _rows(g, axis, 3)
  return jnp.stack([g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2])


def _output_transform(m: jnp.ndarray, axis: int) -> jnp.ndarray:
  """``A^T m`` along ``axis`` (length 4), new axis first. ``A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]``."""
  m0, m1, m2, m3 = _rows(m, axis, 4)
  return jnp.stack([m0 + m1 + m2, m1 - m2 - m3])


def winograd_conv3x3(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """:func:`conv3x3` by Winograd's F(2x2, 3x3); ``H`` and ``W`` must be even.

  Shapes: ``x`` ``(N, H, W, C)``, ``w`` ``(3, 3, C, D)`` (HWIO) -> ``(N, H, W, D)``.
  The input is zero-padded by one pixel, cut into ``(H/2) x (W/2)``
  overlapping 4x4 tiles at stride 2, transformed (``V = B^T d B``), multiplied
  by ``U = G g G^T`` in 16 GEMMs over channels, and transformed back
  (``Y = A^T M A``) into 2x2 output tiles. Differentiable by JAX: the
  backward pass is the same sequence transposed, with the same 2.25x fewer
  GEMM flops.
  """
  n, h, width, c = x.shape
  if h % 2 or width % 2:
    raise ValueError(f"winograd_conv3x3 needs an even height and width, got {h} x {width}")
  if w.shape[:3] != (3, 3, c):
    raise ValueError(f"expected a (3, 3, {c}, D) kernel, got {w.shape}")
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  tiles = _overlapping_tiles(_overlapping_tiles(padded, 1), 3)   # (N, h/2, 4, w/2, 4, C)
  v = _input_transform(_input_transform(tiles, 2), 4)            # (4c, 4r, N, h/2, w/2, C)
  u = _filter_transform(_filter_transform(w, 1), 1)              # (4r, 4c, C, D)
  u = jnp.swapaxes(u, 0, 1)                                      # (4c, 4r, C, D), as v
  m = jnp.einsum("abnhwc,abcd->abnhwd", v, u)
  y = _output_transform(_output_transform(m, 1), 1)              # (2c, 2r, N, h/2, w/2, D)
  y = jnp.transpose(y, (2, 3, 1, 4, 0, 5))                       # (N, h/2, 2r, w/2, 2c, D)
  return y.reshape(n, h, width, w.shape[-1])


@jax.custom_vjp
def bias_add_gemv(y: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """``y + bias`` over the last axis, whose bias gradient is a GEMV with ones."""
  return y + bias


def _bias_add_fwd(y, bias):
  return y + bias, None


def _bias_add_bwd(_, g):
  rows = g.size // g.shape[-1]
  return g, jnp.ones((rows,), g.dtype) @ g.reshape(rows, g.shape[-1])


bias_add_gemv.defvjp(_bias_add_fwd, _bias_add_bwd)


def _host_rfft2(v: jnp.ndarray) -> jnp.ndarray:
  import scipy.fft
  out = jax.ShapeDtypeStruct(v.shape[:-1] + (v.shape[-1] // 2 + 1,),
                             jnp.result_type(v.dtype, jnp.complex64))
  return jax.pure_callback(
      lambda a: scipy.fft.rfft2(np.asarray(a), workers=2).astype(out.dtype, copy=False),
      out, v)


def _host_irfft2(z: jnp.ndarray, shape: tuple[int, int]) -> jnp.ndarray:
  import scipy.fft
  out = jax.ShapeDtypeStruct(z.shape[:-1] + (shape[1],), jnp.real(jnp.zeros((), z.dtype)).dtype)
  return jax.pure_callback(
      lambda a: scipy.fft.irfft2(np.asarray(a), s=shape, workers=2).astype(out.dtype,
                                                                            copy=False),
      out, z)


@jax.custom_vjp
def host_spectral_filter(v, s_re, s_im):
  """:func:`mgtrain.nn.meshfree._spectral_filter` (per channel) with scipy's FFTs.

  ``v``: ``(B, C, H, W)``; ``S = s_re + i s_im``: ``(C, H, W//2+1)``.
  """
  return _host_filter_fwd(v, s_re, s_im)[0]


def _host_filter_fwd(v, s_re, s_im):
  spec = _host_rfft2(v)
  s = jax.lax.complex(s_re, s_im)
  return _host_irfft2(spec * s, v.shape[-2:]), (spec, s)


def _host_filter_bwd(residuals, g):
  spec, s = residuals
  height, width = g.shape[-2:]
  grad_spec = _host_rfft2(g)
  grad_v = _host_irfft2(grad_spec * jnp.conj(s), (height, width))
  p = jnp.sum(spec * jnp.conj(grad_spec), axis=0)
  p = p * (meshfree._rfft_column_weights(width, g.dtype) / (height * width))
  return grad_v, jnp.real(p), -jnp.imag(p)


host_spectral_filter.defvjp(_host_filter_fwd, _host_filter_bwd)


def lever_problems(lever: str, size: int, batch: int, channels: int):
  """``(inputs, {variant: f})`` for a lever: ``f(*inputs)`` is the layer's output.

  The first variant is the default. Inputs are standard normal (the kernel
  scaled by ``1/sqrt(9 C)``; the symbol is the MFC's initial one on the mesh).
  """
  kx, kw, kb, ks = jax.random.split(jax.random.key(0), 4)
  if lever == "winograd":
    x = jax.random.normal(kx, (batch, size, size, channels))
    w = jax.random.normal(kw, (3, 3, channels, channels)) / np.sqrt(9 * channels)
    return (x, w), {"xla_conv": conv3x3, "winograd_f2x2_3x3": winograd_conv3x3,
                    "winograd_f4x4_3x3": winograd.winograd_conv3x3}
  if lever == "bias-dot":
    x = jax.random.normal(kx, (batch, size, size, channels))
    w = jax.random.normal(kw, (3, 3, channels, channels)) / np.sqrt(9 * channels)
    b = jax.random.normal(kb, (channels,))
    return (x, w, b), {"conv_plus_bias": lambda x, w, b: conv3x3(x, w) + b,
                       "bias_grad_as_gemv": lambda x, w, b: bias_add_gemv(conv3x3(x, w), b)}
  if lever == "host-fft":
    v = jax.random.normal(kx, (batch, channels, size, size))
    raw = meshfree.init_raw(ks, (channels,))
    s = meshfree.discrete_symbol(meshfree.coefficients(raw, 1.0 / 16), size, size,
                                 (1.0 / size, 1.0 / size))
    s = jnp.moveaxis(s, (0, 1), (-2, -1))
    return (v, jnp.real(s), jnp.imag(s)), {
        "xla_fft": lambda v, a, b: meshfree._spectral_filter(v, a, b, False),
        "scipy_fft_callback": host_spectral_filter}
  raise ValueError(f"lever must be one of {LEVERS}, got {lever!r}")


def time_lever(lever: str, size: int, batch: int, channels: int, repeats: int) -> dict:
  """Median fwd+bwd seconds of every variant of ``lever``, in this process."""
  inputs, variants = lever_problems(lever, size, batch, channels)
  row = {"lever": lever, "size": size, "batch": batch, "channels": channels,
         "repeats": repeats, "seconds": {}, "max_relative_difference": {}}
  reference = None
  for name, f in variants.items():
    fb = jax.jit(jax.value_and_grad(lambda *a, f=f: 0.5 * jnp.sum(jnp.square(f(*a))),
                                    argnums=tuple(range(len(inputs)))))
    out = jax.block_until_ready(fb(*inputs))        # warm-up (compiles)
    row["seconds"][name] = median_seconds(lambda: fb(*inputs), repeats)[0]
    leaves = jax.tree.leaves(out)
    if reference is None:
      reference = leaves
    # Per output (loss, each gradient): max |a - b| / max |b|.
    row["max_relative_difference"][name] = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
        for a, b in zip(leaves, reference))
  default = next(iter(variants))
  row["speedup_over_default"] = {name: row["seconds"][default] / t
                                 for name, t in row["seconds"].items()}
  return row


def table(rows: list[dict]) -> str:
  lines = ["| lever | variant | size | batch | channels | fwd+bwd s (median) "
           "| speed-up vs default | max relative difference vs default |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for name, t in r["seconds"].items():
      lines.append(f"| {r['lever']} | {name} | {r['size']} | {r['batch']} | {r['channels']} "
                   f"| {t:.4f} | {r['speedup_over_default'][name]:.2f}x "
                   f"| {r['max_relative_difference'][name]:.1e} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.layer_levers", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
  p.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS))
  p.add_argument("--size", type=positive_int, default=None)
  p.add_argument("--batch", type=positive_int, default=None)
  p.add_argument("--channels", type=positive_int, default=None)
  p.add_argument("--repeats", type=positive_int, default=None)
  p.add_argument("--workdir", default="runs/layer_levers")
  args = p.parse_args(argv)
  size, batch, channels, repeats = CONFIGS[args.config]
  args.size = size if args.size is None else args.size
  args.batch = batch if args.batch is None else args.batch
  args.channels = channels if args.channels is None else args.channels
  args.repeats = repeats if args.repeats is None else args.repeats
  if "winograd" in args.levers and args.size % 2:
    p.error(f"--size must be even for the winograd lever, got {args.size}")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = []
  for lever in args.levers:
    print(f"{lever}: {args.size}^2, batch {args.batch}, {args.channels} channels ...", flush=True)
    rows.append(time_lever(lever, args.size, args.batch, args.channels, args.repeats))
    (workdir / "layer_levers.json").write_text(json.dumps(
        {"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, indent=2))
  md = table(rows)
  (workdir / "layer_levers.md").write_text(
      f"Layer levers on {jax.devices()[0]} (jax {jax.__version__}), one process\n\n{md}\n")
  print(md)
  return rows


if __name__ == "__main__":
  main()
