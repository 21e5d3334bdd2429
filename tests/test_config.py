"""Config validation: every mistake is one clear line through the CLI, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from pipeline import InitializerConfig, SAEConfig
from pipeline.config import ConfigError, ExperimentConfig, load_config, resolve_device
from pipeline.sweeps import per_sae_train_keys, sweep_variants
from tests.test_cli import one_error_line

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def write_config(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(TINY.read_text())
    mutate(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_seed_example_constructs_as_written():
    cfg = SAEConfig(
        hook_point_in="blocks.6.hook_resid_post",
        hook_point_out="blocks.6.hook_resid_post",
        use_glu_encoder=False,
        d_model=768,
        expansion_factor=8,
        act_fn="topk",
        top_k=64,
        dtype=torch.float32,
        device="cpu",
    )
    assert cfg.d_sae == 6144 and not cfg.is_transcoder
    init = InitializerConfig(bias_init_method="geometric_median", grid_search_init_norm=True,
                             init_encoder_bias_with_mean_hidden_pre=True)
    assert init.bias_init_method == "geometric_median"


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["train"].update(lerning_rate=1), "unknown config key 'train.lerning_rate'"),
        (lambda d: d["sae"].pop("d_model"), "missing config key 'sae.d_model'"),
        (lambda d: d["train"].update(total_tokens="many"), "invalid value for 'train.total_tokens'"),
        (lambda d: d["sae"].update(expansion_factor=1.3), "not a positive integer"),
        (lambda d: d["sae"].update(hook_point_in="blocks.9.hook_resid_post"), "not among generate.hook_points"),
    ],
)
def test_cli_reports_config_errors_in_one_line(tmp_path, mutate, expected):
    result = run_cli("train", str(write_config(tmp_path, mutate)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid keys here: .*lr"):
        load_config(write_config(tmp_path, lambda d: d["train"].update(lerning_rate=1)))


def test_set_overrides_apply_before_validation():
    cfg = load_config(TINY, ["train.lr=0.125", "sae.top_k=4"])
    assert cfg.train.lr == 0.125 and cfg.sae.top_k == 4
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["train.lr"])


def test_sweep_variants_apply_dotted_overrides():
    cfg = load_config(TINY, ["train.sweep=[{sae.top_k: 4}, {sae.top_k: 16, name: wide}]"])
    variants = dict(sweep_variants(cfg))
    assert list(variants) == ["top_k=4", "wide"]
    assert variants["top_k=4"].sae.top_k == 4 and variants["wide"].sae.top_k == 16
    with pytest.raises(ConfigError, match="repeat"):
        sweep_variants(load_config(TINY, ["train.sweep=[{sae.top_k: 4}, {sae.top_k: 4}]"]))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu-please")


def walk_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, FieldInfo) for every field of `model`, sections and their fields alike."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from walk_fields(field.annotation, f"{prefix}{name}.")


def test_every_config_field_describes_itself():
    keys = dict(walk_fields(ExperimentConfig))
    assert "model.random.seed" in keys and "sae.top_k" in keys and "initializer.seed" in keys
    undescribed = [key for key, field in keys.items() if not (field.description or "").strip()]
    assert not undescribed, f"fields without a description: {undescribed}"
    assert all("\n" not in field.description for field in keys.values())


def test_per_sae_train_keys_are_marked_on_the_fields():
    assert per_sae_train_keys() == {
        "lr", "betas", "lr_schedule", "lr_warmup_steps", "lr_decay_steps", "clip_grad_norm", "l1_coefficient",
        "l1_warmup_steps", "sparsity_penalty", "tanh_stretch", "k_anneal_steps", "k_anneal_start", "aux_k",
        "aux_k_coefficient", "dead_threshold_tokens", "decoder_norm", "autocast_dtype", "compile", "seed",
    }
    # shared by every variant: one loader pass feeds them all
    assert not {"total_tokens", "out_dir", "sweep", "log_every_steps"} & per_sae_train_keys()


def _set(section: str, **values):
    return lambda d: d[section].update(values)


# Bad values found by a hostile tester (issue 21): each is refused by `train` in one line naming
# the key; nothing runs and nothing is written.
BAD_VALUES = {
    "empty store path": (_set("generate", store=""), "'generate.store': String should have at least 1 character"),
    "negative max_docs": (_set("dataset", max_docs=-1), "'dataset.max_docs': Input should be greater than or equal to 1"),
    "log every 0 steps": (_set("train", log_every_steps=0), "'train.log_every_steps': Input should be greater than or equal to 1"),
    "negative lr": (_set("train", lr=-0.01), "'train.lr': Input should be greater than 0"),
    "zero total_tokens": (_set("train", total_tokens=0), "'train.total_tokens': Input should be greater than or equal to 1"),
    "negative total_tokens": (_set("train", total_tokens=-5), "'train.total_tokens': Input should be greater than or equal to 1"),
    "total_tokens under a batch": (_set("train", total_tokens=100), "train.total_tokens=100 is less than one batch (loader.batch_size=256); set it to at least 256"),
    "negative checkpoint interval": (_set("train", checkpoint_every_tokens=-5), "'train.checkpoint_every_tokens': Input should be greater than or equal to 1"),
    "beta of 1.5": (_set("train", betas=[0.9, 1.5]), "'train.betas.1': Input should be less than 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_one_line_and_nothing_runs(tmp_path, case):
    mutate, expected = BAD_VALUES[case]
    config = write_config(tmp_path, lambda d: (d["generate"].update(store=str(tmp_path / "s.zarr")),
                                               d["train"].update(out_dir=str(tmp_path / "run")), mutate(d)))
    assert expected in one_error_line("train", str(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_unreadable_config_text_and_overrides_are_one_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(TINY.read_bytes().replace(b"# Seconds", b"# Caf\xe9: seconds"))
    assert "latin1.yaml is not UTF-8 text (byte 0xe9 at offset 5); save the config as UTF-8" in one_error_line(
        "train", str(latin1))
    line = one_error_line("train", str(TINY), "--set", "train.lr=[1")
    assert "override 'train.lr=[1': the value is not valid YAML" in line and "fix its brackets" in line
