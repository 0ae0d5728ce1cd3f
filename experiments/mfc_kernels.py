"""MFC filters (Figure 3) and FLOPs of standard vs mesh-free convolutions (Table 11).

(a) Filters. Each panel is the response of the mesh-free convolution
(:func:`mgtrain.nn.meshfree.heat_filter`, periodic) to a discrete delta at the
centre of a ``size x size`` image, i.e. the filter itself. The coefficients of
Figure 3's caption,

* first row: ``a_xx = 1, a_yy = 3``, ``a_xy`` from 0 to 1 and ``gx`` from 0 to 1
  (``g0 = 1, gy = 0``, ``tau = 1/4``, chosen here: the caption leaves them open;
  the lobe's relative strength ``gx / sqrt(2 tau a_xx)`` does not depend on
  ``length_scale``, and ``tau = 1/4`` makes it visible);
* second row: ``gx = gy = 0, g0 = 1``, ``a_xy`` from 0 to 1 and ``tau`` from 0 to 1
  (``a_xx = 1, a_yy = 3`` as in the first row),

are read in units of ``length_scale`` (``--length-scale``, a fraction of the
image side, default 1/20): the physical coefficients are
``a = length_scale^2 a_paper`` and ``gx = length_scale gx_paper`` (``tau`` is
dimensionless), which is exactly the parametrisation of
:func:`mgtrain.nn.meshfree.coefficients`. The Gaussian part then has standard
deviations ``sqrt(2 tau a_xx) length_scale`` along ``x`` (columns) and
``sqrt(2 tau a_yy) length_scale`` along ``y`` (rows): at most ``2.45 / 20`` of
the side (7.8 pixels of 64), so every kernel fits in its panel. ``tau = 0`` is
the identity (a delta); :func:`raw_from_coefficients` maps it to
``raw_tau = -inf``, which :func:`~mgtrain.nn.meshfree.coefficients` maps back
to ``tau = 0``.

(b) FLOPs. Every number is XLA's own count,
``jax.jit(f).lower(*args).compile().cost_analysis()['flops']``, for one
layer on a batch of one image: a ``k x k`` standard convolution
(:class:`flax.linen.Conv`, SAME zero padding, bias, as ``nn.Conv2d``) and a
:class:`mgtrain.nn.meshfree.MeshFreeConv` (1x1 channel map with bias, ``rfft2``,
symbol, ``irfft2``), both ``3 -> 3`` channels (the 3 channels of the paper's
Figure 7 text). Extra rows: a ``3 x 3`` conv and an MFC at ``128 -> 128``
channels, forward and (unless ``--no-backward``) forward + backward (value and
gradient of ``sum(output^2) / 2`` with respect to the parameters and the input).

XLA counts differently from the paper. For a convolution it counts
``2 k^2 C_in C_out`` per output pixel but leaves out taps that fall on the zero
padding. For an FFT it charges ``8 * prod_d log2(n_d)`` per *input* element
(2 flops per FMA x 4 FMAs per complex multiply x the product, not the sum, of
the log2 of the transform lengths; checked against its numbers by
:func:`xla_fft_model`), i.e. ``8 (log2 n)^2`` per pixel and channel for an
``n x n`` ``rfft2``, against the textbook ``5 N log2 N`` for a complex FFT of
``N = n^2`` points. It also adds the elementwise work of the symbol (``exp``,
products) and the 1x1 channel map. The paper's
Table 11 does not state its channels; its numbers are matched, to the printed
3 digits, by ``k^2 n^2 * 1024`` for the conv and
``1024 * (5 N log2 N + 3 N)``, ``N = n^2``, for the MFC, i.e. analytic counts
(``5 N log2 N`` is the textbook complex-FFT count) with a channel factor of 1024,
e.g. 32 -> 32 multiply-adds (our inference, see :func:`paper_formula`). Ours are
for 3 channels, so compare the *ratios* and the growth in ``k`` and ``n``, not
the absolute values.

Usage::

  python -m experiments.mfc_kernels                       # figure + full tables
  python -m experiments.mfc_kernels --quick --workdir /tmp/mk

Writes ``mfc_filters.png``, ``flops.json`` and ``flops.md`` into ``--workdir``.

Example:
  >>> from mgtrain.nn import meshfree
  >>> raw = raw_from_coefficients(0.5, 1.0, 0.5, 3.0, 1.0, 0.25, 0.0, length_scale=0.1)
  >>> c = meshfree.coefficients(raw, 0.1)
  >>> [round(float(x), 6) for x in (c.tau, c.a_xx, c.a_xy, c.a_yy, c.gx)]
  [0.5, 1.0, 0.5, 3.0, 0.25]
  >>> paper_formula("conv", n=32, k=5)   # Table 11: 2.62 x 10^7
  26214400
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.cli import positive_float, positive_int
from mgtrain.nn import meshfree

IMAGE_SIZES = (32, 64, 128, 256)
KERNEL_SIZES = (5, 7, 9, 11, 13, 15)
# Table 11 of the MFC paper: (standard conv, MFC) FLOPs; rows k, columns n.
PAPER_TABLE11 = {
    5: ((2.62e7, 5.56e7), (1.05e8, 2.65e8), (4.19e8, 1.23e9), (1.68e9, 5.57e9)),
    7: ((5.14e7, 5.56e7), (2.06e8, 2.65e8), (8.22e8, 1.23e9), (3.29e9, 5.57e9)),
    9: ((8.49e7, 5.56e7), (3.40e8, 2.65e8), (1.36e9, 1.23e9), (5.44e9, 5.57e9)),
    11: ((1.27e8, 5.56e7), (5.08e8, 2.65e8), (2.03e9, 1.23e9), (8.12e9, 5.57e9)),
    13: ((1.77e8, 5.56e7), (7.09e8, 2.65e8), (2.84e9, 1.23e9), (1.13e10, 5.57e9)),
    15: ((2.36e8, 5.56e7), (9.44e8, 2.65e8), (3.77e9, 1.23e9), (1.51e10, 5.57e9)),
}


# ---------------------------------------------------------------- (a) filters
def raw_from_coefficients(tau, a_xx, a_xy, a_yy, g0, gx, gy,
                          length_scale: float = 1.0) -> jnp.ndarray:
  """Inverts :func:`mgtrain.nn.meshfree.coefficients`: physical coefficients -> raw ``(..., 7)``.

  With ``s = length_scale``, ``coefficients`` sets ``tau = exp(raw_tau)``,
  ``a_xx = s^2 d_x^2``, ``a_xy = s^2 d_x l_xy``, ``a_yy = s^2 (l_xy^2 + d_y^2)``
  (``d = exp(l)``), ``gx = s gx_raw``, ``gy = s gy_raw``. Hence

    l_xx = log(a_xx / s^2) / 2,     l_xy = a_xy / (s^2 d_x),
    l_yy = log((a_xx a_yy - a_xy^2) / (a_xx s^2)) / 2,

  defined exactly for elliptic ``alpha`` (``a_xx > 0``, ``a_xx a_yy > a_xy^2``).
  Arguments broadcast; ``tau = 0`` gives ``raw_tau = -inf`` (the identity).

  Raises:
    ValueError: if ``tau < 0``, ``length_scale <= 0`` or ``alpha`` is not
      positive definite.
  """
  if length_scale <= 0:
    raise ValueError(f"length_scale must be positive, got {length_scale}")
  tau, a_xx, a_xy, a_yy, g0, gx, gy = np.broadcast_arrays(
      *(np.asarray(v, np.float64) for v in (tau, a_xx, a_xy, a_yy, g0, gx, gy)))
  det = a_xx * a_yy - a_xy ** 2
  if np.any(tau < 0):
    raise ValueError(f"tau must be >= 0, got {tau}")
  if np.any(a_xx <= 0) or np.any(det <= 0):
    raise ValueError("alpha must be positive definite (a_xx > 0, a_xx a_yy > a_xy^2), got "
                     f"a_xx={a_xx}, a_xy={a_xy}, a_yy={a_yy}")
  s2 = length_scale ** 2
  l_xx = 0.5 * np.log(a_xx / s2)
  l_xy = a_xy / (s2 * np.exp(l_xx))
  l_yy = 0.5 * np.log(det / (a_xx * s2))
  with np.errstate(divide="ignore"):
    raw_tau = np.log(tau)
  raw = np.stack([raw_tau, l_xx, l_xy, l_yy, g0, gx / length_scale, gy / length_scale], -1)
  return jnp.asarray(raw, jnp.float32)


def figure3_coefficients(columns: int = 5) -> list[list[dict]]:
  """The two rows of Figure 3, in units of ``length_scale`` (module docstring)."""
  ramp = np.linspace(0.0, 1.0, columns)
  row1 = [dict(tau=0.25, a_xx=1.0, a_xy=float(t), a_yy=3.0, g0=1.0, gx=float(t), gy=0.0)
          for t in ramp]
  row2 = [dict(tau=float(t), a_xx=1.0, a_xy=float(t), a_yy=3.0, g0=1.0, gx=0.0, gy=0.0)
          for t in ramp]
  return [row1, row2]


def filter_image(coeffs: dict, size: int = 64, length_scale: float = 1.0 / 20) -> np.ndarray:
  """The MFC's response to a discrete delta at pixel ``(size // 2, size // 2)``.

  ``coeffs`` are in units of ``length_scale`` (``a`` scales as its square,
  ``gx, gy`` linearly). Returns a ``(size, size)`` array (rows ``y``, columns ``x``).
  """
  s = length_scale
  raw = raw_from_coefficients(coeffs["tau"], s * s * coeffs["a_xx"], s * s * coeffs["a_xy"],
                              s * s * coeffs["a_yy"], coeffs["g0"], s * coeffs["gx"],
                              s * coeffs["gy"], length_scale=s)
  return np.asarray(_delta_response(raw, size, s))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _delta_response(raw: jnp.ndarray, size: int, length_scale: float) -> jnp.ndarray:
  delta = jnp.zeros((1, size, size, 1), jnp.float32).at[0, size // 2, size // 2, 0].set(1.0)
  return meshfree.heat_filter(delta, raw[None], length_scale=length_scale)[0, :, :, 0]


def plot_filters(path: Path, size: int = 64, length_scale: float = 1.0 / 20,
                 columns: int = 5) -> list[list[np.ndarray]]:
  """Draws Figure 3 to ``path``; returns the filter images (rows of columns)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = figure3_coefficients(columns)
  images = [[filter_image(c, size, length_scale) for c in row] for row in rows]
  fig, axes = plt.subplots(2, columns, figsize=(2.3 * columns, 5.6))
  for r, (row, imgs) in enumerate(zip(rows, images)):
    for j, (c, img) in enumerate(zip(row, imgs)):
      ax = axes[r, j]
      vmax = float(np.abs(img).max()) or 1.0
      ax.imshow(img, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
      title = (f"a_xy={c['a_xy']:.2f}, g_x={c['gx']:.2f}" if r == 0
               else f"a_xy={c['a_xy']:.2f}, tau={c['tau']:.2f}")
      ax.set_title(title, fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(f"MFC filters (delta response, {size}x{size}, periodic; units of "
               f"length_scale = {length_scale:.4g}); row 1: a_xx=1, a_yy=3, tau=0.25, g0=1; "
               "row 2: a_xx=1, a_yy=3, g0=1, g_x=g_y=0", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return images


# ---------------------------------------------------------------- (b) FLOPs
def xla_flops(f, *args) -> float:
  """XLA's FLOP count of ``jax.jit(f)(*args)`` after compilation.

  ``cost_analysis()`` is a dict in recent JAX and a list of dicts (one per
  HLO module) in older ones; the list's ``'flops'`` are summed.
  """
  analysis = jax.jit(f).lower(*args).compile().cost_analysis()
  if analysis is None:
    raise RuntimeError("XLA returned no cost analysis for this backend")
  if isinstance(analysis, dict):
    analysis = [analysis]
  return float(sum(a.get("flops", 0.0) for a in analysis))


def _forward_backward(apply):
  """``(p, x) -> (loss, (dloss/dp, dloss/dx))`` for ``loss = sum(apply(p, x)^2) / 2``.

  The loss value is returned and its cotangent depends on the output, so XLA
  cannot drop the forward pass (with ``grad(sum(apply))`` alone it would: the
  cotangent is then a constant of ones).
  """
  return jax.value_and_grad(lambda p, v: 0.5 * jnp.sum(apply(p, v) ** 2), argnums=(0, 1))


def layer_flops(kind: str, size: int, channels_in: int, channels_out: int,
                kernel: int = 3, backward: bool = False) -> float:
  """XLA FLOPs of one ``conv`` (``kernel x kernel``) or ``mfc`` layer on ``(1, size, size, C_in)``.

  ``backward=True`` counts the forward pass plus the gradient of
  ``sum(output^2) / 2`` with respect to the parameters and the input.
  """
  if kind == "conv":
    layer = nn.Conv(channels_out, (kernel, kernel), padding="SAME")
  elif kind == "mfc":
    layer = meshfree.MeshFreeConv(channels_out)
  elif kind == "mfc_filter":   # the spectral part alone (heat_filter on C_in channels)
    raw = jnp.zeros((channels_in, 7), jnp.float32)
    x = jnp.zeros((1, size, size, channels_in), jnp.float32)
    f = lambda r, v: meshfree.heat_filter(v, r, length_scale=1.0 / 16)   # noqa: E731
    if backward:
      return xla_flops(_forward_backward(f), raw, x)
    return xla_flops(f, raw, x)
  else:
    raise ValueError(f"unknown layer kind {kind!r}")
  x = jnp.zeros((1, size, size, channels_in), jnp.float32)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  if backward:
    return xla_flops(_forward_backward(layer.apply), params, x)
  return xla_flops(layer.apply, params, x)


def xla_fft_model(n: int, channels: int) -> float:
  """XLA's charge for ``irfft2(rfft2(x))`` of a ``(1, n, n, channels)`` image.

  ``8 (log2 n)^2`` per element of each transform's input: ``n^2`` real values
  for ``rfft2``, ``n (n/2 + 1)`` complex values for ``irfft2``.
  """
  logs = math.log2(n) ** 2
  return 8 * logs * channels * (n * n + n * (n // 2 + 1))


def paper_formula(kind: str, n: int, k: int | None = None) -> int:
  """Our reconstruction of Table 11's counts (channel factor 1024, inferred).

  ``conv``: ``k^2 n^2 1024``; ``mfc``: ``1024 (5 N log2 N + 3 N)`` with ``N = n^2``.
  """
  if kind == "conv":
    return k * k * n * n * 1024
  big = n * n
  return 1024 * (5 * big * int(round(math.log2(big))) + 3 * big)


def flop_tables(image_sizes=IMAGE_SIZES, kernel_sizes=KERNEL_SIZES, channels: int = 3,
                wide_channels: int = 128, backward: bool = True) -> dict:
  """All FLOP counts: the Table 11 grid plus the 3x3 / MFC rows at ``wide_channels``."""
  out = {"image_sizes": list(image_sizes), "kernel_sizes": list(kernel_sizes),
         "channels": channels, "wide_channels": wide_channels, "batch": 1,
         "conv": {}, "mfc": {}, "mfc_filter": {}, "wide": {}}
  passes = ("forward", "forward_backward") if backward else ("forward",)
  for n in image_sizes:
    out["mfc"][n] = layer_flops("mfc", n, channels, channels)
    out["mfc_filter"][n] = layer_flops("mfc_filter", n, channels, channels)
    for k in kernel_sizes:
      out["conv"].setdefault(k, {})[n] = layer_flops("conv", n, channels, channels, k)
  for p in passes:
    bw = p == "forward_backward"
    out["wide"][p] = {
        "conv3x3": {n: layer_flops("conv", n, wide_channels, wide_channels, 3, bw)
                    for n in image_sizes},
        "mfc": {n: layer_flops("mfc", n, wide_channels, wide_channels, backward=bw)
                for n in image_sizes}}
  return out


def _e(v: float) -> str:
  return f"{v:.2e}"


def markdown(t: dict) -> str:
  sizes, c, w = t["image_sizes"], t["channels"], t["wide_channels"]
  head = "| Image size (n x n) / kernel (k x k) | " + " | ".join(map(str, sizes)) + " |"
  sep = "|---|" + "---|" * len(sizes)
  lines = [f"Table 11 layout: standard conv FLOPs / MFC FLOPs, XLA cost analysis, "
           f"batch {t['batch']}, {c} -> {c} channels, forward pass", "", head, sep]
  for k in t["kernel_sizes"]:
    lines.append(f"| {k} | " + " | ".join(
        f"{_e(t['conv'][k][n])} / {_e(t['mfc'][n])}" for n in sizes) + " |")
  lines += ["", "conv / MFC ratio (ours vs paper Table 11)", "", head, sep]
  for k in t["kernel_sizes"]:
    cells = []
    for n in sizes:
      ours = t["conv"][k][n] / t["mfc"][n]
      paper = PAPER_TABLE11.get(k)
      col = IMAGE_SIZES.index(n) if n in IMAGE_SIZES else None
      ref = (f"{paper[col][0] / paper[col][1]:.2f}" if paper and col is not None else "-")
      cells.append(f"{ours:.2f} (paper {ref})")
    lines.append(f"| {k} | " + " | ".join(cells) + " |")
  lines += ["", "Paper Table 11 (standard conv / MFC, channels not stated)", "", head, sep]
  for k in t["kernel_sizes"]:
    if k in PAPER_TABLE11:
      lines.append(f"| {k} | " + " | ".join(
          f"{_e(PAPER_TABLE11[k][IMAGE_SIZES.index(n)][0])} / "
          f"{_e(PAPER_TABLE11[k][IMAGE_SIZES.index(n)][1])}" if n in IMAGE_SIZES else "-"
          for n in sizes) + " |")
  lines += ["", f"MFC spectral part alone (heat_filter, {c} channels, forward): "
            + ", ".join(f"n={n}: {_e(t['mfc_filter'][n])}" for n in sizes), ""]
  for p, rows in t["wide"].items():
    lines += [f"{w} -> {w} channels, batch {t['batch']}, {p.replace('_', ' + ')}", "",
              "| layer | " + " | ".join(map(str, sizes)) + " |", sep]
    lines.append("| 3x3 conv | " + " | ".join(_e(rows["conv3x3"][n]) for n in sizes) + " |")
    lines.append("| MFC | " + " | ".join(_e(rows["mfc"][n]) for n in sizes) + " |")
    lines.append("| conv / MFC | " + " | ".join(
        f"{rows['conv3x3'][n] / rows['mfc'][n]:.2f}" for n in sizes) + " |")
    lines.append("")
  lines.append("The paper's entries equal k^2 n^2 * 1024 (conv) and 1024 (5 N log2 N + 3 N), "
               "N = n^2 (MFC), to within 0.4% (our inference: analytic counts with a "
               "channel factor of 1024, not 3 channels).")
  lines.append("All counts are XLA's cost_analysis()['flops'] (CPU backend): convs "
               "skip taps on the zero padding; XLA charges an FFT 8 prod_d log2(n_d) flops "
               "per input element (its own model, not 5 N log2 N); "
               "the MFC includes its 1x1 channel map and the symbol.")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.mfc_kernels",
                              description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=64, help="side of the filter images")
  p.add_argument("--length-scale", type=positive_float, default=1.0 / 20,
                 help="unit of the Figure 3 coefficients (fraction of the image side)")
  p.add_argument("--columns", type=int, default=5, help="panels per figure row")
  p.add_argument("--image-sizes", type=positive_int, nargs="+", default=list(IMAGE_SIZES))
  p.add_argument("--kernel-sizes", type=positive_int, nargs="+", default=list(KERNEL_SIZES))
  p.add_argument("--channels", type=positive_int, default=3)
  p.add_argument("--wide-channels", type=positive_int, default=128)
  p.add_argument("--no-backward", dest="backward", action="store_false",
                 help="skip the forward + backward counts")
  p.add_argument("--quick", action="store_true",
                 help="small run for tests: sizes 16 32, kernels 3 5 7, 8 wide channels, "
                      "forward only, 32x32 filters")
  p.add_argument("--workdir", default="runs/mfc_kernels")
  args = p.parse_args(argv)
  if args.quick:
    args.image_sizes, args.kernel_sizes = [16, 32], [3, 5, 7]
    args.wide_channels, args.backward, args.size, args.columns = 8, False, 32, 3
  if args.length_scale <= 0 or args.size < 4 or args.columns < 2:
    p.error("need --length-scale > 0, --size >= 4 and --columns >= 2")
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  plot_filters(workdir / "mfc_filters.png", args.size, args.length_scale, args.columns)
  t = flop_tables(args.image_sizes, args.kernel_sizes, args.channels, args.wide_channels,
                  args.backward)
  t["paper_table11"] = {k: [list(cell) for cell in v] for k, v in PAPER_TABLE11.items()}
  t["paper_formula"] = {"conv": {k: {n: paper_formula("conv", n, k) for n in IMAGE_SIZES}
                                 for k in KERNEL_SIZES},
                        "mfc": {n: paper_formula("mfc", n) for n in IMAGE_SIZES}}
  t["figure"] = {"size": args.size, "length_scale": args.length_scale,
                 "rows": figure3_coefficients(args.columns)}
  fft = lambda v: jnp.fft.irfft2(jnp.fft.rfft2(v, axes=(1, 2)), s=v.shape[1:3], axes=(1, 2))  # noqa: E731
  t["xla_fft_check"] = {n: {"xla": xla_flops(fft, jnp.zeros((1, n, n, args.channels))),
                            "model": xla_fft_model(n, args.channels)}
                        for n in args.image_sizes}
  t["jax_version"] = jax.__version__
  t["backend"] = jax.default_backend()
  text = markdown(t)
  (workdir / "flops.json").write_text(json.dumps(t, indent=2))
  (workdir / "flops.md").write_text(text + "\n")
  print(text)
  print(f"\nwrote {workdir / 'mfc_filters.png'}, {workdir / 'flops.json'}, "
        f"{workdir / 'flops.md'}")
  return t


if __name__ == "__main__":
  main()
