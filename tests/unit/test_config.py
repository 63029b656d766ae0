"""Config loading: defaults < YAML < overrides, strict keys and types, errors that name the key."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lvmtrain.config import ConfigError, load_config
from lvmtrain.config.loader import config_reference_markdown

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"data": {"train": "/x/{0..1}.tar"}, "train": {"steps": 5}}


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write(tmp_path, {**BASE, "optim": {"lr": 1e-3, "warmup_steps": 7}})
    cfg = load_config(path, ["optim.lr=3e-4", "data.batch_size=64", "eval.class_names=[a, b]"])
    assert cfg.optim.lr == 3e-4          # override beats the file
    assert cfg.optim.warmup_steps == 7   # file beats the default
    assert cfg.optim.weight_decay == 0.1  # default
    assert cfg.data.batch_size == 64 and cfg.eval.class_names == ["a", "b"]


def test_string_fields_take_overrides_as_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["run.name=off", "log.dir=123", "optim.lr=1e-3"])
    assert cfg.run.name == "off" and cfg.log.dir == "123" and cfg.optim.lr == 1e-3


def test_int_to_float_and_scientific_strings(tmp_path):
    cfg = load_config(write(tmp_path, {**BASE, "optim": {"lr": "5e-4", "min_lr": 0}}))
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.min_lr, float)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "optim.lr"]),
    ("optim.lr=fast", ["optim.lr", "a number", "fast"]),
    ("data.batch_size=2.5", ["data.batch_size", "an integer"]),
    ("train.precision=fp8", ["train.precision", "fp32"]),
    ("modle.name=x", ["modle", "model"]),
    ("model.name=vit_b61", ["vit_b16"]),
    ("data.workers=true", ["data.workers"]),
    ("optim=1", ["optim", "section"]),
])
def test_errors_name_the_key_and_the_fix(tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, {**BASE, "optim": {"weight_decy": 0.1}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim\.weight_decy.*optim\.weight_decay"):
        load_config(path)


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(write(tmp_path, {"data": {"train": "/x.tar"}}))
    with pytest.raises(ConfigError, match="eval.class_names"):
        load_config(write(tmp_path, {**BASE, "data": {"train": "/x.tar", "val": "/y.tar"}}))
    with pytest.raises(ConfigError, match="context_length"):
        load_config(write(tmp_path, BASE), ["model.name=vit_debug", "model.context_length=8"])


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        load_config(str(path))


@pytest.mark.parametrize("args, words", [
    (["configs/debug/clip.yaml", "optim.lrr=1"], ["optim.lrr", "optim.lr"]),
    (["configs/debug/clip.yaml", "data.batch_size=many"], ["data.batch_size", "integer"]),
    (["configs/debug/missing.yaml"], ["missing.yaml", "not found"]),
])
def test_cli_config_errors_exit_2_without_run_dir(tmp_path, args, words):
    log_dir = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "lvmtrain", "train", *args, f"log.dir={log_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), proc.stderr
    assert not log_dir.exists()


def test_readme_config_reference_is_generated_from_schema():
    readme = (REPO / "README.md").read_text()
    assert config_reference_markdown().strip() in readme, \
        "README's config reference is stale: regenerate it with `lvmtrain config docs`"


@pytest.mark.parametrize("overrides, words", [
    (["parallel.backend=deepspeed", "parallel.zero_stage=4"], ["parallel.zero_stage", "1, 2 and 3"]),
    (["parallel.backend=deepspeed", "parallel.offload_params=true"], ["offload_params", "zero_stage=3"]),
    (["parallel.meta_init=true"], ["meta_init", "fsdp"]),
    (["parallel.backend=fsdp", "train.precision=fp16"], ["fp16", "bf16"]),
    (["parallel.deepspeed_config=/nope.json"], ["deepspeed_config", "backend=deepspeed"]),
    (["parallel.backend=deepspeed", "parallel.deepspeed_config=/nope.json"], ["/nope.json", "not found"]),
    (["parallel.backend=zero"], ["parallel.backend", "deepspeed"]),
])
def test_parallel_checks(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides)
    for w in words:
        assert w in str(e.value)


def test_missing_deepspeed_says_how_to_install():
    """Without the extra installed, choosing DeepSpeed names the package to install."""
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "from lvmtrain.config.schema import ParallelConfig, ConfigError\n"
            "from lvmtrain.distributed.strategy import build_strategy\n"
            "try:\n    build_strategy(ParallelConfig(backend='deepspeed'), None, 'fp32')\n"
            "except ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'lvmtrain[deepspeed]'" in out


def test_deepspeed_fp16_on_cpu_is_refused_with_the_fix():
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    import torch

    from lvmtrain.config.schema import ParallelConfig
    from lvmtrain.distributed.strategy import build_strategy

    with pytest.raises(ConfigError, match="fp16.*bf16 or fp32"):
        dims = SimpleNamespace(device=torch.device("cpu"), rank=0, local_rank=0, world=1)
        build_strategy(ParallelConfig(backend="deepspeed"), dims, "fp16")


@pytest.mark.parametrize("override, message", [
    ("optim.betas=[0.9,", "'optim.betas': the value '[0.9,' is not valid YAML"),
    ("optim.lr=.inf", "'optim.lr' must be a finite number"),
    ("optim.lr=nan", "'optim.lr' must be a finite number"),
    ("train.steps=-5", "train.steps / train.epochs: must be >= 0"),
    ("model.patch_size=0", "model.patch_size: must be > 0"),
    ("model.context_length=0", "model.context_length: must be > 0"),
])
def test_values_that_cannot_train_are_refused_naming_the_key(tmp_path, override, message):
    """Issue: run safety. Each of these was accepted, or failed later with a traceback."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, BASE), [override])


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  train: /x/a.tar\ntrain:\n  steps: 3\noptim:\n  lr: 1.0e-3\noptim:\n  warmup_steps: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: duplicate key 'optim' \(lines 5 and 7\)"):
        load_config(str(path))


@pytest.mark.parametrize("verb", [["models"], ["config", "show", "configs/debug/clip.yaml"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(verb):
    """`lvmtrain ... | head`: the pipe is closed before the command writes; no BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "lvmtrain", *verb], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Error" not in err and b"Traceback" not in err, err.decode()[-2000:]


def test_a_key_added_by_a_later_version_at_its_default_neither_blocks_a_resume_nor_renames_the_run():
    from lvmtrain.config.loader import config_to_dict, identity_hash
    from lvmtrain.rundir import resume_differences

    cfg = load_config(str(REPO / "configs/debug/clip.yaml"))
    saved = config_to_dict(cfg)
    del saved["ssl"]  # a checkpoint written before the ssl section existed
    saved["eval"].pop("sets")
    assert resume_differences(saved, config_to_dict(cfg), []) == []
    changed = load_config(str(REPO / "configs/debug/clip.yaml"), ["ssl.mask_ratio=0.5"])
    assert resume_differences(saved, config_to_dict(changed), []) == ["ssl.mask_ratio ('-' -> 0.5)"]
    assert identity_hash(changed) != identity_hash(cfg)
    bare = config_to_dict(cfg)
    assert identity_hash(cfg) == identity_hash(load_config(None, [], base=("saved", {k: v for k, v in bare.items()
                                                                                      if k != "ssl"})))
