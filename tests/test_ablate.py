"""engine.ablate: the --quick ablation end to end (outputs, table against the per-run records, resume, refusal of
mixed settings) and the fused-vs-reference equivalence of training loss curves over 200 steps at batch 32."""
import csv
import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import ablate as ablate_cmd
from engine.training import ablation as ablate
from engine.training.loop import run
from engine.training.prepare import resolve
from tests.helpers import command_error, seeded_checkpoint


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """The --quick dataset and teacher, built once for this module."""
    cache = tmp_path_factory.mktemp("ablate_cache")
    settings, _ = ablate_cmd.parse_args(["--quick", "--cache-dir", str(cache)])
    ablate.prepare_quick(settings.base, logging.getLogger("test_ablate"))
    return cache


def _argv(tmp_path, cache, *extra):
    return ["--quick", "--cache-dir", str(cache), "--logs", str(tmp_path / "logs"), "--name", "q",
            "--equivalence-steps", "0", *extra]


def test_quick_ablation_table_resume_and_settings_check(tmp_path, quick_cache):
    out = tmp_path / "logs" / "q"
    ablate_cmd.main(_argv(tmp_path, quick_cache))
    for name in ("ablation.json", "runs.jsonl", "table.md", "table.csv", "ablation.png", "summary.json", "ablate.log",
                 "teacher.json", "runs/baseline-seed0/results.json", "runs/clip-rd-seed0/checkpoints/epoch_2.pt"):
        assert (out / name).exists(), name
    records = ablate.read_jsonl(out / "runs.jsonl")
    assert [(r["preset"], r["seed"]) for r in records] == [("baseline", 0), ("clip-rd", 0)]
    assert records[0]["weights"]["fd"] == 0 and records[1]["weights"]["xrd"] == 1 and records[1]["steps"] == 64
    # the CSV holds the records' values (one seed: mean = the run's metric, std 0) and the teacher's own metrics
    rows = {r["preset"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert set(rows) == {"teacher", "baseline", "clip-rd"}
    for record in records:
        for metric in ablate.TABLE_METRICS:
            assert float(rows[record["preset"]][f"{metric}_mean"]) == pytest.approx(record["metrics"][metric], abs=1e-6)
            assert float(rows[record["preset"]][f"{metric}_std"]) == 0.0
    teacher = json.loads((out / "teacher.json").read_text())["metrics"]
    assert float(rows["teacher"]["acc1_mean"]) == pytest.approx(teacher["acc1"])
    table = (out / "table.md").read_text()
    assert "| teacher `tiny-vit-teacher` (reference) |" in table and "| clip-rd - baseline | " in table

    # a rerun trains nothing: finished (preset, seed) runs are skipped
    checkpoint = out / "runs" / "clip-rd-seed0" / "checkpoints" / "epoch_latest.pt"
    stamp = checkpoint.stat().st_mtime_ns
    ablate_cmd.main(_argv(tmp_path, quick_cache))
    assert ablate.read_jsonl(out / "runs.jsonl") == records and checkpoint.stat().st_mtime_ns == stamp
    assert (out / "ablate.log").read_text().count("finished earlier, skipped") == 2

    # an interrupted run (stopped mid-way with its checkpoint) is resumed, not restarted, and reaches all its steps
    settings, _ = ablate_cmd.parse_args(_argv(tmp_path, quick_cache, "--presets", "clip-kd+vrd"))
    settings = replace(settings, base=ablate.prepare_quick(settings.base, logging.getLogger("test_ablate")))
    interrupted = replace(ablate.run_config(settings, "clip-kd+vrd", 0), stop_after_steps=40)
    stopped = run(interrupted, resolve(interrupted, progress=False))
    assert not stopped.finished and stopped.steps == 40
    ablate_cmd.main(_argv(tmp_path, quick_cache, "--presets", "baseline", "clip-kd+vrd", "clip-rd"))
    records = ablate.read_jsonl(out / "runs.jsonl")
    assert [(r["preset"], r["steps"]) for r in records] == [("baseline", 64), ("clip-rd", 64), ("clip-kd+vrd", 64)]
    assert records[2]["weights"] == {**records[2]["weights"], "fd": 2000.0, "vrd": 1.0, "xrd": 0.0}
    assert "resumed from" in (out / "runs" / "clip-kd+vrd-seed0" / "out.log").read_text()
    assert [r["preset"] for r in csv.DictReader(open(out / "table.csv"))] == ["teacher", "baseline", "clip-kd+vrd",
                                                                            "clip-rd"]

    # other shared settings into the same table are refused with a message naming them
    message = command_error(ablate_cmd.main, _argv(tmp_path, quick_cache, "--epochs", "3"))
    assert re.search(r"holds runs made with other settings .*'epochs': \(2, 3\)", message), message


def test_summary_statistics_and_two_std_rule():
    records = [{"preset": p, "seed": s, "metrics": {"acc1": v}}
               for p, values in (("baseline", (0.20, 0.22, 0.24)), ("clip-kd", (0.40, 0.41, 0.42)),
                                 ("clip-rd", (0.41, 0.43, 0.39)))
               for s, v in enumerate(values)]
    table = ablate.summarise(records, ["baseline", "clip-kd", "clip-rd"])
    assert table["baseline"]["acc1"] == pytest.approx((0.22, 0.02)) and table["baseline"]["n"] == 3
    kd = ablate.compare(table, "clip-kd", "baseline", "acc1")
    assert kd["delta"] == pytest.approx(0.19) and kd["std"] == pytest.approx(0.02) and kd["beyond_2_std"]
    rd = ablate.compare(table, "clip-rd", "clip-kd", "acc1")
    assert rd["delta"] == pytest.approx(0.0) and not rd["beyond_2_std"]
    assert ablate.mean_std([0.5]) == (0.5, 0.0)


def test_fused_matches_reference_loss_curves(tmp_path, quick_cache):
    """Same seed, clip-rd, batch 32: the fused (chunked on CPU) and the reference backend give the same loss curves
    to fp32 tolerance over 200 training steps (the total at every step, every term at the first step)."""
    settings, _ = ablate_cmd.parse_args(["--quick", "--cache-dir", str(quick_cache), "--logs", str(tmp_path),
                                     "--name", "eq"])
    log = logging.getLogger("test_ablate")
    settings = replace(settings, base=ablate.prepare_quick(settings.base, log))
    assert settings.equivalence_steps == 200 and settings.base.batch_size == 32
    result = ablate.equivalence(settings, log)
    out = tmp_path / "eq" / "equivalence"
    assert (out / "equivalence.png").exists() and json.loads((out / "equivalence.json").read_text()) == result
    assert result["steps"] == 200 and set(result["terms"]) == set(ablate.EQUIVALENCE_TERMS)
    for term, diff in result["terms"].items():  # step 1: same weights and batch, fp32 arithmetic only
        assert diff["first_step_rel"] <= ablate.EQUIVALENCE_RTOL, (term, diff)
    assert result["terms"]["total"]["max_rel"] <= ablate.EQUIVALENCE_RTOL, result["terms"]["total"]
    assert result["passed"]

    # the comparison can fail: the reference curve of another seed, or one perturbed step, exceeds the tolerance
    fused = ablate.read_jsonl(out / "fused" / "metrics.jsonl")
    reference = ablate.read_jsonl(out / "reference" / "metrics.jsonl")
    perturbed = [dict(r) for r in reference]
    perturbed[150]["xrd"] *= 1 + 100 * ablate.EQUIVALENCE_RTOL
    diffs = ablate.compare_curves(fused, perturbed)
    assert diffs["xrd"]["max_rel"] > ablate.EQUIVALENCE_RTOL and diffs["xrd"]["worst_step"] == 151
    assert diffs["total"]["max_rel"] == result["terms"]["total"]["max_rel"]
    with pytest.raises(ValueError, match="different steps"):
        ablate.compare_curves(fused[:-1], reference[1:])
    assert math.isfinite(result["wall_s"]) and torch.isfinite(torch.tensor(fused[-1]["total"]))


def _refused(argv) -> str:
    message = command_error(ablate_cmd.main, argv)
    assert message is not None, "not refused"
    return message


def test_bad_flags_are_refused_before_anything_is_written(tmp_path, synth_data):
    data = ["--train-data", synth_data["train"], "--val-data", synth_data["val"], "--seeds", "0",
            "--cache-dir", tmp_path / "cache"]
    cases = {
        ("--epochs", "0"): "--epochs: must be >= 1, got 0",
        ("--batch-size", "0"): "--batch-size: must be >= 1, got 0",
        ("--quick", "--epochs", "0"): "--epochs: must be >= 1, got 0",
        ("--equivalence-steps", "-5"): "--equivalence-steps: must be >= 0",
        ("--model", "nosuch"): "--model: unknown model 'nosuch'",
        ("--teacher", "nosuch"): "--teacher: unknown model 'nosuch'",
        ("--presets", "nosuch"): "--presets: unknown ablation preset(s) ['nosuch']",
        ("--train-data", tmp_path / "none-{0..1}.tar"): "--train-data: missing shard(s)",
    }
    for extra, expected in cases.items():
        assert expected in _refused(["--logs", tmp_path / "logs", "--name", "x", *data, *extra])
    assert not (tmp_path / "logs").exists() and not (tmp_path / "cache").exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"--logs {afile}: cannot create {afile / 'x'}" in _refused(["--logs", afile, "--name", "x", *data])


@pytest.mark.parametrize("content", ["{}", '{"shar', '{"shared": 3}'])
def test_damaged_ablation_record_is_named(tmp_path, synth_data, content):
    out = tmp_path / "logs" / "x"
    out.mkdir(parents=True)
    (out / "ablation.json").write_text(content)
    message = _refused(["--logs", tmp_path / "logs", "--name", "x", "--train-data", synth_data["train"],
                        "--val-data", synth_data["val"], "--cache-dir", tmp_path / "cache"])
    assert f"{out / 'ablation.json'}: unreadable or damaged" in message
    assert sorted(p.name for p in out.iterdir()) == ["ablate.log", "ablation.json"]


def test_reinforcement_study_on_small_data(tmp_path, synth_data, teacher_ckpt, tmp_path_factory):
    """The reinforcement study's machinery at a small size: every store built and measured before the runs, the
    variants' runs configured as named (views, online augmentation, the second teacher, the ensemble), both teachers'
    rows in the table; a rerun with another second teacher is refused."""
    second = seeded_checkpoint(tmp_path_factory, "tiny-vit-teacher", 321)
    argv = ["--study", "reinforcement", "--train-data", synth_data["train"], "--val-data", synth_data["val"],
            "--teacher-pretrained", str(teacher_ckpt), "--second-teacher-pretrained", str(second), "--epochs", "1",
            "--batch-size", "16", "--seeds", "0", "--cache-dir", str(tmp_path / "cache"), "--logs",
            str(tmp_path / "logs"), "--name", "r", "--presets", "no-aug", "store-k4", "online-aug",
            "store-k4-ensemble"]
    ablate_cmd.main(argv)
    out = tmp_path / "logs" / "r"
    stores = json.loads((out / "stores.json").read_text())
    assert set(stores) == {"no-aug", "store-k4", "store-k4-ensemble"}  # online: no store
    assert [(stores[p]["views"], stores[p]["teachers"], stores[p]["samples"]) for p in sorted(stores)] == \
        [(0, 1, 96), (4, 1, 96), (4, 2, 96)]
    assert stores["no-aug"]["bytes_per_sample"] < stores["store-k4"]["bytes_per_sample"] < \
        stores["store-k4-ensemble"]["bytes_per_sample"]
    assert all(record["build_s"] > 0 for record in stores.values())
    records = {r["preset"]: r for r in ablate.read_jsonl(out / "runs.jsonl")}
    assert list(records) == ["no-aug", "store-k4", "online-aug", "store-k4-ensemble"]
    configs = {p: torch.load(Path(r["run_dir"]) / "checkpoints" / "epoch_latest.pt", weights_only=False)["config"]
               for p, r in records.items()}
    assert configs["no-aug"]["augmentations"] == 0 and configs["store-k4"]["augmentations"] == 4
    assert configs["online-aug"]["online_teacher"] and configs["online-aug"]["online_augment"]
    assert ablate.run_config(ablate.AblationSettings(
        base=ablate.TrainConfig(teacher_pretrained=str(teacher_ckpt)), study="reinforcement",
        second_teacher=str(second)), "store-k4-teacher-b", 0).teacher_pretrained == str(second)
    assert configs["store-k4-ensemble"]["teacher_pretrained"] == [str(teacher_ckpt), str(second)]
    assert {c["preset"] for c in configs.values()} == {"clip-rd"} and {r["steps"] for r in records.values()} == {6}
    table = (out / "table.md").read_text()
    assert "| teacher `tiny-vit-teacher` (reference) |" in table and "| teacher-b `tiny-vit-teacher` (reference) |" \
        in table and "| store-k4-ensemble - store-k4 |" in table
    assert f"| store-k4 | 4 | 1 | 96 | {stores['store-k4']['bytes_per_sample']} | " in table
    rows = [r["preset"] for r in csv.DictReader(open(out / "table.csv"))]
    assert rows == ["teacher", "teacher-b", "no-aug", "store-k4", "online-aug", "store-k4-ensemble"]
    assert not any("k4c1" in p.name and "ensemble" not in p.name and str(second) in (p / "manifest.json").read_text()
                   for p in (tmp_path / "cache" / "stores").iterdir())  # teacher b's own row built no store
    assert (out / "ablation.png").exists() and not (out / "equivalence").exists()
    other = seeded_checkpoint(tmp_path_factory, "tiny-vit-teacher", 322)
    message = _refused([str(other) if a == str(second) else a for a in argv])
    assert "holds runs made with other settings" in message and "second_teacher" in message


def test_reinforcement_flags_refused(tmp_path, synth_data):
    data = ["--train-data", synth_data["train"], "--val-data", synth_data["val"], "--logs", tmp_path / "logs",
            "--cache-dir", tmp_path / "cache"]
    assert "--equivalence-steps: the fused-vs-reference check belongs to the losses study" in \
        _refused(["--study", "reinforcement", "--equivalence-steps", "5", *data])
    assert f"--second-teacher-pretrained: checkpoint file {tmp_path / 'no.pt'} does not exist" in \
        _refused(["--study", "reinforcement", "--second-teacher-pretrained", tmp_path / "no.pt", *data])
    assert "--presets: unknown ablation preset(s) ['store-k4'] for --study losses" in \
        _refused(["--presets", "store-k4", *data])
    assert not (tmp_path / "logs").exists() and not (tmp_path / "cache").exists()


def test_a_setting_added_after_the_record_counts_as_its_default(tmp_path):
    """An ablation folder written before the engine gained a setting: rerunning with that setting at its default is
    the same ablation; at another value it is refused."""
    settings = ablate.AblationSettings(base=ablate.TrainConfig(), logs=str(tmp_path), name="old")
    ablate.check_settings(settings)
    record = json.loads((settings.out_dir / "ablation.json").read_text())
    del record["shared"]["dataset_resampled"]
    (settings.out_dir / "ablation.json").write_text(json.dumps(record))
    ablate.check_settings(settings)  # accepted
    changed = replace(settings, base=replace(settings.base, dataset_resampled=True))
    with pytest.raises(ablate.ConfigError, match=r"'dataset_resampled': \(False, True\)"):
        ablate.check_settings(changed)
