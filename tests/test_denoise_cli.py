"""End-to-end: the denoise CLI on the smoke config (bundled images, CPU)."""

import json

import pytest

from experiments import denoise


def _run(tmp_path, *extra):
  return denoise.main(["--config", "smoke", "--workdir", str(tmp_path), "--no-progress",
                       "--compile-cache", "", "--step-cache", str(tmp_path / "step-cache"),
                       *extra])


def test_smoke_all_strategies_table_and_files(tmp_path, capsys):
  results = _run(tmp_path, "--strategy", "all")
  out = capsys.readouterr().out
  assert "| strategy |" in out and "full-multiscale" in out
  for name in ("single", "multiscale", "full-multiscale"):
    r = json.loads((tmp_path / name / "results.json").read_text())
    for key in ("task", "model", "strategy", "subsample", "levels", "config",
                "work_units", "wall_seconds", "steps", "metrics"):
      assert key in r, key
    assert r["work_units"] == r["work_units_closed_form"]
    assert r["sequential_passes"] is True   # --sequential auto, on CPU
    assert r["compile_ahead"] is False      # --compile-ahead auto, on CPU
    assert r["split_step"] is True          # --split-step auto, on CPU
    assert r["max_pixels_per_chunk"] == 2**18  # a 16^2 finest mesh, on CPU
    assert all(st["background_compile_seconds"] == 0.0 for st in r["stages"])
    assert r["params"] == 597_699
    assert set(r["metrics"]) == {"mse", "psnr"}
    assert (tmp_path / name / "loss_vs_wu.png").stat().st_size > 1000
    assert results[name]["strategy"] == name
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["single"]["wu_ratio"] == 1.0
  # Closed-form ratios of the smoke schedule (2 levels, N0 = 1, I = 4):
  # MGE step 1*(1 + 1/4) + 2/4 = 7/4 vs 3 single-scale -> 7/12.
  assert summary["multiscale"]["closed_form_wu_ratio"] == pytest.approx(7 / 12)
  assert (tmp_path / "val_mse_vs_wu.png").exists()


@pytest.mark.parametrize("split", [[], ["--split-step", "off"]])
def test_smoke_resume_after_stop(tmp_path, split):
  stopped = _run(tmp_path, "--strategy", "full-multiscale", "--stop-after", "3", *split)
  assert stopped == {}
  assert not (tmp_path / "results.json").exists()
  # Another run's checkpoints are not resumed: the rerun stops, naming what
  # differs, before anything compiles.
  for flag, differs in ((["--learning-rate", "0.5"], "learning_rate: 0.0005 -> 0.5"),
                        (["--model", "mfc-resnet"], "model: 'resnet' -> 'mfc-resnet'"),
                        (["--strategy", "multiscale"], "strategy: 'full-multiscale'")):
    argv = ["--strategy", "full-multiscale", *split, *flag]
    with pytest.raises(SystemExit, match="holds checkpoints of another run") as exc:
      _run(tmp_path, *argv)
    assert differs in str(exc.value)
  results = _run(tmp_path, "--strategy", "full-multiscale", *split)
  r = results["full-multiscale"]
  # On CPU --mge auto is terms and --split-step auto is on.
  assert r["mge"] == "terms" and r["split_step"] == (not split)
  assert r["resumed_from_step"] == 3
  assert r["steps"] == 6
  assert r["work_units"] == r["work_units_closed_form"]


def test_a_signal_stops_the_run_with_a_checkpoint_and_its_exit_status(tmp_path, monkeypatch,
                                                                       capsys):
  """The CLI's glue for Ctrl-C / SIGTERM (the handler itself is tested in
  test_runtime.py): a stop requested before the first step ends the run
  after it, checkpointed, with the shell's status for the signal."""
  import contextlib   # pylint: disable=g-import-not-at-top
  import signal   # pylint: disable=g-import-not-at-top
  import threading   # pylint: disable=g-import-not-at-top
  from experiments import runtime   # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def signalled():
    stop = threading.Event()
    stop.signum = signal.SIGTERM
    stop.set()
    yield stop

  monkeypatch.setattr(runtime, "stop_on_signal", signalled)
  with pytest.raises(SystemExit) as exc:
    _run(tmp_path, "--strategy", "single")
  assert exc.value.code == 128 + signal.SIGTERM
  assert "single: stopped at step 1 (checkpointed)" in capsys.readouterr().err
  assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / "results.json").exists()


def test_invalid_hierarchy_fails_before_compute(tmp_path):
  with pytest.raises(SystemExit, match="--levels .*not divisible"):
    _run(tmp_path, "--strategy", "single", "--levels", "6")
  assert not (tmp_path / "single").exists() and not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["--devices", "64"], r"--devices 64: JAX finds \d+ cpu device"),
    (["--dataset", "folder", "--data-dir", "/no/such/folder"],
     "--dataset folder: Image folder /no/such/folder does not exist"),
])
def test_bad_input_ends_in_one_line_not_a_traceback(tmp_path, argv, message):
  with pytest.raises(SystemExit, match=message):
    _run(tmp_path, "--strategy", "single", *argv)


def test_signature_lists_what_differs_and_leaves_out_execution_choices():
  config = denoise.get_config("smoke")
  common = dict(model_name="resnet", levels=2, subsample="coarsen", restriction="nearest",
                dtype="float32", data_description="bundled", fuse_meshes=False)
  base = denoise.run_signature(config, "single", **common)
  assert denoise.signature_differences(base, base) == []
  other = denoise.run_signature(config.__class__(**{**base["config_values"], "seed": 7}),
                                "single", **{**common, "fuse_meshes": True})
  assert denoise.signature_differences(base, other) == [
      "seed: 0 -> 7", "mge: 'terms' -> 'by-mesh'"]
  # A crop hierarchy has no restriction, so that one cannot differ.
  crop = dict(common, subsample="crop")
  assert denoise.signature_differences(
      denoise.run_signature(config, "single", **crop),
      denoise.run_signature(config, "single", **{**crop, "restriction": "average"})) == []
  # Results written before a key existed differ in it (so they are not reused).
  assert denoise.signature_differences({k: v for k, v in base.items() if k != "mge"},
                                       base) == ["mge: None -> 'terms'"]


def test_checkpoints_without_a_record_resume_as_before(tmp_path):
  """A workdir from before run.json: resumed, and the record written."""
  signature = {"strategy": "single", "model": "resnet"}
  denoise.check_workdir(tmp_path, signature, has_checkpoints=True)
  assert json.loads((tmp_path / "run.json").read_text()) == signature
  with pytest.raises(denoise.WorkdirMismatch, match="model: 'resnet' -> 'unet'"):
    denoise.check_workdir(tmp_path, {**signature, "model": "unet"}, has_checkpoints=True)
  # Without checkpoints there is nothing to resume: the new run's record replaces it.
  denoise.check_workdir(tmp_path, {**signature, "model": "unet"}, has_checkpoints=False)
  assert json.loads((tmp_path / "run.json").read_text())["model"] == "unet"
  # A record that cannot be read cannot vouch for the checkpoints.
  (tmp_path / "run.json").write_text('{"strategy": "sin')
  with pytest.raises(denoise.WorkdirMismatch, match="cannot be read"):
    denoise.check_workdir(tmp_path, signature, has_checkpoints=True)
  assert not list(tmp_path.glob("*.tmp"))


def test_paper_config_reproduces_table2_work_units():
  from experiments.configs import get_config
  from mgtrain import full_multiscale as fm
  from mgtrain.hierarchy import Hierarchy
  cfg = get_config("paper")
  h = Hierarchy(levels=cfg.levels, size=cfg.size, base_batch=cfg.base_batch)
  assert h.batch_sizes == (16, 32, 64, 128)
  assert cfg.fms_iterations() == (2000, 1000, 500, 250)
  wu = {s: float(fm.schedule_work_units(
      fm.make_schedule(s, h, cfg.iterations, cfg.fms_iterations())))
        for s in fm.STRATEGIES}
  assert wu == {"single": 480_000.0, "multiscale": 74_000.0, "full-multiscale": 28_750.0}


def test_cpu4_config_has_the_papers_full_multiscale_saving():
  """cpu4 keeps the paper's 4 levels: single / Full-Multiscale #WU = Eq. 41 / Eq. 47."""
  from experiments.configs import get_config
  from mgtrain import full_multiscale as fm
  from mgtrain import workunits
  from mgtrain.hierarchy import Hierarchy
  cfg = get_config("cpu4")
  h = Hierarchy(levels=cfg.levels, size=cfg.size, base_batch=cfg.base_batch)
  wu = {s: fm.schedule_work_units(fm.make_schedule(s, h, cfg.iterations, cfg.fms_iterations()))
        for s in ("single", "full-multiscale")}
  assert wu["single"] == workunits.single_scale_closed_form(cfg.base_batch, cfg.iterations)
  assert wu["full-multiscale"] == workunits.full_multiscale_closed_form(
      cfg.base_batch, cfg.iterations)
  assert round(float(wu["single"] / wu["full-multiscale"]), 2) == 16.70


def test_level_parallel_flag_conflicts():
  with pytest.raises(SystemExit, match="cannot be combined"):
    denoise.main(["--config", "smoke", "--level-parallel", "--mge", "by-mesh"])
  with pytest.raises(SystemExit, match="--split-step on runs on one device"):
    denoise.main(["--config", "smoke", "--level-parallel", "--split-step", "on"])
  with pytest.raises(SystemExit, match="--split-step on runs on one device"):
    denoise.main(["--config", "smoke", "--split-step", "on", "--devices", "2"])


def test_bad_config_name():
  with pytest.raises(SystemExit):
    denoise.main(["--config", "huge"])


def test_split_step_auto_is_off_for_big_passes():
  """auto stays off where the finest MGE pass exceeds the limit (on stays on)."""
  limit = denoise.SPLIT_STEP_AUTO_MAX_PIXELS
  assert denoise.resolve_split_step("auto", True, limit) is True
  assert denoise.resolve_split_step("auto", True, limit + 1) is False
  assert denoise.resolve_split_step("auto", False, 1) is False
  assert denoise.resolve_split_step("on", True, limit + 1) is True
  # The configs: cpu (4 x 32^2), cpu4 (2 x 64^2) and paper (16 x 64^2) run split on CPU.
  for name in ("cpu", "cpu4", "paper"):
    c = denoise.get_config(name)
    assert denoise.resolve_split_step("auto", True, c.base_batch * c.size ** 2) is True


@pytest.mark.parametrize("size, chunk", [(8, 2**18), (64, 2**18), (127, 2**18),
                                         (128, 2**14), (256, 2**14), (1024, 2**14)])
def test_default_chunk_pixels_follows_the_finest_mesh_on_cpu(size, chunk):
  """2^14 samples x pixels from a 128^2 finest mesh up, 2^18 below; off on GPU."""
  assert denoise.default_chunk_pixels("cpu", size) == chunk
  assert denoise.default_chunk_pixels("gpu", size) is None
  # At 128^2 and up a chunk holds one finest image (a 64^2 pass: 4 images).
  assert (chunk // size ** 2 <= 1) == (size >= 128)


def test_chunk_pixels_flag_overrides_the_default():
  """--chunk-pixels: not given takes the rule, 0 is off, a number is kept (both CLIs)."""
  assert denoise.resolve_chunk_pixels(None, "cpu", 256) == 2**14
  assert denoise.resolve_chunk_pixels(None, "gpu", 256) is None
  assert denoise.resolve_chunk_pixels(0, "cpu", 256) is None
  assert denoise.resolve_chunk_pixels(512, "gpu", 16) == 512


def test_default_chunk_pixels_rejects_a_bad_side():
  with pytest.raises(ValueError, match="positive image side"):
    denoise.default_chunk_pixels("cpu", 0)


# auto on the CPU the tests run on: sequential passes on, compile-ahead off.
@pytest.mark.parametrize("resolve, flag, auto_on_cpu", [
    (denoise.resolve_sequential, "sequential", True),
    (denoise.resolve_compile_ahead, "compile-ahead", False),
    (denoise.resolve_split_step, "split-step", True),
])
def test_auto_on_off_choices(resolve, flag, auto_on_cpu):
  assert resolve("on") is True
  assert resolve("off") is False
  assert resolve("auto") is auto_on_cpu
  with pytest.raises(ValueError, match=f"--{flag} is auto, on or off"):
    resolve("yes")
