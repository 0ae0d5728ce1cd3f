"""Gradient discrepancy across meshes: Example 1 of the MFC paper (Tables 1-2).

A 1D periodic signal on ``[0, 1]`` is given on the finest mesh ``h = 1/N``
(cell centres ``x_j = (j + 1/2) h``) and carried to the meshes ``2^i h`` by
the restriction ``R`` (``--restriction``):

* ``average`` (default): the mean over blocks of ``2^i`` fine cells, i.e.
  ``i`` applications of the 2-point average ``(v_{2J} + v_{2J+1}) / 2``. This is
  the cell-centred analogue of full weighting (the ``[1, 2, 1] / 4`` stencil of
  vertex-centred grids) and the ``average`` restriction of
  :mod:`mgtrain.hierarchy`. It keeps integrals: a coarse value is the mean of
  the fine function over the coarse cell, so the fine noise stays the *same
  function* on every mesh;
* ``subsample``: injection, ``v_{2J}`` (every ``2^i``-th fine value).

On each mesh ``n_i = N / 2^i`` the linear loss of Eq. 15 is

  l_{2^i h}(theta) = (1 / n_i) (R u * theta)^T (R y),

with ``*`` either

* (a) a standard 1D convolution of kernel size 3 (periodic cross-correlation,
  Eq. 30), ``theta in R^3``; its gradient is the correlation of Eq. 31,
  ``g_s = (1/n) sum_j y_j u_{j+s}``, ``s = -1, 0, 1``; or
* (b) a 1D mesh-free convolution, the ``ky = 0`` section of Eq. 21,

    S(k) = (g0 + i k gx) exp(-tau a k^2),     k = 2 pi m,

  applied as ``irfft(S * rfft(u))`` with the physical frequencies of
  :func:`mgtrain.nn.meshfree.physical_frequencies` and the parametrisation of
  :func:`mgtrain.nn.meshfree.coefficients` (``tau = exp(raw_tau)``,
  ``a = length_scale^2 exp(2 l_xx)``, ``gx`` in units of ``length_scale``).
  The gradient is taken with respect to the four raw parameters that act in
  1D, ``xi = (raw_tau, l_xx, g0, gx)``; they mean the same operator on every
  mesh.

Both gradients come from :func:`jax.grad` (float64). The discrepancy of
Eq. 16 is

  delta g(2^i h) = || grad l_{2^i h} - grad l_{2^{i+1} h} ||^2,

reported in the column ``2^i h``, so the six columns ``1/1024 ... 1/32`` of
Tables 1-2 use the seven meshes ``n = 1024, ..., 16``. Each row also gets the
fitted order ``p`` of ``delta g ~ h^p`` (least squares in log-log; ``p > 0``
means the discrepancy decays as ``h -> 0``), over all columns and over the
three finest ones (the asymptotic regime).

Inputs (chosen here; the paper does not give its signals):

* smooth: ``u = sin(2 pi x) + cos(4 pi x) / 2 + sin(6 pi x + 1) / 4`` and
  ``y = cos(2 pi x) + cos(4 pi x) / 2 - cos(6 pi x + 1) / 4``, sampled at the
  fine cell centres (``int y u' != 0``, so the stencil's shifted taps see a
  first-order mesh dependence, Lemma 1);
* noisy: the same plus ``N(0, 1)`` noise drawn on the finest mesh and then
  restricted, averaged over ``--draws`` draws. Two rows: noise on ``u`` and
  ``y`` (independent draws; the row compared with the paper's "Noisy input"),
  and noise on ``u`` only.

Why both noisy rows. The loss is a correlation of ``C u`` with ``y``; in
Fourier, ``l = sum_k S(k) conj(y^(k)) u^(k)`` (Eq. 23). If ``y`` is smooth,
``y^`` vanishes at high ``k`` and the noise in ``u`` is projected out whatever
the kernel, so *both* kernels converge (the ``u``-only row). When ``y`` is
rough too (as the back-propagated residual of a noisy problem is), every mode
up to the mesh's Nyquist frequency enters. A 3-tap stencil weights mode ``k``
by ``exp(i k s h)``, of modulus one at every ``k``: its physical width shrinks
with ``h``, so each refinement adds a new band of noise modes at full weight
and the discrepancy does not decay (with ``average`` it grows like ``h^-1``:
the restricted noise has variance ``n / N`` and ``(1/n) sum_j e^y_j e^u_{j+s}``
has variance ``n / N^2``). The MFC weights them by ``exp(-tau a k^2)``, so the
new modes are exponentially damped and its gradients converge (Lemma 3).

What to expect. The noisy standard-conv row is a decaying smooth part
(``~ h^2``) plus the growing noise part (``~ h^-1``), so for ``N = 1024`` it
first falls then rises as ``h -> 0``: read its order on the finest columns.
Eq. 16 is a *squared* norm, so Lemma 1's ``O(h)`` gives order 2 for smooth
data with the standard conv; the MFC's smooth row is order 4 with ``average``
(the restriction damps mode ``k`` by ``~ 1 - (k H)^2 / 24``) and at round-off
with ``subsample`` (sampled trigonometric polynomials have exact DFTs). With
``subsample`` the noise on each coarse mesh is a fresh, unit-variance sample,
not a fixed function, and both convolutions' noisy rows decay like ``h``.

Usage::

  python -m experiments.gradient_discrepancy                   # N = 1024, 128 draws
  python -m experiments.gradient_discrepancy --restriction subsample
  python -m experiments.gradient_discrepancy --quick --workdir /tmp/gd

Writes ``results.json``, ``tables.md`` and ``gradient_discrepancy.png`` into
``--workdir`` and prints the two tables beside the paper's rows.

Example:
  >>> import numpy as np
  >>> restrict(np.arange(8.0), 4)            # 2-point averages
  array([0.5, 2.5, 4.5, 6.5])
  >>> restrict(np.arange(8.0), 2, "subsample")
  array([0., 4.])
  >>> round(fitted_order([1 / 64, 1 / 32, 1 / 16], [1.0, 4.0, 16.0]), 6)
  2.0
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)
from experiments.cli import positive_float

import jax
import jax.numpy as jnp
import numpy as np

from mgtrain.nn import meshfree

RESTRICTIONS = ("average", "subsample")
CONV_TYPES = ("conv", "mfc")
CONV_NAMES = {"conv": "standard 1D conv, kernel 3", "mfc": "1D mesh-free conv"}
ROWS = ("noisy_uy", "noisy_u", "smooth")
ROW_NAMES = {"noisy_uy": "Noisy input (u, y + N(0,1))",
             "noisy_u": "Noisy input (u + N(0,1) only)",
             "smooth": "Smooth input"}
# Tables 1 and 2 of the MFC paper, columns 1/1024, 1/512, ..., 1/32.
PAPER_RESOLUTIONS = (1024, 512, 256, 128, 64, 32)
PAPER = {
    "conv": {"noisy": (9.3e-3, 7.1e-3, 4.9e-3, 2.8e-3, 2.0e-3, 1.7e-3),
             "smooth": (1.2e-4, 2.5e-4, 5.1e-4, 1.0e-3, 1.9e-3, 3.7e-3)},
    "mfc": {"noisy": (1.6e-4, 3.2e-4, 6.1e-4, 1.3e-3, 2.9e-3, 5.9e-3),
            "smooth": (1.1e-4, 2.1e-4, 4.2e-4, 7.8e-4, 1.5e-3, 3.1e-3)},
}
PAPER_TABLE = {"conv": "Table 1", "mfc": "Table 2"}


# ---------------------------------------------------------------- meshes and signals
def mesh_sizes(finest: int, columns: int) -> tuple[int, ...]:
  """The ``columns + 1`` meshes ``finest, finest / 2, ...`` (each a power of two)."""
  if columns < 1:
    raise ValueError(f"need at least one column, got {columns}")
  if finest < 2 ** (columns + 1) or finest & (finest - 1):
    raise ValueError(f"finest mesh {finest} must be a power of two >= 2^(columns + 1) "
                     f"= {2 ** (columns + 1)}")
  return tuple(finest >> i for i in range(columns + 1))


def cell_centres(n: int) -> np.ndarray:
  """``x_j = (j + 1/2) / n``, the cell centres of the ``n``-cell mesh of ``[0, 1]``."""
  return (np.arange(n) + 0.5) / n


def smooth_signals(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The smooth ``(u, y)`` of the module docstring at the cell centres of mesh ``n``."""
  x = cell_centres(n)
  u = (np.sin(2 * np.pi * x) + 0.5 * np.cos(4 * np.pi * x)
       + 0.25 * np.sin(6 * np.pi * x + 1.0))
  y = (np.cos(2 * np.pi * x) + 0.5 * np.cos(4 * np.pi * x)
       - 0.25 * np.cos(6 * np.pi * x + 1.0))
  return u, y


def restrict(v, n: int, mode: str = "average"):
  """``R_h^{H}``: carries ``v`` (``(..., N)``) to the ``n``-cell mesh, ``N / n = 2^i``.

  ``average`` is the block mean, equal to ``i`` nested 2-point averages;
  ``subsample`` keeps every ``N / n``-th value (injection).
  """
  big = v.shape[-1]
  if big % n:
    raise ValueError(f"cannot restrict {big} cells to {n}")
  factor = big // n
  if mode == "average":
    return v.reshape(v.shape[:-1] + (n, factor)).mean(-1)
  if mode == "subsample":
    return v[..., ::factor]
  raise ValueError(f"unknown restriction {mode!r}; choose from {RESTRICTIONS}")


# ---------------------------------------------------------------- the two losses (Eq. 15, 22)
def conv_loss(theta: jnp.ndarray, u: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Eq. 15/30: ``(1/n) (u * theta)^T y`` with a periodic 3-tap cross-correlation.

  ``(u * theta)_j = theta_0 u_{j-1} + theta_1 u_j + theta_2 u_{j+1}`` (indices mod n).
  """
  n = u.shape[-1]
  padded = jnp.concatenate([u[-1:], u, u[:1]])
  out = jax.lax.conv_general_dilated(padded[None, None], theta[None, None], (1,), "VALID")
  return out[0, 0] @ y / n


def mfc_raw(xi: jnp.ndarray) -> jnp.ndarray:
  """The 7 raw MFC parameters of :mod:`mgtrain.nn.meshfree` from the 1D ones.

  ``xi = (raw_tau, l_xx, g0, gx)``; ``l_xy = l_yy = gy = 0`` (they only act
  through ``ky``, which is 0 in 1D).
  """
  zero = jnp.zeros((), xi.dtype)
  return jnp.stack([xi[0], xi[1], zero, zero, xi[2], xi[3], zero])


def mfc_loss(xi: jnp.ndarray, u: jnp.ndarray, y: jnp.ndarray,
             length_scale: float) -> jnp.ndarray:
  """Eq. 22 in 1D: ``(1/n) y^T C(xi) u`` with ``C = irfft(S(k) rfft(.))``.

  ``S`` is :func:`mgtrain.nn.meshfree.symbol` at ``ky = 0``; the derivative
  part is zeroed at the Nyquist mode, which in 1D is the same as the average
  over ``+-k_N`` that :func:`~mgtrain.nn.meshfree.heat_filter` uses.
  """
  n = u.shape[-1]
  coeffs = meshfree.coefficients(mfc_raw(xi), length_scale)
  k = meshfree.physical_frequencies(n, 1.0 / n, real=True)
  odd_mask = jnp.ones_like(k).at[n // 2].set(0.0)
  s = meshfree.symbol(coeffs, jnp.zeros((), k.dtype), k, odd_mask)
  out = jnp.fft.irfft(s * jnp.fft.rfft(u), n=n)
  return out @ y / n


# ---------------------------------------------------------------- discrepancies
def discrepancies(grads) -> np.ndarray:
  """Eq. 16 for consecutive meshes: ``grads`` is ``(levels, ..., P)`` (finest first).

  Returns ``(levels - 1, ...)``: ``||g_i - g_{i+1}||^2`` over the last axis.
  """
  g = np.asarray(grads)
  return np.sum((g[:-1] - g[1:]) ** 2, axis=-1)


def fitted_order(h, dg) -> float:
  """Least-squares slope ``p`` of ``log dg = p log h + c`` (``dg ~ h^p``)."""
  lh, ld = np.log(np.asarray(h, float)), np.log(np.asarray(dg, float))
  return float(np.polyfit(lh, ld, 1)[0])


# Discrepancies below this are float64 round-off of O(1) gradients (eps^2 ~ 5e-32
# per component, summed over the sums of Eq. 31/23); no order is fitted to them.
ROUNDOFF = 1e-24


def _order(h, dg) -> float | None:
  if len(h) < 2 or max(dg) < ROUNDOFF:
    return None
  return fitted_order(h, dg)


@functools.partial(jax.jit, static_argnums=4)
def _all_gradients(theta, xi, us, ys, length_scale):
  """Batched gradients of both losses on every mesh, in one compilation.

  ``us, ys``: tuples (one entry per mesh) of ``(batch, n)`` arrays. Returns
  ``(conv_grads, mfc_grads)``, tuples of ``(batch, 3)`` and ``(batch, 4)``.
  """
  g_conv = jax.vmap(jax.grad(conv_loss), in_axes=(None, 0, 0))
  g_mfc = jax.vmap(jax.grad(mfc_loss), in_axes=(None, 0, 0, None))
  return (tuple(g_conv(theta, u, y) for u, y in zip(us, ys)),
          tuple(g_mfc(xi, u, y, length_scale) for u, y in zip(us, ys)))


def default_mfc_params(length_scale: float) -> dict:
  """The MFC point at which gradients are taken: ``tau = 1/2``, ``a = length_scale^2``,
  ``g0 = 1``, ``gx = length_scale`` (filter width ``sqrt(2 tau a) = length_scale``)."""
  return {"raw_tau": math.log(0.5), "l_xx": 0.0, "g0": 1.0, "gx": 1.0,
          "tau": 0.5, "a": length_scale ** 2, "gx_physical": length_scale}


def compute(finest: int = 1024, columns: int = 6, draws: int = 128, seed: int = 0,
            restriction: str = "average", length_scale: float = 1.0 / 16) -> dict:
  """Runs Example 1 for both convolutions and the three input rows.

  Returns a dict with ``meshes``, ``h`` (the column resolutions ``2^i h``),
  ``delta_g[conv_type][row]`` (lists, finest column first, noisy rows averaged
  over the draws), their standard errors and the fitted orders.
  """
  if restriction not in RESTRICTIONS:
    raise ValueError(f"unknown restriction {restriction!r}; choose from {RESTRICTIONS}")
  if draws < 1:
    raise ValueError(f"need at least one noise draw, got {draws}")
  meshes = mesh_sizes(finest, columns)
  h = [1.0 / n for n in meshes[:-1]]
  mfc = default_mfc_params(length_scale)
  with jax.enable_x64(True):
    theta = jnp.zeros((3,), jnp.float64)   # l is linear in theta: its gradient is theta-free
    xi = jnp.array([mfc["raw_tau"], mfc["l_xx"], mfc["g0"], mfc["gx"]], jnp.float64)
    u0, y0 = smooth_signals(finest)
    rng = np.random.default_rng(seed)
    eu = rng.standard_normal((draws, finest))
    ey = rng.standard_normal((draws, finest))
    # All rows in one batch: [smooth | noisy u | noisy u, y].
    u_all = np.concatenate([u0[None], u0 + eu, u0 + eu])
    y_all = np.concatenate([y0[None], np.broadcast_to(y0, eu.shape), y0 + ey])
    slices = {"smooth": slice(0, 1), "noisy_u": slice(1, 1 + draws),
              "noisy_uy": slice(1 + draws, 1 + 2 * draws)}
    grads = _all_gradients(theta, xi,
                           tuple(jnp.asarray(restrict(u_all, n, restriction)) for n in meshes),
                           tuple(jnp.asarray(restrict(y_all, n, restriction)) for n in meshes),
                           length_scale)
    delta, stderr, grads_out = {}, {}, {}
    for ct, g_ct in zip(CONV_TYPES, grads):
      g_all = np.stack([np.asarray(g) for g in g_ct])      # (levels, batch, P)
      delta[ct], stderr[ct], grads_out[ct] = {}, {}, {}
      for row in ROWS:
        g = g_all[:, slices[row]]
        dg = discrepancies(g)                                 # (columns, draws)
        delta[ct][row] = dg.mean(-1).tolist()
        stderr[ct][row] = (dg.std(-1, ddof=1) / math.sqrt(dg.shape[-1])
                           if dg.shape[-1] > 1 else np.zeros(dg.shape[0])).tolist()
        grads_out[ct][row] = g.mean(1).tolist()
  fine = min(3, len(h))
  orders = {ct: {row: {"all": _order(h, delta[ct][row]),
                       f"finest_{fine}": _order(h[:fine], delta[ct][row][:fine])}
                 for row in ROWS} for ct in CONV_TYPES}
  paper_orders = {ct: {row: fitted_order([1.0 / r for r in PAPER_RESOLUTIONS], vals)
                       for row, vals in PAPER[ct].items()} for ct in CONV_TYPES}
  return {"finest": finest, "meshes": list(meshes), "h": h, "columns": [f"1/{n}" for n in meshes[:-1]],
          "draws": draws, "seed": seed, "restriction": restriction,
          "length_scale": length_scale, "mfc_params": mfc,
          "delta_g": delta, "delta_g_stderr": stderr, "orders": orders,
          "mean_gradients": grads_out,
          "paper": {ct: {row: list(v) for row, v in PAPER[ct].items()} for ct in CONV_TYPES},
          "paper_orders": paper_orders}


# ---------------------------------------------------------------- reporting
def _fmt(v: float) -> str:
  return f"{v:.2e}"


def _fmt_order(p: float | None) -> str:
  return "n/a (round-off)" if p is None else f"{p:+.2f}"


def table(results: dict, conv_type: str) -> str:
  """One Markdown table in the layout of Table 1 (``conv``) or Table 2 (``mfc``)."""
  cols = results["columns"]
  fine_key = [k for k in results["orders"][conv_type]["smooth"] if k != "all"][0]
  nfine = fine_key.split("_")[1]
  lines = [f"{PAPER_TABLE[conv_type]} layout, {CONV_NAMES[conv_type]}: "
           f"delta g = ||grad l_(2^i h) - grad l_(2^(i+1) h)||^2 in column 2^i h "
           f"(restriction: {results['restriction']}, {results['draws']} noise draws)",
           "",
           "| Resolution | " + " | ".join(cols) + f" | order p (all) | order p (finest {nfine}) |",
           "|---|" + "---|" * (len(cols) + 2)]
  for row in ROWS:
    vals = results["delta_g"][conv_type][row]
    o = results["orders"][conv_type][row]
    lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(_fmt(v) for v in vals)
                 + f" | {_fmt_order(o['all'])} | {_fmt_order(o[fine_key])} |")
  for row in ("noisy", "smooth"):
    paper = dict(zip((f"1/{r}" for r in PAPER_RESOLUTIONS), PAPER[conv_type][row]))
    lines.append(f"| paper {PAPER_TABLE[conv_type]}, {row} | "
                 + " | ".join(_fmt(paper[c]) if c in paper else "-" for c in cols)
                 + f" | {results['paper_orders'][conv_type][row]:+.2f} | - |")
  lines.append("")
  lines.append("order p: least-squares slope of log(delta g) against log(h); p > 0 "
               "decays as h -> 0.")
  return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  h = np.asarray(results["h"])
  paper_h = np.array([1.0 / r for r in PAPER_RESOLUTIONS])
  colors = {"noisy_uy": "C3", "noisy_u": "C1", "smooth": "C0"}
  for ax, ct in zip(axes, CONV_TYPES):
    for row in ROWS:
      ax.loglog(h, results["delta_g"][ct][row], "o-", color=colors[row], label=ROW_NAMES[row])
    for row, color in (("noisy", "C3"), ("smooth", "C0")):
      ax.loglog(paper_h, PAPER[ct][row], "x--", color=color, alpha=0.6,
                label=f"paper {PAPER_TABLE[ct]}, {row}")
    ax.set_title(f"{CONV_NAMES[ct]} ({results['restriction']})")
    ax.set_xlabel("mesh size 2^i h (pair 2^i h vs 2^(i+1) h)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("delta g (Eq. 16)")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.gradient_discrepancy",
                              description=__doc__.splitlines()[0])
  p.add_argument("--finest", type=int, default=1024, help="cells of the finest mesh")
  p.add_argument("--columns", type=int, default=6,
                 help="number of discrepancies (meshes: finest ... finest / 2^columns)")
  p.add_argument("--draws", type=int, default=128, help="noise draws averaged per row")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--restriction", choices=RESTRICTIONS, default="average")
  p.add_argument("--length-scale", type=positive_float, default=1.0 / 16,
                 help="MFC unit and filter width (fraction of the domain)")
  p.add_argument("--quick", action="store_true",
                 help="small run for tests: finest 256, 4 columns, 32 draws")
  p.add_argument("--workdir", default="runs/gradient_discrepancy")
  args = p.parse_args(argv)
  if args.quick:
    args.finest, args.columns, args.draws = 256, 4, 32
  try:
    results = compute(args.finest, args.columns, args.draws, args.seed,
                      args.restriction, args.length_scale)
  except ValueError as e:
    p.error(str(e))
  text = table(results, "conv") + "\n\n" + table(results, "mfc")
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  (workdir / "tables.md").write_text(text + "\n")
  plot(results, workdir / "gradient_discrepancy.png")
  print(text)
  print(f"\nwrote {workdir / 'results.json'}, {workdir / 'tables.md'}, "
        f"{workdir / 'gradient_discrepancy.png'}")
  return results


if __name__ == "__main__":
  main()
