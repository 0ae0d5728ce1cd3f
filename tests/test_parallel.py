"""Data-parallel MGE step on 8 fake CPU devices equals the one-device step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mgtrain import parallel

SCRIPT = Path(__file__).with_name("parallel_check.py")


@pytest.fixture(scope="module")
def eight_device_result():
  # A fresh process: the device count is fixed when jax initialises.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mge", "single"])
def test_sharded_step_matches_one_device(eight_device_result, name):
  r = eight_device_result
  assert r["devices"] == 8
  out = r[name]
  assert out["param_devices"] == 8                      # params live on all 8
  assert out["all_reduce"]                              # the batch really is split
  assert out["max_abs_diff"] <= 1e-5 * max(1.0, out["param_scale"])
  assert out["loss_8dev"] == pytest.approx(out["loss_1dev"], rel=1e-5, abs=1e-7)
  assert out["work_units"][0] == out["work_units"][1]


def test_train_with_a_mesh_matches_one_device(eight_device_result):
  r = eight_device_result
  assert r["train_max_abs_diff"] <= 1e-5
  assert r["train_work_units"][0] == r["train_work_units"][1]


def test_train_with_a_mesh_and_a_step_cache_loads_onto_the_mesh_devices(eight_device_result):
  """Stored on a 4-device mesh, loaded on it again in the second run."""
  first, second = eight_device_result["train_step_cache"]
  for run in (first, second):
    assert run["devices"] == [0, 1, 2, 3]
    assert run["max_abs_diff"] <= 1e-5
  assert second["losses"] == first["losses"]
  # The state and the two stages' steps: compiled, then all loaded.
  assert first["programs"] == second["programs"] == 3
  assert (first["hits"], second["hits"]) == (0, 3)


def test_train_with_level_parallelism_matches_one_device(eight_device_result):
  """A 2-stage Full-Multiscale fm.train run with every stage's terms on device groups."""
  r = eight_device_result
  assert r["train_level_parallel_max_abs_diff"] <= 1e-5
  assert r["train_work_units"][0] == r["train_work_units"][2]
  one, _, lp = r["train_losses"]
  assert len(lp) == len(one) == 4
  assert lp == pytest.approx(one, rel=1e-5, abs=1e-7)


def test_level_parallel_step_matches_one_device(eight_device_result):
  """Terms on device groups 4/2/2 give the one-device MGE update."""
  out = eight_device_result["level_parallel"]
  assert out["group_sizes"] == [4, 2, 2] and out["disjoint"]
  assert out["max_abs_diff"] <= 1e-5 * max(1.0, out["param_scale"])
  assert out["loss_level_parallel"] == pytest.approx(out["loss_1dev"], rel=1e-5, abs=1e-7)
  assert out["work_units"][0] == out["work_units"][1]
  assert out["variance_finite"]      # per-level statistics are kept


def test_uneven_batches_are_rejected(eight_device_result):
  assert "divisible by the 8 devices" in eight_device_result["check_error"]


def test_single_device_mesh_and_errors():
  mesh = parallel.data_mesh()
  assert mesh.shape["data"] == len(jax.devices())
  with pytest.raises(ValueError, match="num_devices"):
    parallel.data_mesh(len(jax.devices()) + 1)
  parallel.check_batches((4, 8), mesh)   # one device divides every batch


def test_level_groups_follow_term_costs_and_errors():
  from mgtrain import full_multiscale as fm
  from mgtrain import level_parallel
  from mgtrain.hierarchy import Hierarchy, HierarchyError
  stage = fm.multiscale_schedule(Hierarchy(levels=4, size=64, base_batch=16), 1)[0]
  # Terms of 20/10/5/2 #WU: the finest doubles first, a group doubles only
  # while its batch still splits, and 4 devices give one per term.
  assert level_parallel.group_sizes(stage, 4) == [1, 1, 1, 1]
  assert level_parallel.group_sizes(stage, 8) == [4, 2, 1, 1]
  assert level_parallel.group_sizes(stage, 16) == [8, 4, 2, 2]
  with pytest.raises(HierarchyError, match="one device per level"):
    level_parallel.group_sizes(stage, 3)
  with pytest.raises(HierarchyError, match="one device group per level"):
    level_parallel.LevelParallelStep(stage, None, None, None, None, [jax.devices()])


def test_train_level_parallel_errors():
  from mgtrain import full_multiscale as fm
  from mgtrain.hierarchy import Hierarchy, HierarchyError
  h = Hierarchy(levels=2, size=16, base_batch=2)
  stages = fm.multiscale_schedule(h, 1)
  kwargs = dict(params={"w": jax.numpy.zeros(2)}, stages=stages, hierarchy=h, loss_fn=None,
                sample_fn=None, data=None, make_optimizer=None, progress=False)
  with pytest.raises(ValueError, match="cannot be combined"):
    fm.train(level_parallel=True, fuse_meshes=True, **kwargs)
  with pytest.raises(HierarchyError, match="one device per level"):
    fm.train(level_parallel=jax.devices()[:1], **kwargs)
