"""Mesh-free convolution: continuous operator, mesh independence, ellipticity, Lemma 4."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mgtrain.nn import init_params, meshfree
from mgtrain.nn.convs import get_conv
from mgtrain.nn.meshfree import MeshFreeConv, coefficients, heat_filter
from mgtrain.nn.resnet import ResNet, count_params


def _grid(n):
  x = (np.arange(n) + 0.5) / n
  return np.meshgrid(x, x, indexing="ij")   # (Y, X): rows are y, columns x


def _raw(tau, l_xx, l_xy, l_yy, g0, gx, gy):
  return jnp.array([[np.log(tau), l_xx, l_xy, l_yy, g0, gx, gy]], jnp.float32)


def test_gaussian_matches_closed_form_heat_solution():
  # A Gaussian of covariance s^2 I evolved by v_t = div(A grad v) for time tau
  # is a Gaussian of covariance s^2 I + 2 tau A (mass preserved); then
  # v = g0 v + gx dv/dx + gy dv/dy. sigma is small, so periodic images are negligible.
  n, s, centre = 256, 0.05, 0.5
  raw = _raw(0.3, np.log(0.05), 0.02, np.log(0.04), 0.7, 0.3, -0.2)
  c = coefficients(raw)
  yy, xx = _grid(n)
  u = np.exp(-((xx - centre) ** 2 + (yy - centre) ** 2) / (2 * s * s))
  out = np.asarray(heat_filter(jnp.asarray(u, jnp.float32)[None, :, :, None], raw))[0, :, :, 0]

  a = np.array([[c.a_xx[0], c.a_xy[0]], [c.a_xy[0], c.a_yy[0]]], np.float64)
  sigma = s * s * np.eye(2) + 2 * float(c.tau[0]) * a
  inv = np.linalg.inv(sigma)
  d = np.stack([xx - centre, yy - centre], -1)
  v = s * s / np.sqrt(np.linalg.det(sigma)) * np.exp(
      -0.5 * np.einsum("...i,ij,...j->...", d, inv, d))
  grad = -np.einsum("ij,...j->...i", inv, d) * v[..., None]
  ref = float(c.g0[0]) * v + float(c.gx[0]) * grad[..., 0] + float(c.gy[0]) * grad[..., 1]
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err < 1e-5, err


def test_symbol_is_eq_21_on_a_single_fourier_mode():
  # A single mode e^{i k.x} is an eigenfunction: the response is S(k) e^{i k.x}.
  n, mx, my = 64, 3, -2
  raw = _raw(0.5, np.log(0.03), -0.01, np.log(0.02), 0.4, 0.05, 0.08)
  c = coefficients(raw)
  yy, xx = _grid(n)
  kx, ky = 2 * np.pi * mx, 2 * np.pi * my
  phase = kx * xx + ky * yy
  out_cos = np.asarray(heat_filter(jnp.asarray(np.cos(phase), jnp.float32)[None, ..., None], raw))
  quad = c.a_xx[0] * kx ** 2 + 2 * c.a_xy[0] * kx * ky + c.a_yy[0] * ky ** 2
  sym = (float(c.g0[0]) + 1j * (float(c.gx[0]) * kx + float(c.gy[0]) * ky)) * np.exp(
      -float(c.tau[0]) * float(quad))
  expected = np.real(sym * np.exp(1j * phase))
  np.testing.assert_allclose(out_cos[0, :, :, 0], expected, atol=1e-5)


@pytest.mark.parametrize("pairwise", [False, True])
def test_low_frequency_response_is_mesh_independent(pairwise):
  layer = MeshFreeConv(4, length_scale=1 / 8, pairwise=pairwise)
  params = init_params(layer, jax.random.key(0), jnp.zeros((1, 32, 32, 2)))
  samples = []
  for n in (32, 64, 128, 256):
    yy, xx = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    u = np.stack([np.sin(2 * np.pi * xx) + np.cos(2 * np.pi * (xx + 2 * yy)),
                  np.cos(4 * np.pi * yy)], -1)
    out = np.asarray(jax.jit(layer.apply)(params, jnp.asarray(u, jnp.float32)[None]))[0]
    samples.append(out[:: n // 8, :: n // 8])   # the same 8x8 physical points
  for s in samples[1:]:
    np.testing.assert_allclose(s, samples[0], atol=2e-5)


def test_standard_conv_is_not_mesh_independent():
  # The contrast the MFC paper draws: a 3x3 stencil's physical width is 3h, so
  # the same weights give another operator on another mesh.
  layer = get_conv("standard")(4, 3)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 32, 32, 2)))
  samples = []
  for n in (32, 64):
    yy, xx = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    u = np.stack([np.sin(2 * np.pi * xx), np.cos(4 * np.pi * yy)], -1)
    out = np.asarray(layer.apply(params, jnp.asarray(u, jnp.float32)[None]))[0]
    samples.append(out[n // 4:3 * n // 4:n // 8, n // 4:3 * n // 4:n // 8])   # interior
  assert np.abs(samples[0] - samples[1]).max() > 1e-2


def test_ellipticity_holds_for_any_raw_parameters():
  raw = 8.0 * jax.random.normal(jax.random.key(3), (10_000, 7))
  c = coefficients(raw, length_scale=0.1)
  assert (np.asarray(c.tau) > 0).all() and (np.asarray(c.a_xx) > 0).all()
  assert (np.asarray(c.a_yy) > 0).all() and (np.asarray(c.schur) > 0).all()
  # det = a_xx * schur = ls^4 exp(2 l_xx + 2 l_yy): positive by construction.
  r64 = np.asarray(raw, np.float64)
  np.testing.assert_allclose(np.asarray(c.a_xx, np.float64) * np.asarray(c.schur, np.float64),
                             np.exp(4 * np.log(0.1) + 2 * r64[:, 1] + 2 * r64[:, 3]), rtol=1e-4)
  # Where float32 can resolve it, a_xx a_yy - a_xy^2 agrees with that determinant.
  moderate = np.abs(r64[:, 1:4]).max(axis=1) < 2
  a_xx, a_xy, a_yy = (np.asarray(x, np.float64)[moderate] for x in (c.a_xx, c.a_xy, c.a_yy))
  np.testing.assert_allclose(a_xx * a_yy - a_xy ** 2,
                             np.exp(4 * np.log(0.1) + 2 * r64[moderate, 1] + 2 * r64[moderate, 3]),
                             rtol=1e-3)
  # The quadratic form of the symbol is never negative, so |S| <= |g0 + i k.g|.
  k = 300.0 * jax.random.normal(jax.random.key(4), (2, 10_000))
  s = meshfree.symbol(c, k[0], k[1])
  bound = np.abs(np.asarray(c.g0) + 1j * (np.asarray(c.gx) * np.asarray(k[1])
                                          + np.asarray(c.gy) * np.asarray(k[0])))
  assert (np.abs(np.asarray(s)) <= bound * (1 + 1e-5) + 1e-30).all()


def test_gradients_match_finite_differences():
  layer = MeshFreeConv(3, length_scale=1 / 6, padding=0.125)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 2))
  params = init_params(layer, jax.random.key(2), x)

  @jax.jit
  def loss(p):
    return jnp.sum(jnp.sin(layer.apply(p, x)))

  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = x.astype(jnp.float64)
    check_grads(loss, (p64,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    grads = jax.grad(loss)(p64)
  # Gradients reach R and all 7 raw parameters of every channel.
  sym = np.asarray(grads["params"]["symbol"])
  assert sym.shape == (3, 7) and (np.abs(sym) > 0).all()
  assert np.abs(np.asarray(grads["params"]["channel_map"]["kernel"])).min() > 0


def _plain_filter(v, raw, pad, pairwise):
  """``irfft2(S * rfft2(v))`` written plainly (NHWC, axes 1-2), left to JAX's autodiff."""
  height, width = v.shape[1:3]
  x = jnp.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ph, pw = x.shape[1:3]
  s = meshfree.discrete_symbol(meshfree.coefficients(raw, 0.2), ph, pw,
                               (1.0 / height, 1.0 / width))
  spec = jnp.fft.rfft2(x, axes=(1, 2))
  spec = jnp.einsum("bhwi,hwio->bhwo", spec, s) if pairwise else spec * s
  out = jnp.fft.irfft2(spec, s=(ph, pw), axes=(1, 2))
  return out[:, pad:pad + height, pad:pad + width]


def _check_against_plain_formula(height, width, pad, pairwise, batch=2, fft_chunk_bytes=None,
                                 channels=3, channels_first=False, pack_images=None):
  """:func:`heat_filter` (or, with ``channels_first``, :func:`heat_filter_channels_first`
  between transposes) against :func:`_plain_filter`: values and both gradients."""
  c_in, c_out = channels, (4 if pairwise else channels)
  shape = (c_in, c_out, 7) if pairwise else (c_in, 7)

  def loss(f):
    return lambda v, raw: jnp.sum(jnp.sin(f(v, raw)) * target)

  plain = lambda v, raw: _plain_filter(v, raw, pad, pairwise)   # noqa: E731
  if channels_first:
    mine = lambda v, raw: meshfree.heat_filter_channels_first(   # noqa: E731
        v.transpose(3, 0, 1, 2), raw, length_scale=0.2, pad=pad,
        fft_chunk_bytes=fft_chunk_bytes, pack_images=pack_images).transpose(1, 2, 3, 0)
  else:
    mine = lambda v, raw: heat_filter(v, raw, length_scale=0.2, pad=pad, pairwise=pairwise,   # noqa: E731
                                      fft_chunk_bytes=fft_chunk_bytes, pack_images=pack_images)
  with jax.enable_x64(True):
    raw = meshfree.init_raw(jax.random.key(0), shape[:-1], jnp.float64)
    v = jax.random.normal(jax.random.key(1), (batch, height, width, c_in), jnp.float64)
    target = jax.random.normal(jax.random.key(2), (batch, height, width, c_out), jnp.float64)
    # Jitted: run op by op, each of these small programs compiles every op
    # on its own (10-14 s per case on 2 cores instead of about 2 s).
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(v, raw)
    got = jax.jit(jax.grad(loss(mine), argnums=(0, 1)))(v, raw)
    np.testing.assert_allclose(jax.jit(mine)(v, raw), jax.jit(plain)(v, raw),
                               rtol=1e-12, atol=1e-12)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("height,width,pad,pairwise", [
    (16, 16, 0, False), (15, 13, 0, False), (12, 10, 3, False), (16, 12, 0, True), (9, 11, 2, True)])
def test_closed_form_adjoint_matches_autodiff_of_the_plain_formula(height, width, pad, pairwise):
  """The hand-written backward pass equals JAX's own derivative of
  ``irfft2(S * rfft2(v))`` (transpose rules of rfft/irfft), for even and odd
  meshes, with padding, per channel and pairwise."""
  _check_against_plain_formula(height, width, pad, pairwise, fft_chunk_bytes=0)


@pytest.mark.parametrize("height,width,pad,pairwise,chunk", [
    (16, 16, 0, False, "one plane"), (12, 10, 3, False, "two images of a channel"),
    (9, 11, 2, False, "two whole channels"), (16, 12, 0, True, "one plane"),
    (9, 11, 2, True, "two images")])
def test_chunked_ffts_match_the_plain_formula(height, width, pad, pairwise, chunk):
  """The FFTs run chunk by chunk give the values and gradients of the plain
  formula, symbol gradients summed across chunks. Per channel the chunks
  lie along the channels-first layout (one plane, two of a channel's
  images, or two channels with all their images); pairwise filters always
  run whole images."""
  c = 4
  plane = (height + 2 * pad) * ((width + 2 * pad) // 2 + 1) * 16   # complex128
  chunk_bytes = {"one plane": 1, "two images of a channel": 2 * plane,
                 "two whole channels": 2 * 4 * plane, "two images": 2 * c * plane}[chunk]
  expected = {"one plane": (1, 1) if not pairwise else (1, 4), "two images of a channel": (2, 1),
              "two whole channels": (4, 2), "two images": (2, 4)}[chunk]
  assert meshfree.fft_chunking(4, c, height + 2 * pad, width + 2 * pad, pairwise=pairwise,
                               chunk_bytes=chunk_bytes, itemsize=16) == expected
  if not pairwise:
    # Images of one channel are cut from rows, whole channels from stacked chunks.
    images, channels = expected
    assert meshfree._cuts_rows((c, 4, height, width), channels, images) == (
        chunk != "two whole channels")
  _check_against_plain_formula(height, width, pad, pairwise, batch=4, fft_chunk_bytes=chunk_bytes,
                               channels=3 if pairwise else c)


def _fft_types(f, *args):
  """The ``fft_type`` of every FFT in ``f``'s jaxpr, loop bodies included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "fft":
        found.append(jax.lax.FftType(eqn.params["fft_type"]))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(f)(*args).jaxpr)
  return set(found)


@pytest.mark.parametrize("height,width,pad,batch,chunk_bytes", [
    (16, 16, 0, 2, 0), (15, 13, 0, 4, 0), (12, 10, 3, 6, 0),
    (12, 10, 3, 4, 2 * 8 * 7 * 16), (9, 11, 2, 4, 2 * 4 * 13 * 8 * 16)])
@pytest.mark.parametrize("pack_images", [True, False])
def test_images_packed_two_to_a_complex_transform_match_the_plain_formula(
    height, width, pad, batch, chunk_bytes, pack_images):
  """Two images per complex FFT (``pack_images``) or one per real FFT, the
  filter's values and both gradients are the plain formula's: even and odd
  meshes, padding, unchunked and in chunks of two images or of two whole
  channels (the images pair up within a chunk)."""
  _check_against_plain_formula(height, width, pad, False, batch=batch, channels=4,
                               fft_chunk_bytes=chunk_bytes, pack_images=pack_images)


def test_packing_runs_complex_transforms_only_where_images_pair_up():
  raw = meshfree.init_raw(jax.random.key(0), (3,))
  complex_types = {jax.lax.FftType.FFT, jax.lax.FftType.IFFT}
  real_types = {jax.lax.FftType.RFFT, jax.lax.FftType.IRFFT}

  def types(batch, **kwargs):
    v = jnp.ones((batch, 8, 8, 3))
    return _fft_types(jax.grad(lambda v: jnp.sum(heat_filter(v, raw, **kwargs) ** 2)), v)

  assert types(4, pack_images=True) == complex_types
  assert types(4, pack_images=False) == real_types
  assert types(3, pack_images=True) == real_types                        # odd batch
  assert types(4, pack_images=True, fft_chunk_bytes=1) == real_types     # one image a chunk
  plane = 8 * 5 * 8
  assert types(4, pack_images=True, fft_chunk_bytes=2 * plane) == complex_types
  # On CPU, packing is the default.
  assert types(4) == complex_types
  pairwise_raw = meshfree.init_raw(jax.random.key(0), (3, 3))
  assert _fft_types(lambda v: heat_filter(v, pairwise_raw, pairwise=True, pack_images=True),
                    jnp.ones((4, 8, 8, 3))) == real_types
  assert meshfree.packs_images(16) and not meshfree.packs_images(16, pack_images=False)
  assert not meshfree.packs_images(16, pairwise=True, pack_images=True)
  # What the layer reports (the benchmark's table) is what its filter runs.
  x = jnp.ones((4, 8, 8, 3))
  for layer in (MeshFreeConv(3), MeshFreeConv(3, pack_images=False),
                MeshFreeConv(3, fft_chunk_bytes=1), MeshFreeConv(3, pairwise=True)):
    params = layer.init(jax.random.key(0), x)
    ran = _fft_types(lambda v: layer.apply(params, v), x)
    assert layer.packs_images(x.shape) == (ran == {jax.lax.FftType.FFT, jax.lax.FftType.IFFT})


@pytest.mark.parametrize("height,width", [(8, 8), (7, 6), (6, 9)])
def test_hermitian_extension_and_folding_against_full_spectra(height, width):
  """The full-grid symbol is the spectrum of a real kernel, and folding a
  packed pair's ``fft2(a + i b) conj(fft2(c + i d))`` gives
  ``rfft2(a) conj(rfft2(c)) + rfft2(b) conj(rfft2(d))``, both checked
  against numpy's FFTs."""
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((height, width))
  a, b, c, d = rng.standard_normal((4, height, width))
  packed = np.fft.fft2(a + 1j * b) * np.conj(np.fft.fft2(c + 1j * d))
  want = (np.fft.rfft2(a) * np.conj(np.fft.rfft2(c)) + np.fft.rfft2(b) * np.conj(np.fft.rfft2(d)))
  with jax.enable_x64(True):
    extended = meshfree._hermitian_extension(jnp.asarray(np.fft.rfft2(kernel)), width)
    folded = meshfree._fold_to_rfft_grid(jnp.asarray(packed), width)
  np.testing.assert_allclose(extended, np.fft.fft2(kernel), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(folded, want, rtol=1e-12, atol=1e-12)


def test_mesh_free_conv_packed_or_not_gives_the_same_output_and_gradient():
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  plain = MeshFreeConv(5, pack_images=False)
  params = plain.init(jax.random.key(1), x)
  packed = MeshFreeConv(5, pack_images=True)

  def run(layer):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x)))))(params)

  (want, want_grad), (got, got_grad) = run(plain), run(packed)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def test_zero_padding_removes_wraparound():
  n = 32
  u = np.zeros((1, n, n, 1), np.float32)
  u[0, n // 2, 1, 0] = 1.0            # next to the left edge
  raw = _raw(0.5, np.log(0.08), 0.0, np.log(0.08), 1.0, 0.0, 0.0)
  periodic = np.asarray(heat_filter(jnp.asarray(u), raw))[0, :, :, 0]
  padded = np.asarray(heat_filter(jnp.asarray(u), raw, pad=n // 2))[0, :, :, 0]
  right = slice(n - 3, n)
  assert periodic[n // 2, right].max() > 0.2 * periodic.max()     # wrapped around
  assert padded[n // 2, right].max() < 1e-3 * padded.max()
  # Away from the boundary the two agree.
  np.testing.assert_allclose(padded[n // 2, 1:6], periodic[n // 2, 1:6], rtol=0.2)


def test_pairwise_with_identity_channels_equals_depthwise():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  raw = meshfree.init_raw(jax.random.key(1), (3,), width=1.0)
  depthwise = jax.jit(lambda x, raw: heat_filter(x, raw, length_scale=0.1))(x, raw)
  big = jnp.full((3, 3, 7), 0.0).at[:, :, 0].set(-50.0)   # tau ~ 0 ...
  big = big.at[:, :, 4].set(0.0)                          # ... and g = 0 off the diagonal
  big = big.at[jnp.arange(3), jnp.arange(3)].set(raw)
  pairwise = jax.jit(lambda x, raw: heat_filter(x, raw, length_scale=0.1, pairwise=True))(
      x, big)
  np.testing.assert_allclose(np.asarray(pairwise), np.asarray(depthwise), atol=1e-5)


def _basis_raw(widths, angles, ratios):
  rows = []
  for w in widths:
    for theta in angles:
      for r in ratios:
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        chol = np.linalg.cholesky(rot @ np.diag([w * w, (w / r) ** 2]) @ rot.T)
        for g in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
          rows.append([np.log(0.5), np.log(chol[0, 0]), chol[1, 0], np.log(chol[1, 1]), *g])
  return jnp.asarray(np.array(rows), jnp.float32)


def test_lemma_4_mfc_reproduces_a_3x3_conv_on_a_fixed_mesh():
  # Lemma 4 (MFC paper, Eq. 36-37): filters with varied alpha and gamma span the
  # kxk stencils of a fixed mesh, so least squares over their weights fits any
  # 3x3 conv. Realised as one MFC layer (1 -> m channels) and a 1x1 sum.
  n = 16
  kernel = np.asarray(jax.random.normal(jax.random.key(1), (3, 3)), np.float32)

  def conv3x3(u):   # periodic cross-correlation, as nn.Conv computes it
    return jax.lax.conv_general_dilated(
        jnp.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap"),
        jnp.asarray(kernel)[:, :, None, None], (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  raw = _basis_raw(np.geomspace(0.01, 2.0, 6), np.linspace(0, np.pi, 4, endpoint=False), (1, 3))
  delta = jnp.zeros((1, n, n, 1)).at[0, n // 2, n // 2, 0].set(1.0)
  mfc = jax.jit(lambda u, raw: heat_filter(u, raw, length_scale=1 / n))
  responses = mfc(jnp.broadcast_to(delta, (1, n, n, raw.shape[0])), raw)
  basis = np.asarray(responses, np.float64)[0].reshape(n * n, -1)
  target = np.asarray(conv3x3(delta), np.float64).ravel()
  weights, *_ = np.linalg.lstsq(basis, target, rcond=None)

  u = jax.random.normal(jax.random.key(5), (4, n, n, 1))
  mfc_out = jnp.einsum("bhwc,c->bhw", mfc(jnp.broadcast_to(u, (4, n, n, raw.shape[0])), raw),
                       jnp.asarray(weights, jnp.float32))
  ref = conv3x3(u)[..., 0]
  residual = float(jnp.sum((mfc_out - ref) ** 2) / jnp.sum(ref ** 2))
  assert residual < 1e-2, residual


def test_mfc_resnet_parameter_counts():
  x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,))
  pairwise = jax.eval_shape(ResNet(conv=get_conv("mfc-pairwise")).init, jax.random.key(0), x, t)
  # MFC paper Table 13 / DESIGN.md: MFC-ResNet has 532,163 parameters, which is
  # what 7 symbol parameters per channel pair give.
  assert count_params(pairwise) == 532_163
  depthwise = jax.eval_shape(ResNet(conv=get_conv("mfc")).init, jax.random.key(0), x, t)
  assert count_params(depthwise) == 597_699 - 4 * (8 * 128 * 128) + 4 * 7 * 128


def test_mfc_resnet_runs_on_several_meshes_without_new_params():
  model = ResNet(conv=get_conv("mfc"))
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))
  apply = jax.jit(model.apply)
  for n in (8, 32):
    out = apply(params, jnp.ones((2, n, n, 3)), jnp.full((2,), 0.5))
    assert out.shape == (2, n, n, 3) and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("bad, match", [
    (dict(padding=1.5), "padding"),
    (dict(length_scale=0.0), "length_scale"),
    (dict(features=0), "features must be a positive integer"),
])
def test_invalid_layer_options_raise(bad, match):
  layer = MeshFreeConv(**{"features": 2, **bad})
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_invalid_shapes_raise():
  with pytest.raises(ValueError, match="NHWC"):
    MeshFreeConv(2).init(jax.random.key(0), jnp.zeros((8, 8, 1)))
  with pytest.raises(ValueError, match="trailing axis of 7"):
    coefficients(jnp.zeros((3, 6)))
  with pytest.raises(ValueError, match="do not fit"):
    heat_filter(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 7)))
  with pytest.raises(ValueError, match="channels-first"):
    meshfree.heat_filter_channels_first(jnp.zeros((2, 8, 8)), jnp.zeros((2, 7)))
  with pytest.raises(ValueError, match="do not fit"):
    meshfree.heat_filter_channels_first(jnp.zeros((2, 1, 8, 8)), jnp.zeros((3, 7)))
  with pytest.raises(ValueError, match="pad"):
    meshfree.heat_filter_channels_first(jnp.zeros((2, 1, 8, 8)), jnp.zeros((2, 7)), pad=-1)


def test_channel_map_channels_first_matches_a_plain_product_and_its_gradients():
  """The written-out gradients equal JAX's derivative of ``einsum`` (float64)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4), jnp.float64)
    k = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    target = jax.random.normal(jax.random.key(2), (6, 2, 5, 3), jnp.float64)

    def loss(f):
      return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(f(x, k)) * target),
                                        argnums=(0, 1)))

    plain = loss(lambda x, k: jnp.einsum("bhwi,io->obhw", x, k))(x, k)
    mine = loss(meshfree.channel_map_channels_first)(x, k)
    np.testing.assert_allclose(mine[0], plain[0], rtol=1e-12)
    for got, want in zip(mine[1], plain[1]):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad,chunk_bytes", [(0, 0), (2, 1), (0, 2 * 12 * 7 * 16)])
def test_channels_first_filter_is_the_nhwc_filter_transposed(pad, chunk_bytes):
  """Unchunked, one plane a chunk, or two images of a channel; values and
  both gradients equal those of the NHWC filter's plain formula."""
  _check_against_plain_formula(12, 12, pad, False, batch=4, fft_chunk_bytes=chunk_bytes,
                               channels_first=True)


def test_mesh_free_conv_keeps_the_dense_channel_map_parameters():
  """The channels-first channel map has ``nn.Dense``'s parameter names,
  shapes and initial values, so checkpoints of either load into the other."""

  class DenseThenFilter(nn.Module):
    @nn.compact
    def __call__(self, x):
      v = nn.Dense(5, name="channel_map")(x)
      raw = self.param("symbol", meshfree.init_raw, (5,))
      return heat_filter(v, raw, length_scale=1.0 / 16)

  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  want = init_params(DenseThenFilter(), jax.random.key(1), x)
  got = init_params(MeshFreeConv(5), jax.random.key(1), x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)
  np.testing.assert_allclose(jax.jit(MeshFreeConv(5).apply)(got, x),
                             jax.jit(DenseThenFilter().apply)(want, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding,chunk_bytes,pack_images", [
    (0.0, 0, False), (0.0, 0, True), (0.0, 2 * 8 * 5 * 8, True), (0.125, 0, None)])
def test_mesh_free_conv_with_a_bias_matches_dense_then_the_plain_filter(
    padding, chunk_bytes, pack_images):
  """A nonzero bias, added before the filter in the reference: on a periodic
  mesh the layer adds ``b g0`` after it (:meth:`MeshFreeConv.folds_bias`),
  with padding it adds ``b`` before. Values and every gradient in float64,
  unchunked, packed, chunked and padded."""
  layer = MeshFreeConv(4, length_scale=0.2, padding=padding, fft_chunk_bytes=chunk_bytes,
                       pack_images=pack_images)
  assert layer.folds_bias(8, 8) == (padding == 0.0)
  pad = layer.padding_pixels(8, 8)

  def reference(params, x):
    p = params["params"]
    v = x @ p["channel_map"]["kernel"] + p["channel_map"]["bias"]
    return _plain_filter(v, p["symbol"], pad, False)

  def loss(f):
    return lambda params, x: jnp.sum(jnp.sin(f(params, x)) * target)

  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), jnp.float64)
    params = layer.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    params["params"]["channel_map"]["bias"] = jax.random.normal(
        jax.random.key(3), (4,), jnp.float64)
    target = jax.random.normal(jax.random.key(2), (4, 8, 8, 4), jnp.float64)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x),
                               jax.jit(reference)(params, x), rtol=1e-12, atol=1e-12)
    got = jax.jit(jax.grad(loss(layer.apply), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


def test_pairwise_and_biasless_layers_do_not_fold_a_bias():
  assert not MeshFreeConv(4, pairwise=True).folds_bias(8, 8)
  assert not MeshFreeConv(4, use_bias=False).folds_bias(8, 8)
  assert MeshFreeConv(4, padding=0.01).folds_bias(8, 8)        # rounds to 0 pixels
  assert not MeshFreeConv(4, padding=0.01).folds_bias(64, 64)  # 1 pixel


def test_fft_chunking_rules():
  plane = 32 * 17 * 8   # one 32 x 32 channel's complex64 spectrum
  # Everything fits, or chunking is off: one transform.
  assert meshfree.fft_chunking(4, 8, 32, 32, chunk_bytes=4 * 8 * plane) is None
  assert meshfree.fft_chunking(4, 8, 32, 32, chunk_bytes=0) is None
  # Per channel, whole channels (all 6 images) when one fits: the largest
  # divisor of the channels.
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=2 * 6 * plane + 5) == (6, 2)
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=5 * 6 * plane) == (6, 4)
  # Otherwise image blocks of one channel (a divisor of the batch, >= 1).
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=5 * plane) == (3, 1)
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=2 * plane + 5) == (2, 1)
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=1) == (1, 1)
  # Pairwise filters mix channels: whole images, even when one is too big.
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=1, pairwise=True) == (1, 8)
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=2 * 8 * plane, pairwise=True) == (2, 8)
  # float64 spectra are twice the bytes.
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=8 * plane, itemsize=16) == (3, 1)
  assert meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=12 * plane, itemsize=16) == (6, 1)
  with pytest.raises(ValueError, match="chunk_bytes"):
    meshfree.fft_chunking(6, 8, 32, 32, chunk_bytes=-1)


@pytest.mark.parametrize("layer,shape,dtype", [
    (MeshFreeConv(6, fft_chunk_bytes=1), (2, 12, 10, 3), jnp.float32),
    (MeshFreeConv(5, pairwise=True, padding=0.25, fft_chunk_bytes=2 * 3 * 9 * 9 * 8),
     (4, 12, 10, 3), jnp.float32),
    (MeshFreeConv(4, padding=0.1, dtype=jnp.bfloat16, fft_chunk_bytes=600), (3, 16, 16, 2),
     jnp.float32),
    (MeshFreeConv(4), (2, 16, 16, 3), jnp.float32)])
def test_layer_reports_the_fft_chunking_its_filter_runs(layer, shape, dtype, monkeypatch):
  """``MeshFreeConv.fft_chunking`` (what the benchmark reports) is the
  chunking that ``heat_filter`` picks inside ``apply``, for per-channel and
  pairwise filters, with padding, and with a compute dtype of its own."""
  x = jnp.ones(shape, dtype)
  # Shapes only: the chunking is chosen when apply is traced.
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  used = []
  plain = meshfree.heat_filter_chunking

  def spy(*args, **kwargs):
    used.append(plain(*args, **kwargs))
    return used[-1]

  monkeypatch.setattr(meshfree, "heat_filter_chunking", spy)
  jax.eval_shape(layer.apply, params, x)
  monkeypatch.setattr(meshfree, "heat_filter_chunking", plain)
  assert len(used) == 1
  assert layer.fft_chunking(shape, dtype) == used[0]


def test_default_fft_chunking_only_for_large_spectra_on_large_meshes():
  big, mesh = meshfree.CPU_FFT_CHUNK_ABOVE_BYTES + 1, meshfree.CPU_FFT_CHUNK_MIN_PIXELS
  assert jax.default_backend() == "cpu"
  assert meshfree.default_fft_chunk_bytes(big, mesh) == meshfree.CPU_FFT_CHUNK_BYTES
  assert meshfree.default_fft_chunk_bytes(big - 1, mesh) == 0
  assert meshfree.default_fft_chunk_bytes(big, mesh - 1) == 0


def test_heat_filter_chunking_reports_what_the_layer_does():
  assert jax.default_backend() == "cpu"
  # 16 x 128 channels of 256 x 129 complex64: 541 MB of spectrum, 264 KB a
  # plane, so 4 images of one channel a chunk.
  assert meshfree.heat_filter_chunking((16, 256, 256, 128)) == (4, 1)
  # Under 64 MiB of spectrum, or a mesh under 128^2: unchunked.
  assert meshfree.heat_filter_chunking((16, 256, 256, 8)) is None
  assert meshfree.heat_filter_chunking((64, 64, 64, 128)) is None
  # bfloat16 inputs are filtered in float32; float64 spectra are twice as large.
  assert meshfree.heat_filter_chunking((16, 256, 256, 128), dtype=jnp.bfloat16) == (4, 1)
  assert meshfree.heat_filter_chunking((16, 256, 256, 128), dtype=jnp.float64) == (2, 1)
  # Padding enlarges the mesh the FFTs run on: 120 + 2 x 4 = 128.
  assert meshfree.heat_filter_chunking((64, 120, 120, 64)) is None
  assert meshfree.heat_filter_chunking((64, 120, 120, 64), pad=4) is not None
  # Pairwise chunks are whole images with all their input channels.
  assert meshfree.heat_filter_chunking((4, 32, 32, 8), out_channels=16,
                                       fft_chunk_bytes=1) == (1, 8)
  assert meshfree.heat_filter_chunking((4, 32, 32, 8), fft_chunk_bytes=0) is None
  # heat_filter runs a loop exactly when a chunking is reported.
  v = jnp.zeros((4, 32, 32, 8))
  raw = meshfree.init_raw(jax.random.key(0), (8,))
  for chunk_bytes in (0, 1, 10 ** 9):
    jaxpr = str(jax.make_jaxpr(lambda x: meshfree.heat_filter(x, raw, fft_chunk_bytes=chunk_bytes))(v))
    expected = meshfree.heat_filter_chunking(v.shape, fft_chunk_bytes=chunk_bytes) is not None
    assert ("scan" in jaxpr) == expected, chunk_bytes


def test_mesh_free_conv_chunked_or_not_gives_the_same_output():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  plain = MeshFreeConv(4, fft_chunk_bytes=0)
  params = plain.init(jax.random.key(1), x)
  chunked = MeshFreeConv(4, fft_chunk_bytes=1)
  np.testing.assert_allclose(chunked.apply(params, x), plain.apply(params, x), rtol=1e-6, atol=1e-6)
  assert "scan" in str(jax.make_jaxpr(lambda v: chunked.apply(params, v))(x))
  assert "scan" not in str(jax.make_jaxpr(lambda v: plain.apply(params, v))(x))
