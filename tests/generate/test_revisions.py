"""model.revision and dataset.revision: passed to the loaders, recorded in the manifest, part of the
store's identity. Nothing is downloaded: the model test reads a real Hugging Face hub cache
(refs/<revision> -> snapshots/<commit>/) offline, as the hub client does after a download."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import DatasetConfig, ModelConfig, RandomModelConfig
from pipeline.generate.lm import ModelLoadError, load_language_model
from pipeline.generate.provenance import data_config
from pipeline.generate.random_lm import random_model_dir
from pipeline.generate.stage import generate
from pipeline.generate.text import DatasetError, dataset_fingerprint, describe_dataset, iter_documents
from store.format import open_store_group, read_manifest, write_manifest
from tests.generate.corpus import config_dict, make_config
from tests.test_cli import run_saeflow

HUB_REPO = "saeflow-test/tiny-gpt2"
# two revisions of one hub model, told apart by their width
REVISIONS = {"main": ("a" * 40, 32), "v2": ("b" * 40, 48)}


def hub_cache(root: Path) -> Path:
    """A hub cache holding HUB_REPO at both REVISIONS (snapshots of two seeded random GPT-2s)."""
    repo = root / f"models--{HUB_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    for ref, (commit, d_model) in REVISIONS.items():
        shutil.copytree(random_model_dir(RandomModelConfig(n_layers=1, d_model=d_model, n_heads=4, n_ctx=64)),
                        repo / "snapshots" / commit)
        (repo / "refs" / ref).write_text(commit)
    return root


def test_a_hub_model_loads_and_records_its_revision(tmp_path, corpus):
    data = config_dict(tmp_path / "store.zarr", corpus, hook_points=["blocks.0.hook_resid_post"], target_tokens=256)
    data["model"] = {"name": HUB_REPO, "revision": "v2", "device": "cpu"}
    data["sae"].update(hook_point_in="blocks.0.hook_resid_post", hook_point_out="blocks.0.hook_resid_post", d_model=48)
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(data))
    env = {"HF_HUB_CACHE": str(hub_cache(tmp_path / "hub")), "HF_HUB_OFFLINE": "1"}
    result = run_saeflow("generate", "hub.yaml", cwd=tmp_path, env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
    model = read_manifest(tmp_path / "store.zarr")["model"]
    # main would have given d_model 32: the revision reached the loader
    assert (model["d_model"], model["revision"], model["commit"]) == (48, "v2", REVISIONS["v2"][0])
    assert read_manifest(tmp_path / "store.zarr")["config"]["model"]["revision"] == "v2"
    missing = run_saeflow("generate", "hub.yaml", "--set", "model.revision=v3", "--overwrite", cwd=tmp_path, env_extra=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: model {HUB_REPO} at revision v3 is not available offline: give a local directory "
        "(model.name: /path/to/hf-model), use model.name: minilm, or connect to the Hugging Face hub")


@pytest.mark.parametrize("name", ["minilm", "random", "LOCAL"])
def test_a_model_without_revisions_refuses_one(tmp_path, name):
    if name == "LOCAL":
        name = str(tmp_path)
    with pytest.raises(ModelLoadError, match=f"model.revision applies to hub models only; remove it for model.name '{name}'"):
        load_language_model(ModelConfig(name=name, revision="v1"))


def test_a_hub_dataset_revision_is_recorded_and_changes_the_fingerprint():
    hub = DatasetConfig(source="saeflow-test/corpus", revision="v1")
    info = describe_dataset(hub)
    assert (info["kind"], info["revision"]) == ("hub", "v1")
    fingerprints = {dataset_fingerprint(hub.model_copy(update={"revision": r})) for r in (None, "v1", "v2")}
    assert len(fingerprints) == 3
    with pytest.raises(DatasetError, match="dataset saeflow-test/corpus at revision v1 is not available offline"):
        list(iter_documents(hub))


@pytest.mark.parametrize("source", ["python-docstrings", "CORPUS"])
def test_a_local_dataset_refuses_a_revision(source, corpus):
    cfg = DatasetConfig(source=str(corpus) if source == "CORPUS" else source, revision="v1")
    kind = "local" if source == "CORPUS" else source
    with pytest.raises(DatasetError, match=f"dataset.revision applies to hub datasets only; remove it for the {kind} source"):
        list(iter_documents(cfg))


def test_a_store_made_before_revisions_existed_is_still_this_configs(tmp_path, corpus, reference, lm):
    """Stores whose recorded config lacks the new keys (null by default) keep their identity."""
    store = tmp_path / "old.zarr"
    shutil.copytree(reference, store)
    manifest = read_manifest(store)
    for section, key in (("model", "revision"), ("dataset", "revision"), ("dataset", "token_field")):
        del manifest["config"][section][key]
        manifest[section].pop(key, None)
    write_manifest(open_store_group(store, mode="r+"), manifest)
    cfg = make_config(store, corpus)
    assert set(data_config(cfg)["dataset"]) - set(manifest["config"]["dataset"]) == {"revision", "token_field"}
    assert generate(cfg, lm=lm).already_complete
