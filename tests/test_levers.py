"""experiments.levers: per-program XLA options A/B, unknown options reported, not fatal."""

from experiments import levers


def test_smoke_levers_time_variants_and_report_bad_options(tmp_path):
  rows = levers.main(["--config", "smoke", "--mge", "by-mesh", "--repeats", "1",
                      "--options", "{}", '{"xla_no_such_option": 1}',
                      "--workdir", str(tmp_path)])
  good, bad = rows
  assert good["seconds_per_step"] > 0 and good["compile_seconds"] > 0
  assert good["temp_bytes"] > 0
  assert "xla_no_such_option" in bad["error"]
  assert (tmp_path / "levers.json").exists()
