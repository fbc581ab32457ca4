"""eval/ablation.py: the study at a minimal budget (structure of the tables, JSON == Markdown, the PNG, rows really
configured as labelled) and the printed full-scale commands (every row named, every command accepted by its script's
parser).

Each training run is a subprocess (~10 s of CPU to start: the launcher and the script's imports), so the study runs
here with the paper's ablation rows a-d and generation (8 runs); the band-count sweep rows k2 and k8 are d with
another --model_config num_bands (two more runs each): the printed commands check how they are configured, and their
table and claim are checked on relabelled numbers."""

import copy
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from uae_gen import AutoencoderUAE
from uae_gen.data import load_demo_digits
from uae_gen.demo_classifiers import Judge, accuracy, classifier_features, predict, train_classifier
from uae_gen.metrics import frechet_distance_from_features
from uae_gen.scripts import train_dit as train_dit_script
from uae_gen.training.image_grid import CAPTION_HEIGHT, GRID_PADDING

REPO = Path(__file__).resolve().parents[1]
MINUTES, SEED = 0.01, 3
ROWS = ["a", "b", "c", "d", "gen"]
GENERATION_ROWS = ["uniform", "freq64x2"]  # the baseline and a frequency-token generator (its own step count)


def load_eval_script(name):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = load_eval_script("ablation")


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("ablation")
    returned = ablation.main(ablation.parse_args(["--out_dir", str(out), "--minutes", str(MINUTES),
                                                  "--seed", str(SEED), "--rows", *ROWS,
                                                  "--generation_rows", *GENERATION_ROWS]))
    return out, returned, json.loads((out / "ablation.json").read_text())


def markdown_tables(text: str) -> list[list[dict]]:
    """Every Markdown table of `text` as a list of {header: cell} rows."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            header = [cell.strip() for cell in lines[i - 1].strip("|").split("|")]
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("| "):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def test_step_counts_scale_split_and_clamp():
    full = ablation.step_counts(ablation.DEFAULT_MINUTES)
    assert {k: full[k] for k in ablation.FULL_BUDGET_STEPS} == ablation.FULL_BUDGET_STEPS
    assert full["tokenizer_stage1"] + full["tokenizer_stage2"] == full["tokenizer"]
    assert ablation.step_counts(ablation.DEFAULT_MINUTES / 2)["dit"] == round(ablation.FULL_BUDGET_STEPS["dit"] / 2)
    tiny = ablation.step_counts(MINUTES)
    assert {k: tiny[k] for k in ablation.MIN_STEPS} == ablation.MIN_STEPS
    assert (tiny["tokenizer_stage1"], tiny["tokenizer_stage2"]) == (1, 1)
    assert ablation.step_counts(4 * ablation.DEFAULT_MINUTES)["inference_steps"] == \
        ablation.FULL_BUDGET_STEPS["inference_steps"]


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0"], "minutes"), (["--minutes", "nan"], "minutes"),
    (["--rows", "a", "gen"], "'d'"), (["--rows", "a", "z"], "unknown rows"),
    (["--generation_rows", "freq64x2", "uniform"], "must be 'uniform' then"),
    (["--generation_rows", "uniform", "nope"], "must be 'uniform' then"),
    (["--preset", "imagenet256", "--generation_rows", "uniform", "lowpass-curriculum"], "no ImageNet command"),
    (["--preset", "imagenet256", "--generation_rows", "uniform", "freq64x4-shift2"], "shift follows its dimension"),
])
def test_bad_arguments_fail_before_training(argv, message):
    with pytest.raises(ValueError, match=message):
        ablation.parse_args(argv)


def test_every_row_present_with_finite_numbers_in_range(study):
    out, returned, result = study
    assert result == json.loads(json.dumps(returned))
    assert [row["key"] for row in result["tokenizer_rows"]] == ["a", "b", "c", "d"]
    assert result["settings"]["rows"] == ROWS
    assert [row["key"] for row in result["generation_rows"]] == GENERATION_ROWS
    assert result["steps"] == ablation.step_counts(MINUTES) and result["settings"]["seed"] == SEED
    for row in result["tokenizer_rows"]:
        assert math.isfinite(row["heldout_psnr"]) and row["heldout_psnr"] > 0
        assert -1 <= row["heldout_ssim"] <= 1
        assert math.isfinite(row["judge_fid"]) and row["judge_fid"] >= 0
        for key in ("judge_accuracy", "band0_probe_top1", "teacher_probe_top1"):
            assert 0 <= row[key] <= 1, (row["key"], key)
        assert row["wall_s"] >= 0
        expected_steps = [ablation.step_counts(MINUTES)["tokenizer"]] if row["encoder"] == "frozen" else [1, 1]
        assert [run["steps"] for run in row["runs"]] == expected_steps
    uniform = result["generation_rows"][0]
    assert uniform["dit_steps"] == ablation.MIN_STEPS["dit"] and uniform["train_step_ratio"] == 1.0
    for row in result["generation_rows"]:
        # Equal training time: steps scale with the measured step-time ratio, to a whole number of quarters.
        quarters = len(ablation.CHECKPOINT_FRACTIONS)
        target = max(ablation.MIN_STEPS["dit"], round(uniform["dit_steps"] / row["train_step_ratio"]))
        assert row["dit_steps"] % quarters == 0 and abs(row["dit_steps"] - target) <= quarters / 2
        guidance = ablation.guidance_of(row)
        assert guidance in ablation.GUIDANCE_GRID
        (run,) = row["runs"]  # one seed
        settings = [(score["step"], score["nfe"], ablation.guidance_of(score), score["per_class"])
                    for score in run["scores"]]
        final, per_class = row["dit_steps"], result["steps"]["samples_per_class"]
        large = ablation.LARGE_SAMPLE_FACTOR * per_class
        assert settings == [(final, ablation.REFERENCE_NFE, g, per_class) for g in ablation.GUIDANCE_GRID] + [
            (final, nfe, guidance, per_class) for nfe in ablation.NFE_GRID if nfe != ablation.REFERENCE_NFE] + [
            (step, ablation.REFERENCE_NFE, guidance, per_class) for step in row["checkpoint_steps"][:-1]] + [
            (final, ablation.REFERENCE_NFE, guidance, large)]
        for score in run["scores"]:
            assert 0 <= score["judge_accuracy"] <= 1 and math.isfinite(score["judge_fid"]) and score["ms_per_sample"] > 0
            assert len(score["judge_fids"]) == ablation.NUM_JUDGES
            assert score["judge_fid"] == pytest.approx(np.mean(score["judge_fids"]))
        chosen = {g: run["scores"][settings.index((final, ablation.REFERENCE_NFE, g, per_class))]["judge_fid"]
                  for g in ablation.GUIDANCE_GRID}
        assert chosen[guidance] == min(chosen.values())  # the scale and interval with the lowest judge-FID
        for name, setting in (("nfe25", (final, 25, guidance, per_class)), ("large", (final, 25, guidance, large))):
            score = run["scores"][settings.index(setting)]
            assert row["summary"][name]["judge_fid"] == [score["judge_fid"], 0.0]  # one seed: std 0
        assert row["sample_ms_ratio"] == row["summary"]["nfe25"]["ms_per_sample"][0] / \
            uniform["summary"]["nfe25"]["ms_per_sample"][0]
    floors = result["generation_floors"]
    assert [floor["samples"] for floor in floors] == [10 * per_class, 10 * large]
    assert all(0 <= floor[key] < math.inf for floor in floors for key in ("real", "decoded"))
    assert floors[0]["real"] != floors[1]["real"]  # scored on different image counts
    assert result["wall_time"]["total_s"] >= sum(v for k, v in result["wall_time"].items() if k != "total_s") - 1


def test_judge_panel_scores_are_means_over_judges_trained_from_their_own_seeds(one_torch_thread):
    train, heldout = load_demo_digits("train", seed=0), load_demo_digits("heldout", seed=0)
    torch.manual_seed(0)
    first = train_classifier(Judge(train.num_classes), train.images, train.labels, 3, seed=0)
    panel = ablation.JudgePanel.train(first, train, heldout, steps=3, seed=7, count=3)
    again = ablation.JudgePanel.train(first, train, heldout, steps=3, seed=7, count=3)
    assert panel.judges[0] is first and len(panel.judges) == 3
    for judge, twin in zip(panel.judges[1:], again.judges[1:]):  # judge j depends on seed + j alone
        assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), twin.state_dict().values()))
    images, labels = train.images[:60], train.labels[:60]
    scores = panel.scores(images, labels)
    by_hand = [frechet_distance_from_features(classifier_features(judge, images).numpy(),
                                              classifier_features(judge, heldout.images).numpy())
               for judge in panel.judges]
    assert scores["judge_fids"] == pytest.approx(by_hand) and len(set(by_hand)) == 3  # three different judges
    assert scores["judge_fid"] == pytest.approx(np.mean(by_hand))
    assert scores["judge_accuracy"] == pytest.approx(np.mean([accuracy(predict(j, images), labels)
                                                              for j in panel.judges]))


def test_markdown_shows_the_json_numbers(study):
    out, _, result = study
    text = (out / "ablation.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("ablation.md", "ablation.json"):  # written atomically, as ordinary files
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    ablation_table, sweep_table, generation_table, claims_table = markdown_tables(text)
    rows = {row["key"]: row for row in result["tokenizer_rows"]}
    assert [cell["row"] for cell in ablation_table] == ["a", "b", "c", "d"]
    assert [cell["row"] for cell in sweep_table] == ["d"]  # the sweep's K=4 row
    for cells in ablation_table + sweep_table:
        row = rows[cells["row"]]
        assert cells["K"] == str(row["num_bands"]) and cells["encoder"] == row["encoder"]
        assert cells["steps"] == " + ".join(str(run["steps"]) for run in row["runs"])
        for header, key, spec in ablation.TOKENIZER_COLUMNS:
            assert cells[header] == format(row[key], spec), (cells["row"], header)
    for cells, row in zip(generation_table, result["generation_rows"], strict=True):
        assert cells["generator"] == row["key"] and cells["DiT steps"] == str(row["dit_steps"])
        assert cells["CFG"] == ablation.guidance_cell(row)
        for header, setting, score, spec in ablation.GENERATION_COLUMNS:
            mean, std = row["summary"][setting][score]
            assert cells[header] == f"{mean:{spec}} ± {std:{spec}}", header
    assert [(c["claim"], c["reproduced"]) for c in claims_table] == \
        [(c["claim"], c["reproduced"]) for c in result["claims"]]
    assert len(result["claims"]) == 4  # all but the band-count sweep's


@pytest.mark.parametrize("k8_psnr_offset, stable", [(-0.4, "yes"), (-1.1, "no")])
def test_band_count_sweep_table_and_claim(study, k8_psnr_offset, stable):
    _, _, result = study
    swept = copy.deepcopy(result)
    d = next(row for row in swept["tokenizer_rows"] if row["key"] == "d")
    for key, psnr_offset, probe_offset in (("k2", 0.5, 0.0), ("k8", k8_psnr_offset, -0.04)):
        row = ablation.ROWS_BY_KEY[key]
        swept["tokenizer_rows"].append({**d, "key": key, "name": row.name, "num_bands": row.num_bands,
                                        "heldout_psnr": d["heldout_psnr"] + psnr_offset,
                                        "band0_probe_top1": d["band0_probe_top1"] + probe_offset})
    claims = ablation.paper_claims(swept)
    assert len(claims) == 5 and claims[3]["claim"].startswith("stable across K") and claims[3]["reproduced"] == stable
    sweep_table = markdown_tables(ablation.markdown_report({**swept, "claims": claims}))[1]
    assert [(cells["row"], cells["K"]) for cells in sweep_table] == [("k2", "2"), ("d", "4"), ("k8", "8")]
    assert sweep_table[2]["PSNR (dB)"] == format(d["heldout_psnr"] + k8_psnr_offset, ".2f")


def test_the_generation_claim_pits_the_best_low_to_high_row_against_the_best_uniform_row(study):
    _, _, result = study
    shifted = copy.deepcopy(result)
    uniform = next(row for row in shifted["generation_rows"] if row["key"] == "uniform")
    freq = next(row for row in result["generation_rows"] if row["key"] == "freq64x2")
    freq_fid = freq["summary"]["nfe25"]["judge_fid"]
    better_baseline = copy.deepcopy(uniform)  # a uniform baseline at another time shift, far better than any row
    better_baseline["key"] = "uniform-shift2"
    better_baseline["summary"]["nfe25"]["judge_fid"][0] = 0.5
    shifted["generation_rows"].append(better_baseline)
    assert ablation.paper_claims(result)[-1]["this_run"].startswith("freq64x2 vs uniform: ")
    claim = ablation.paper_claims(shifted)[-1]
    assert claim["claim"].startswith("the best low-to-high row beats uniform")
    # uniform-shift2 is no low-to-high candidate: it is the baseline, being the better uniform row
    assert claim["this_run"].startswith("freq64x2 vs uniform-shift2: ")
    assert f"judge-FID {freq_fid[0]:.1f} vs 0.5 " in claim["this_run"] and claim["reproduced"] != "yes"
    only_baselines = {**shifted, "generation_rows": [uniform, better_baseline]}
    assert not any(c["claim"].startswith("the best low-to-high") for c in ablation.paper_claims(only_baselines))


def test_png_has_the_originals_then_one_labelled_row_per_tokenizer_row(study):
    out, _, result = study
    assert result["reconstructions_png_rows"] == ["held-out", "a", "b", "c", "d"]
    with Image.open(out / "reconstructions.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    tile = 32
    assert pixels.shape[0] == GRID_PADDING + 5 * (tile + CAPTION_HEIGHT + GRID_PADDING)
    # The first tile is the first held-out digit 0, as 8-bit levels.
    heldout = load_demo_digits("heldout", seed=SEED)
    first = heldout.images[(heldout.labels == 0).nonzero()[0, 0]]
    expected = ((first + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels[GRID_PADDING:GRID_PADDING + tile, GRID_PADDING:GRID_PADDING + tile], expected)
    with Image.open(out / "samples.png") as image:  # one labelled row per generator
        assert image.height == GRID_PADDING + len(result["generation_rows"]) * (tile + CAPTION_HEIGHT + GRID_PADDING)
    with Image.open(out / "generation.png") as image:
        assert image.format == "PNG" and image.width > 400


def test_rows_are_trained_as_labelled(study):
    out, _, result = study
    rows = {row["key"]: row for row in result["tokenizer_rows"]}
    models = {key: AutoencoderUAE.from_pretrained(out / row["model_dir"]) for key, row in rows.items()}
    assert {key: model.config.num_bands for key, model in models.items()} == {"a": 1, "b": 4, "c": 4, "d": 4}

    teacher = load_file(str(out / "work" / "teacher_encoder.safetensors"))

    def encoder_change(key):
        state = models[key].encoder.backbone.state_dict()
        return max((state[name] - weight).abs().max().item() for name, weight in teacher.items())

    assert encoder_change("a") == 0 and encoder_change("b") == 0  # frozen: still the teacher
    assert encoder_change("c") > 0 and encoder_change("d") > 0  # stage 2 trained the encoder

    def summaries(key):
        return [json.loads((out / run["dir"] / "training_summary.json").read_text()) for run in rows[key]["runs"]]

    assert [(s["stage"], s["band_noise"]) for s in summaries("c")] == [(1, False), (2, False)]
    assert [(s["stage"], s["band_noise"]) for s in summaries("d")] == [(1, False), (2, True)]
    assert [(s["stage"], s["band_noise"]) for s in summaries("b")] == [(1, False)]
    assert "encoder" in summaries("d")[1]["trained"] and "encoder" not in summaries("b")[0]["trained"]
    assert rows["c"]["runs"][0] == rows["d"]["runs"][0]  # one shared stage 1

    # Probes: with K=1 band 0 is the whole latent of the frozen teacher; b's band 0 is the teacher's band 0.
    assert rows["a"]["band0_probe_top1"] == result["teacher"]["probe_top1"] == rows["a"]["teacher_probe_top1"]
    assert rows["b"]["band0_probe_top1"] == result["teacher"]["band0_probe_top1"]


def test_generators_are_trained_and_checkpointed_as_labelled(study):
    out, _, result = study
    expected = {  # (band stagger, frequency tokens, coefficients per token) the flags must give
        "uniform": (0.0, None, 1), "freq64x2": (0.0, 64, 2)}
    for row in result["generation_rows"]:
        run_dir = out / row["runs"][0]["dir"]
        scheduler = json.loads((run_dir / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
        transformer = json.loads((run_dir / "pipeline" / "transformer" / "config.json").read_text())
        trained = json.loads((run_dir / "training_summary.json").read_text())
        assert trained["global_step"] == row["dit_steps"] and trained["args"]["seed"] == SEED
        assert (scheduler["band_stagger"], transformer["frequency_tokens"],
                transformer["coefficients_per_token"]) == expected[row["key"]]
        assert scheduler["latent_dim"] == 64 * 8 * 8  # the dimension rule (shift 1), not dit_tiny's shift 2
        assert json.loads((run_dir / "pipeline" / "vae" / "config.json").read_text())["num_bands"] == 4  # d's
        assert sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*")) == row["checkpoint_steps"]


def test_a_rerun_in_the_same_directory_rescores_without_retraining(study, tmp_path):
    """The study's generators copied into a new --out_dir: a rerun keeps their budgets (work/generation_steps.json)
    and their weights, trains no DiT and scores them anew; a changed budget retrains."""
    out, _, result = study
    shutil.copytree(out / "work", tmp_path / "work", ignore=shutil.ignore_patterns("latents-d", "d", "stage1-*"))
    summaries = {row["key"]: (tmp_path / row["runs"][0]["dir"] / "training_summary.json").read_bytes()
                 for row in result["generation_rows"]}
    argv = ["--out_dir", str(tmp_path), "--minutes", str(MINUTES), "--seed", str(SEED), "--rows", "gen",
            "--latent_cache", str(out / "work" / "latents-d"), "--generation_rows", *GENERATION_ROWS]
    rerun = ablation.main(ablation.parse_args(argv))
    for before, after in zip(result["generation_rows"], rerun["generation_rows"], strict=True):
        assert after["dit_steps"] == before["dit_steps"] and after["train_step_ms"] == before["train_step_ms"]
        assert (tmp_path / after["runs"][0]["dir"] / "training_summary.json").read_bytes() == summaries[after["key"]]
        assert len(after["runs"][0]["scores"]) == len(before["runs"][0]["scores"])
    uniform_dir, steps = tmp_path / "work" / f"dit-uniform-s{SEED}", result["generation_rows"][0]["dit_steps"]
    assert ablation.is_trained(uniform_dir, steps, SEED)
    assert not ablation.is_trained(uniform_dir, steps + 4, SEED)  # another budget or seed retrains
    assert not ablation.is_trained(uniform_dir, steps, SEED + 1)


def test_a_curriculum_row_places_its_stages_at_fractions_of_the_budget():
    row = ablation.GENERATION_BY_KEY["lowpass-curriculum"]
    flags = row.train_flags(1100)
    assert flags[:len(row.flags)] == row.flags
    assert flags[len(row.flags):] == ("--time_shift", "auto", "--lowpass_schedule", "36@0", "49@275", "64@550")
    args = train_dit_script.parse_args(["--config", "dit_tiny", "--latent_cache", "unread", *map(str, flags)])
    assert args.lowpass_schedule == [(0, 36), (275, 49), (550, 64)] and args.latent_lowpass == 64
    assert not args.frequency_tokens and args.coefficients_per_token == 1
    uniform = ablation.GENERATION_BY_KEY["uniform"]
    assert uniform.train_flags(1100) == (*uniform.flags, "--time_shift", "auto")


def test_the_study_runs_at_the_dimension_rule_unless_a_row_says_otherwise():
    # dit_tiny's own shift is the tuned one; the study's rows keep the dimension rule they were measured at.
    def shift(key):
        flags = ablation.GENERATION_BY_KEY[key].train_flags(1100)
        return train_dit_script.parse_args(["--config", "dit_tiny", "--latent_cache", "c", *map(str, flags)]).time_shift

    assert train_dit_script.parse_args(["--config", "dit_tiny", "--latent_cache", "c"]).time_shift == 2.0
    assert [shift(key) for key in ("uniform", "freq64x2", "freq64x4", "progressive")] == ["auto"] * 4
    shift2 = ("uniform-shift2", "freq64x2-shift2", "freq64x4-shift2", "freq64x4-shift2-b64", "freq64x4-shift2-b128")
    assert [shift(key) for key in shift2] == [2.0] * 5
    assert ablation.TUNED_TIME_SHIFT == 2.0


def test_a_new_generator_is_timed_against_uniform_without_moving_the_stored_budgets(tmp_path, monkeypatch):
    # This machine is now twice as slow as when the study was timed: the new row keeps its ratio to uniform.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "generation_steps.json").write_text(json.dumps({"uniform": 0.25, "freq64x2": 0.14}))
    timed = []

    def step_seconds(rows, latent_cache, num_classes):
        timed.append([row.key for row in rows])
        return {"uniform": 0.5, "freq64x2": 0.3, "freq64x4-x": 0.2}

    monkeypatch.setattr(ablation, "dit_step_seconds", step_seconds)
    rows = [ablation.GENERATION_BY_KEY[key] for key in ("uniform", "freq64x2", "freq64x4-x")]
    seconds = ablation.generation_step_seconds(tmp_path, rows, tmp_path / "cache", 10)
    assert timed == [["uniform", "freq64x4-x"]]  # the missing row, side by side with the anchor
    assert seconds == pytest.approx({"uniform": 0.25, "freq64x2": 0.14, "freq64x4-x": 0.1})
    assert json.loads((tmp_path / "work" / "generation_steps.json").read_text()) == pytest.approx(seconds)
    assert ablation.generation_step_seconds(tmp_path, rows, tmp_path / "cache", 10) == seconds and len(timed) == 1


def test_each_generator_is_timed_with_its_own_batch(study, monkeypatch):
    # The batch rows spend the 16 tokens' cheaper step on more samples per step: their budget must come from a step
    # of their own batch, not the preset's 32.
    out, _, _ = study
    batches = {}
    make_transformer = ablation.train_dit_script.make_transformer

    def recording(args, *rest):
        model = make_transformer(args, *rest)
        key = f"b{args.train_batch_size}-{args.coefficients_per_token}"
        model.register_forward_pre_hook(lambda module, inputs: batches.setdefault(key, set()).add(len(inputs[0])))
        return model

    monkeypatch.setattr(ablation.train_dit_script, "make_transformer", recording)
    rows = [ablation.GENERATION_BY_KEY[key] for key in ("uniform", "freq64x4-shift2-b64", "freq64x4-shift2-b128")]
    seconds = ablation.dit_step_seconds(rows, out / "work" / "latents-d", 10)
    assert batches == {"b32-1": {32}, "b64-4": {64}, "b128-4": {128}}
    assert set(seconds) == {row.key for row in rows} and all(value > 0 for value in seconds.values())


def test_imagenet256_preset_prints_accepted_commands_for_every_row(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the printed commands run from the repository root
    text = ablation.main(ablation.parse_args(["--preset", "imagenet256", "--seed", "5"]))
    assert capsys.readouterr().out == text
    for key in ("a", "b", "c", "d", "k2", "k8"):
        assert f"# ({key}) " in text
    variables = set(re.findall(r"^(\w+)=\$\{\w+:-[^}]*\}", text, flags=re.M))
    assert variables == set(ablation.IMAGENET_VARIABLES)
    values = {name: str(tmp_path / name) for name in variables} | {"NGPU": "8"}

    parsers = {f"train/{name}.py": importlib.import_module(f"uae_gen.scripts.{name}").parse_args
               for name in ("train_tokenizer", "cache_latents", "train_dit")}
    parsers |= {f"eval/{name}.py": load_eval_script(name).parse_args
                for name in ("evaluate_reconstruction", "linear_probe", "sample", "evaluate_generation")}
    parsed = []
    for line in text.splitlines():
        if not line or line.startswith("#") or "=" in line.split()[0] or line.startswith("set "):
            continue
        tokens = shlex.split(string.Template(line).substitute(values))
        script = next(i for i, token in enumerate(tokens) if token.endswith(".py"))
        argv = tokens[script + 1:]
        if "--init_from" in argv:
            Path(argv[argv.index("--init_from") + 1]).mkdir(parents=True, exist_ok=True)
        parsed.append((tokens[script], parsers[tokens[script]](argv)))

    tokenizer_runs = [args for script, args in parsed if script == "train/train_tokenizer.py"]
    # a, b: stage 1 only; c/d share one stage 1; k2, k8: their own stage 1; stage 2 for c, d, k2, k8.
    assert [(a.stage, (a.model_config or {}).get("num_bands"), a.band_noise) for a in tokenizer_runs] == [
        (1, 1, False), (1, 4, False), (1, 4, False), (2, None, False), (2, None, True),
        (1, 2, False), (2, None, True), (1, 8, False), (2, None, True)]
    assert all(a.seed == 5 and a.pretrained_encoder == "timm/vit_base_patch14_reg4_dinov2.lvd142m"
               for a in tokenizer_runs)
    dit_runs = [args for script, args in parsed if script == "train/train_dit.py"]
    assert [(a.band_stagger, a.latent_lowpass, a.frequency_tokens, a.coefficients_per_token) for a in dit_runs] == [
        (0.0, None, False, 1), (0.0, 64, True, 2), (0.0, 64, True, 4)]
    assert all(a.model == "DiT-DH-XL" and a.latent_cache.endswith("latents-d") for a in dit_runs)
    counts = {name: sum(script == name for script, _ in parsed) for name in parsers}
    assert counts == {"train/train_tokenizer.py": 9, "train/cache_latents.py": 1, "train/train_dit.py": 3,
                      "eval/evaluate_reconstruction.py": 6, "eval/linear_probe.py": 6, "eval/sample.py": 3,
                      "eval/evaluate_generation.py": 3}
