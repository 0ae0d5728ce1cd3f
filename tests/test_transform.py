import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import smooth_images
from mgtrain.hierarchy import Hierarchy
from mgtrain.mge import mge_value_and_grad
from mgtrain.transform import MultiscaleState, multiscale


def _random_grads(key, params, levels):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, (levels,) + p.shape) for k, p in zip(keys, leaves)])


def test_one_level_equals_inner_optimizer():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  inner = optax.adam(1e-2)
  tx = multiscale(optax.adam(1e-2), num_levels=1)
  s_ref, s = inner.init(params), tx.init(params)
  p_ref = p = params
  for i in range(5):
    g = _random_grads(jax.random.key(i), params, 1)
    u_ref, s_ref = inner.update(jax.tree.map(lambda x: x[0], g), s_ref, p_ref)
    u, s = tx.update(g, s, p)
    p_ref, p = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p, u)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(a, b)
  assert isinstance(s, MultiscaleState) and int(s.count) == 5


def test_summed_gradient_mode_equals_inner_optimizer_and_tracks_nothing():
  """``level_terms=False`` (for the by-mesh MGE) is the inner optimizer, same state shape."""
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  inner = optax.adam(1e-2)
  tx = multiscale(optax.adam(1e-2), num_levels=3, level_terms=False)
  s_ref, s = inner.init(params), tx.init(params)
  p_ref = p = params
  for i in range(3):
    g = jax.tree.map(lambda x: x[0], _random_grads(jax.random.key(i), params, 1))
    u_ref, s_ref = inner.update(g, s_ref, p_ref)
    u, s = jax.jit(tx.update, donate_argnums=1)(g, s, p)
    p_ref, p = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p, u)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(a, b)
  assert int(s.count) == 3 and s.term_mean is None
  assert s.variance.shape == (3,) and np.all(np.isnan(s.variance))


def test_sums_levels_list_or_stacked():
  params = {"w": jnp.zeros(4)}
  tx = multiscale(optax.sgd(1.0), num_levels=3)
  state = tx.init(params)
  g = _random_grads(jax.random.key(0), params, 3)
  u_stacked, _ = tx.update(g, state, params)
  u_list, _ = tx.update([jax.tree.map(lambda x: x[i], g) for i in range(3)], state, params)
  np.testing.assert_allclose(u_stacked["w"], -g["w"].sum(0), rtol=1e-6)
  np.testing.assert_allclose(u_list["w"], u_stacked["w"], rtol=1e-6)


def test_level_statistics():
  params = {"w": jnp.zeros(8)}
  tx = multiscale(optax.sgd(0.0), num_levels=2, beta=0.9)
  state = tx.init(params)
  # Level 0: constant term -> variance 0, sq_norm = ||c||^2 = 8.
  # Level 1: i.i.d. N(0, 1) entries -> sq_norm ~ variance ~ 8.
  rng = np.random.default_rng(0)
  update = jax.jit(tx.update)
  for _ in range(400):
    g = {"w": jnp.stack([jnp.ones(8), jnp.asarray(rng.normal(size=8), jnp.float32)])}
    _, state = update(g, state, params)
  np.testing.assert_allclose(state.sq_norm[0], 8.0, rtol=1e-4)
  assert abs(float(state.variance[0])) < 1e-3
  assert 4.0 < float(state.sq_norm[1]) < 12.0
  assert 4.0 < float(state.variance[1]) < 12.0
  np.testing.assert_allclose(state.last_sq_norm[0], 8.0, rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="num_levels"):
    multiscale(optax.sgd(1.0), num_levels=0)
  with pytest.raises(ValueError, match="beta"):
    multiscale(optax.sgd(1.0), num_levels=2, beta=1.0)
  tx = multiscale(optax.sgd(1.0), num_levels=2)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="expected 2 level terms"):
    tx.update([params, params, params], state, params)
  with pytest.raises(ValueError, match="leading level axis of size 2"):
    tx.update({"w": jnp.zeros((3, 3))}, state, params)


def test_extra_args_and_chain():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.scale_by_adam(), optax.scale(-1e-3))
  mtx = multiscale(tx, num_levels=2)
  params = {"w": jnp.ones(3)}
  state = mtx.init(params)
  g = {"w": jnp.ones((2, 3))}
  u, _ = mtx.update(g, state, params, unused_extra=1.0)
  assert u["w"].shape == (3,)


class ForeignDenoiser(nn.Module):
  """A Flax model written without mgtrain: conv -> relu -> conv, residual."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3))(x))
    return x + nn.Conv(1, (3, 3))(h)


def test_foreign_flax_model_trains_with_mge_and_transform():
  """The three lines of the README on a model that is not from mgtrain."""
  model = ForeignDenoiser()
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  h = Hierarchy(levels=2, size=16, base_batch=4)

  def loss_fn(p, batch):
    return jnp.mean((model.apply(p, batch["u"]) - batch["y"]) ** 2, axis=(1, 2, 3))

  def sample(key, n):
    k1, k2 = jax.random.split(key)
    y = smooth_images(k1, n, 16)
    return {"u": y + 0.3 * jax.random.normal(k2, y.shape), "y": y}

  tx = multiscale(optax.adam(3e-3), num_levels=h.levels)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    keys = jax.random.split(key, h.levels)
    batches = [sample(k, n) for k, n in zip(keys, h.batch_sizes)]
    loss, level_grads, _ = mge_value_and_grad(loss_fn, params, batches, h)
    updates, opt_state = tx.update(level_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  val = sample(jax.random.key(99), 32)
  before = float(jnp.mean(loss_fn(params, val)))
  for i in range(150):
    params, opt_state, _ = step(params, opt_state, jax.random.key(i))
  after = float(jnp.mean(loss_fn(params, val)))
  assert after < 0.5 * before, (before, after)
  assert float(opt_state.sq_norm[0]) > 0 and float(opt_state.sq_norm[1]) > 0


def test_converges_on_quadratic():
  target = jnp.array([1.0, -2.0, 3.0])
  params = jnp.zeros(3)
  tx = multiscale(optax.sgd(0.1), num_levels=3)
  state = tx.init(params)
  for _ in range(200):
    full = 2 * (params - target)
    # Split the gradient into three "level" terms that sum to it.
    g = jnp.stack([0.5 * full, 0.25 * full, 0.25 * full])
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_allclose(params, target, atol=1e-4)


@pytest.mark.parametrize("level_terms, grads, hint", [
    # All leaves of the summed gradient happen to lead with L = 3: without the
    # check it passed as three level terms, and the update broadcast.
    (True, {"w": jnp.ones((3, 5))}, "use level_terms=False"),
    (False, {"w": jnp.ones((3, 3, 5))}, "use level_terms=True"),
])
def test_a_gradient_of_the_other_kind_is_refused(level_terms, grads, hint):
  params = {"w": jnp.ones((3, 5))}
  tx = multiscale(optax.sgd(0.1), num_levels=3, level_terms=level_terms)
  with pytest.raises(ValueError, match=hint):
    jax.jit(tx.update)(grads, tx.init(params), params)
