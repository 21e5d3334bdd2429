"""`saeflow features` on the tiny store: what features.json reports against brute force over every
row of the split (the trained SAE run on the same batches of the same rows), against evaluate,
and against the model's unembedding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.evaluate.stage import METRICS_FILE
from pipeline.features.examples import top_examples
from pipeline.features.scan import split_rows
from pipeline.features.stage import features
from pipeline.generate.lm import load_language_model
from pipeline.sae.io import load_sae, save_sae
from pipeline.sae.metrics import heldout_metrics
from store.format import read_manifest, write_manifest
from store.loader import ActivationLoader
from store.reader import StoreReader
from store.split_moments import store_moments
from tests.test_cli import run_saeflow


def brute_force(run, split: str, batch_size: int) -> tuple[int, np.ndarray]:
    """(store row of each row of the split, (rows, d_sae) latents of every row of the split), batch
    by batch as the pass runs. The split's rows are its ranges (held-out chunks are spread)."""
    cfg = run.cfg
    sae = load_sae(f"{cfg.train.out_dir}/sae")
    reader = StoreReader(cfg.generate.store)
    first, n = split_rows(reader, split, cfg.loader.heldout_chunks)
    hook = sae.cfg.hook_point_in
    ranges = reader.split_ranges(split, cfg.loader.heldout_chunks)
    x = reader.read_tensor(hook, np.concatenate([np.asarray(reader.read_rows(hook, r.start, r.stop)) for r in ranges]), torch.float32)
    with torch.no_grad():
        acts = [sae(sae.normalize_input(x[i : i + batch_size]))[1].dense_feature_acts() for i in range(0, n, batch_size)]
        public = sae.encode(x)  # the public API on raw activations: the same latents
    acts = torch.cat(acts)
    torch.testing.assert_close(public, acts, rtol=1e-5, atol=1e-5)
    rows = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
    assert rows[0] == first and len(rows) == n
    return rows, acts.numpy()


@pytest.fixture(scope="module")
def reports(features_run):
    """(report, store rows, brute-force latents) per split."""
    return {"heldout": (features_run.heldout, *brute_force(features_run, "heldout", 4096)),
            "train": (features_run.train, *brute_force(features_run, "train", 1024))}


@pytest.mark.parametrize("split", ["heldout", "train"])
def test_top_rows_equal_a_brute_force_ranking(reports, split):
    report, rows, acts = reports[split]
    n = report["settings"]["top_examples"]
    frequent = np.argsort(-(acts > 0).sum(0), kind="stable")
    for latent in [*frequent[:3].tolist(), 0, 101, 255]:
        ranked = np.argsort(-acts[:, latent], kind="stable")[:n]  # ties: the earlier row, as the pass keeps them
        ranked = ranked[acts[ranked, latent] > 0]
        top = report["latents"][latent]["top"]
        assert [e["row"] for e in top] == rows[ranked].tolist(), latent
        assert [e["activation"] for e in top] == acts[ranked, latent].tolist()
    assert report["rows"] == acts.shape[0]


@pytest.mark.parametrize("split", ["heldout", "train"])
def test_every_latents_counts_histogram_and_interval_examples(reports, split):
    report, split_rows_, acts = reports[split]
    settings = report["settings"]
    sampled = 0
    for latent, entry in enumerate(report["latents"]):
        values = acts[:, latent][acts[:, latent] > 0]
        assert entry["fires"] == len(values) and entry["frequency"] == len(values) / acts.shape[0]
        assert entry["max_activation"] == values.max()
        assert entry["mean_activation"] == pytest.approx(values.astype(np.float64).mean(), rel=1e-9)
        width, counts = entry["histogram"]["bin_width"], entry["histogram"]["counts"]
        expected, _ = np.histogram(values.astype(np.float64), bins=len(counts), range=(0, width * len(counts)))
        assert counts == expected.tolist() and values.max() < width * len(counts) <= 2 * values.max()
        intervals = entry["intervals"]
        assert sum(interval["fires"] for interval in intervals) == len(values)
        assert all(a["high"] <= b["low"] for a, b in zip(intervals, intervals[1:]))
        for interval in intervals:
            inside = (values >= interval["low"]) & (values < interval["high"])
            assert interval["fires"] == int(inside.sum())
            rows = [e["row"] for e in interval["examples"]]
            assert len(rows) == len(set(rows)) == min(settings["interval_examples"], interval["fires"])
            for example in interval["examples"]:  # a real firing, in its interval
                assert interval["low"] <= example["activation"] < interval["high"]
                assert acts[np.searchsorted(split_rows_, example["row"]), latent] == example["activation"]
            sampled += interval["fires"] > settings["interval_examples"]
    if split == "train":
        assert sampled > 100  # most intervals hold more firings than they show: a real sample


def test_frequencies_and_summary_match_evaluate(features_run):
    cfg, report = features_run.cfg, features_run.heldout
    evaluated = json.loads((features_run.work / "results" / "tiny" / METRICS_FILE).read_text())["sae"]
    assert report["rows"] == evaluated["rows"]  # evaluate.n_tokens covers the held-out split
    for key in ("l0", "dead_latents", "dense_latents", "rows"):
        assert report["summary"][key] == pytest.approx(evaluated[key], rel=1e-9), key
    frequency = np.array([entry["frequency"] for entry in report["latents"]])
    assert frequency.sum() == pytest.approx(evaluated["l0"], rel=1e-9)
    assert int((frequency == 0).sum()) == evaluated["dead_latents"] and int((frequency > 0.1).sum()) == evaluated["dense_latents"]
    # and latent by latent, against the accumulator evaluate measures with, on evaluate's batches
    sae = load_sae(f"{cfg.train.out_dir}/sae")
    reader = StoreReader(cfg.generate.store)
    loader = ActivationLoader(reader, sae.cfg.hook_point_in, batch_size=cfg.evaluate.batch_size, split="heldout",
                              heldout_chunks=cfg.loader.heldout_chunks, max_rows=cfg.evaluate.n_tokens)
    mean = store_moments(reader, sae.cfg.hook_point_out, heldout_chunks=cfg.loader.heldout_chunks, track_covariance=False).mean
    assert frequency.tolist() == heldout_metrics(sae, loader, mean).firing_frequency().tolist()


def test_contexts_hold_the_store_tokens_and_the_latents_activation_on_each(features_run, reports):
    report, split_rows_, acts = reports["train"]
    reader = StoreReader(features_run.cfg.generate.store)
    tokens = np.asarray(reader.read_rows("tokens", 0, reader.n_rows))
    for segment in report["segments"]:
        start = segment["first_row"]
        assert segment["tokens"] == tokens[start : start + len(segment["tokens"])].tolist()
    width, checked = report["settings"]["context_tokens"], 0
    for latent in (3, 77, 200):
        entry = report["latents"][latent]
        for example in entry["top"] + [e for interval in entry["intervals"] for e in interval["examples"]]:
            own = example["row"] - example["first_row"]
            assert 0 <= own <= width and len(example["acts"]) - own - 1 <= width
            assert example["acts"][own] == pytest.approx(example["activation"], rel=1e-3)
            rows = np.arange(example["first_row"], example["first_row"] + len(example["acts"]))
            inside = np.isin(rows, split_rows_)  # context rows may lie outside the split
            expected = acts[np.searchsorted(split_rows_, rows[inside]), latent]
            np.testing.assert_allclose(np.array(example["acts"])[inside], expected, rtol=1e-3, atol=1e-6)
            checked += int((expected > 0).sum())
    assert checked > 30
    assert all(str(t) in report["tokens"] for segment in report["segments"] for t in segment["tokens"])


def test_top_examples_api_matches_the_report(features_run):
    cfg, report = features_run.cfg, features_run.train
    sae = load_sae(f"{cfg.train.out_dir}/sae")
    examples = top_examples(sae, cfg.generate.store, 3, n=4, split="train", heldout_chunks=cfg.loader.heldout_chunks)
    assert [(e.row, e.activation) for e in examples] == [(e["row"], e["activation"]) for e in report["latents"][3]["top"][:4]]
    tokens = np.asarray(StoreReader(cfg.generate.store).read_rows("tokens", 0, 8192))
    for example in examples:
        assert example.tokens[example.index] == report["tokens"][str(tokens[example.row])]
        assert f"[[{example.tokens[example.index]}]]" in example.text
        assert example.activations[example.index] == pytest.approx(example.activation, rel=1e-5)


def test_logit_effects_are_the_decoder_rows_through_the_unembedding(features_run):
    cfg, report = features_run.cfg, features_run.train
    sae = load_sae(f"{cfg.train.out_dir}/sae")
    lm = load_language_model(cfg.model)
    w_u = lm.model.ln_final.weight.detach()[:, None] * lm.model.W_U.detach()
    k = report["settings"]["logit_tokens"]
    assert report["logit_effects_skipped"] is None
    for latent in (0, 9, 128):
        effect = (sae.W_dec[latent].detach() @ w_u).double()
        entry = report["latents"][latent]
        assert [i for i, _ in entry["promoted"]] == effect.topk(k).indices.tolist()
        assert [i for i, _ in entry["suppressed"]] == (-effect).topk(k).indices.tolist()
        assert [v for _, v in entry["promoted"]] == pytest.approx(effect.topk(k).values.tolist(), rel=1e-3)
        assert all(str(i) in report["tokens"] for i, _ in entry["promoted"] + entry["suppressed"])


def test_encoders_get_a_reason_instead_of_logit_effects(features_run, tmp_path):
    store, out = tmp_path / "store.zarr", tmp_path / "out"
    shutil.copytree(features_run.cfg.generate.store, store)
    shutil.copytree(features_run.cfg.train.out_dir + "/sae", out / "sae", ignore=shutil.ignore_patterns("checkpoints", "features"))
    manifest = read_manifest(store)
    manifest["model"] = {**manifest["model"], "name": "minilm", "has_lm_head": False, "is_causal": False}
    write_manifest(zarr.open_group(str(store), mode="r+"), manifest)
    cfg = features_run.cfg.model_copy(update={
        "generate": features_run.cfg.generate.model_copy(update={"store": str(store)}),
        "train": features_run.cfg.train.model_copy(update={"out_dir": str(out)}),
        "features": features_run.cfg.features.model_copy(update={"top_examples": 2, "interval_examples": 1}),
    })
    report = json.loads((features(cfg)["sae"] / "features.json").read_text())
    assert "minilm is not a causal language model" in report["logit_effects_skipped"]
    assert not any("promoted" in entry for entry in report["latents"])
    assert all(len(entry["top"]) <= 2 for entry in report["latents"])


def test_an_sae_that_never_fires_gets_a_report_without_examples(features_run, tmp_path):
    sae = load_sae(f"{features_run.cfg.train.out_dir}/sae")
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    save_sae(sae, tmp_path / "sae")
    cfg = features_run.cfg.model_copy(update={"train": features_run.cfg.train.model_copy(update={"out_dir": str(tmp_path)})})
    report = json.loads((features(cfg)["sae"] / "features.json").read_text())
    assert report["summary"]["dead_latents"] == len(report["latents"]) == sae.cfg.d_sae
    assert all(entry["fires"] == 0 and entry["top"] == [] and entry["mean_activation"] is None for entry in report["latents"])
    assert report["segments"] == [] and top_examples(sae, cfg.generate.store, 0, heldout_chunks=2) == []


def test_features_before_train_is_one_error_line(features_run):
    result = run_saeflow("features", "tiny.yaml", "--set", "train.out_dir=results/none", cwd=features_run.work)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no trained SAE in results/none/sae") and "saeflow train" in lines[0]


def test_every_variant_of_a_sweep_gets_its_features(features_run, tmp_path):
    for name in ("k8", "wide"):
        shutil.copytree(f"{features_run.cfg.train.out_dir}/sae", tmp_path / name, ignore=shutil.ignore_patterns("checkpoints", "features"))
    cfg = features_run.cfg.model_copy(update={"train": features_run.cfg.train.model_copy(
        update={"out_dir": str(tmp_path), "sweep": [{"name": "k8"}, {"name": "wide"}]})})
    written = features(cfg)
    assert sorted(written) == ["k8", "wide"]
    for name, directory in written.items():
        assert directory == tmp_path / name / "features" and (directory / "index.html").is_file()
        report = json.loads((directory / "features.json").read_text())
        assert report["variant"] == name and report["latents"] == features_run.heldout["latents"]
