"""The speed benchmarks still run and end with the JSON line their readers parse (a tiny run; no figure is checked)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def last_json_line(script: str, *argv: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_speed_reports_both_ratios():
    result = last_json_line("train_speed.py", "--rounds", "1", "--threads", "1")
    assert result["ratio_vs_transformers"] > 0 and result["ratio_vs_transformers_same_malloc"] > 0
    # the peak is the faster measured kernel, and no training step can do more useful work than a bare matmul: a
    # fraction of 1 or more would mean a wrong FLOP count
    assert result["matmul_peak_gflops"] == max(result["matmul_gflops"].values())
    assert 0 < result["fraction_of_matmul_peak"] < 1
    assert set(result["tokens_per_s"]) == {"aurelius-4m", "transformers", "transformers-same-malloc", "micromixer-1m"}


def test_generate_speed_reports_its_keys():
    result = last_json_line("generate_speed.py", "--new-tokens", "4")
    for key in ("batch1_tokens_per_s", "batch64_tokens_per_s", "transformers_batch1_tokens_per_s", "ratio_batch1",
                "compiled_batch1_vs_eager", "compiled_batch64_vs_eager", "compiled_float32_batch1_vs_eager",
                "compile_seconds_cached"):
        assert result[key] > 0
    assert result["compile_seconds_first"] > result["compile_seconds_cached"]  # the first start builds the library


def test_serve_load_reports_its_keys():
    result = last_json_line("serve_load.py", "--clients", "1", "3", "--new-tokens", "4", "--requests", "1")
    assert result["clients"] == [1, 3] and result["errors"] == {"1": 0, "3": 0}
    for key in ("tokens_per_s", "offline_tokens_per_s"):
        assert set(result[key]) == {"1", "3"} and min(result[key].values()) > 0
    assert result["ratio_64_vs_offline"] > 0


def test_data_scale_reports_both_steps_and_the_reference(tmp_path):
    result = last_json_line("data_scale.py", "--mb", "0.3", "--recipe", "tinystories-demo", "--dir", str(tmp_path))
    for step in ("tokenizer_train", "data_prepare", "encode_batch"):
        assert result[step]["mb_per_s"] > 0 and result[step]["peak_rss_mb"] > 0
    assert result["mb"] >= 0.3 and result["prepare_vs_encode_batch"] > 0


def test_speedrun_step_timing_reports_each_candidate_against_the_baseline():
    result = last_json_line("speedrun.py", "--step-timing", "1", "--threads", "1", "--only", "muon",
                            "--set", "model.n_layers=1")
    timing = result["step_timing"]
    assert set(timing) == {"baseline", "muon"} and timing["baseline"]["ratio"] == 1.0
    assert timing["muon"]["ms_per_step"] > 0 and timing["muon"]["ratio"] > 0


def test_decode_bound_times_each_weight_form_of_the_same_products():
    result = last_json_line("decode_bound.py", "--no-compile", "--rounds", "1", "--steps", "2")
    assert 0 < result["eager_step_matmul_share"] < 1
    assert set(result["products_us_per_token"]) == {"fp32", "bf16", "int8", "int4"}
    errors = result["products_relative_error"]  # the low-precision products compute the same thing, roughly
    assert errors["bf16"] < 0.02 and errors["int8"] < 0.03 and errors["int4"] < 0.2
    for batch in (1, 64):  # the whole step in bf16 computes the fp32 step's logits, roughly
        step = result[f"bf16_step_batch{batch}"]
        assert step["bf16_vs_fp32"] > 0 and step["logits_relative_error"] < 0.05


def test_speedrun_summary_takes_the_worse_seed_and_counts_half_budget_runs_for_speed_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import speedrun

    def run(name, seed, steps, curve):
        return {"name": name, "seed": seed, "steps": steps, "tokens": steps, "wall_s": 1.0, "ms_per_step": 1.0,
                "bpb": curve[steps], "curve": curve}

    runs = [run("baseline", 1, 1200, {600: 1.2, 1200: 1.04}), run("baseline", 2, 1200, {600: 1.2, 1200: 1.03}),
            run("muon", 1, 1200, {600: 1.1, 900: 1.02, 1200: 0.93}),
            run("muon", 2, 1200, {600: 1.1, 900: 1.05, 1100: 1.0, 1200: 0.95}),
            run("winner@600", 1, 600, {500: 1.04, 600: 1.01}), run("winner@600", 2, 600, {500: 1.03, 600: 1.02})]
    summary = speedrun.summarise(runs, 1200)
    assert summary["baseline_bpb"] == 1.03  # the better baseline seed
    assert summary["best"] == "muon" and summary["best_bpb_at_1200"] == 0.95  # a half-budget run never ends at 1,200
    assert summary["candidates"]["muon"]["steps_to_baseline_bpb_worse_seed"] == 1100
    assert summary["fastest_to_baseline_bpb"] == "winner@600" and summary["best_steps_to_baseline_bpb"] == 600


def test_speedrun_reads_back_a_run_by_the_settings_it_resolved_to(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import speedrun
    from tinylm.recipe import load_recipe
    from tinylm.recipe.writing import recipe_to_toml

    sets = speedrun.CANDIDATES["baseline"] + ["train.max_steps=200"]
    (tmp_path / "recipe.toml").write_text(recipe_to_toml(load_recipe(speedrun.RECIPE, sets)))
    (tmp_path / "run.json").write_text(json.dumps({"tokens_per_step": 4096, "wall_time_s": 9.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"step": 100, "ms_per_step": 5.0}, {"step": 100, "val_bpb": 1.5}, {"step": 200, "ms_per_step": 4.0},
        {"step": 200, "val_bpb": 1.25}]))
    result = speedrun.finished_result(tmp_path, "baseline", 1, 200, sets)
    assert result["bpb"] == 1.25 and result["curve"] == {100: 1.5, 200: 1.25} and result["tokens"] == 200 * 4096
    # the same settings spelt differently still match (the recipe's own default restated); another setting does not
    assert speedrun.finished_result(tmp_path, "baseline", 1, 200, sets + ["model.dim=128"]) is not None
    assert speedrun.finished_result(tmp_path, "baseline", 1, 200, sets + ["train.seed=7"]) is None
