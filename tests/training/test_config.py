"""Command configs: flags generated from the dataclass, YAML merging, errors that name the field or key."""

import subprocess
import sys

import pytest
from steer.training.config import merge_config, parse_config, read_config_file, write_config
from steer.training.settings import DPAConfig, DPOConfig

from steer.errors import InvalidInput

PROG = "test"


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("data: [a.jsonl, b.jsonl]\nloss: ipo\nlora-r: 4\nlr: 0.001\nfull: true\noutput: from-yaml\n")
    config = merge_config(DPOConfig, ["--config", str(cfg), "--lora-r", "8", "--no-full", "--output", "x"], prog=PROG)
    assert config.data == ("a.jsonl", "b.jsonl") and config.loss == "ipo" and config.lr == 0.001
    assert config.lora_r == 8 and config.full is False and config.output == "x"
    assert config.lora_alpha == DPOConfig.__dataclass_fields__["lora_alpha"].default
    # A single value in YAML is accepted for a tuple field, and write_config round-trips.
    cfg.write_text("data: one.jsonl\noutput: o\n")
    assert merge_config(DPOConfig, ["--config", str(cfg)], prog=PROG).data == ("one.jsonl",)
    write_config(config, tmp_path / "resolved.yaml")
    assert merge_config(DPOConfig, ["--config", str(tmp_path / "resolved.yaml")], prog=PROG) == config


def test_unknown_or_mistyped_yaml_keys_name_key_and_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: [a.jsonl]\noutput: o\nlora_rank: 4\n")
    with pytest.raises(InvalidInput) as e:
        read_config_file(DPOConfig, cfg)
    assert e.value.field == f"{cfg}: lora_rank" and "unknown key" in str(e.value) and "lora_r" in str(e.value)
    cfg.write_text("data: [a.jsonl]\noutput: o\nlora_r: four\n")
    with pytest.raises(InvalidInput, match=r"bad.yaml: lora_r: must be an integer"):
        read_config_file(DPOConfig, cfg)
    cfg.write_text("- just\n- a list\n")
    with pytest.raises(InvalidInput, match="must be a mapping"):
        read_config_file(DPOConfig, cfg)


@pytest.mark.parametrize("argv,field", [
    (["--data", "a.jsonl"], "output"),
    (["--output", "o"], "data"),
    (["--data", "a", "--output", "o", "--lora-r", "0"], "lora_r"),
    (["--data", "a", "--output", "o", "--beta", "-1"], "beta"),
    (["--data", "a", "--output", "o", "--gamma", "0.5"], "gamma"),  # SimPO only
    (["--data", "a", "--output", "o", "--loss", "kto", "--label-smoothing", "0.1"], "label_smoothing"),
    (["--data", "a", "--output", "o", "--loss", "orpo", "--rpo-alpha", "1"], "rpo_alpha"),
    (["--data", "a", "--output", "o", "--rpo-alpha", "-1"], "rpo_alpha"),
    (["--data", "a", "--output", "o", "--max-prompt-length", "600"], "max_prompt_length"),
])
def test_bad_values_name_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(DPOConfig, argv, prog=PROG)
    assert e.value.code == 2
    assert f"{PROG}: error: {field}:" in capsys.readouterr().err


def test_dpa_validation_and_choices(capsys):
    with pytest.raises(InvalidInput, match="^samples:.*pool"):  # a preference pair needs two candidates
        DPAConfig(output="o", samples=1, guided_samples=0, contrast_samples=0)
    assert DPAConfig(output="o", samples=1, guided_samples=0, contrast_samples=0, loss="sft").pool_size == 1
    assert DPAConfig(output="o", samples=0, guided_samples=1, contrast_samples=1).pool_size == 2
    with pytest.raises(InvalidInput, match="^guided_samples:"):
        DPAConfig(output="o", guided_samples=-1)
    with pytest.raises(InvalidInput, match=r"^objectives\[0\]"):
        DPAConfig(output="o", objectives=("not valid!",))
    with pytest.raises(SystemExit):  # argparse choices
        parse_config(DPAConfig, ["--output", "o", "--loss", "dpo"], prog=PROG)
    assert "invalid choice" in capsys.readouterr().err


def test_settings_mirror_the_modules_they_stand_in_for():
    from steer.kernels.preference import LOSS_TYPES, NEEDS_REFERENCE, RPO_TYPES
    from steer.training import distributed, logprobs, settings, trainer

    assert settings.PREFERENCE_LOSSES == LOSS_TYPES and settings.NEEDS_REFERENCE == NEEDS_REFERENCE
    assert settings.RPO_LOSSES == RPO_TYPES
    assert settings.LOGPROB_IMPLS == logprobs.IMPLS and settings.DEVICES == distributed.DEVICES
    assert settings.PRECISIONS == trainer.PRECISIONS


@pytest.mark.parametrize("command,expect", [("dpo", "--data"), ("dpa", "--prompts")])
def test_help_is_fast_and_has_examples(command, expect):
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "steer.train", command, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout and "Examples:" in out.stdout and f"python -m steer.train {command}" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "steer.training.settings" in imported and "torch" not in imported  # --help loads no torch


def test_trl_names_in_yaml_and_flags(tmp_path):
    # A TRL DPOConfig YAML file (TrainingArguments names) runs as it is.
    cfg = tmp_path / "trl.yaml"
    cfg.write_text("output_dir: runs/x\nlearning_rate: 5.0e-6\nper_device_train_batch_size: 2\n"
                   "gradient_accumulation_steps: 8\nloss_type: ipo\nbeta: 0.2\nsave_steps: 50\nmax_steps: 100\n"
                   "max_length: 256\nmax_prompt_length: 64\nnum_train_epochs: 3.0\n"
                   "lr_scheduler_type: constant_with_warmup\nsave_total_limit: 1\nadam_epsilon: 1.0e-6\n")
    config = merge_config(DPOConfig, ["--config", str(cfg), "--data", "a.jsonl"], prog=PROG)
    assert (config.output, config.lr, config.batch_size, config.grad_accum, config.loss, config.beta) == (
        "runs/x", 5e-6, 2, 8, "ipo", 0.2)
    assert (config.save_every, config.max_steps, config.max_length, config.max_prompt_length) == (50, 100, 256, 64)
    assert (config.epochs, config.lr_schedule, config.keep_checkpoints, config.adam_eps) == (3, "constant", 1, 1e-6)
    # The same names as flags, dashed or as TRL spells them; ours still work beside them.
    flags = merge_config(DPOConfig, ["--data", "a.jsonl", "--output_dir", "o", "--learning-rate", "0.001",
                                     "--per_device_train_batch_size", "3", "--loss-type", "hinge",
                                     "--lr_scheduler_type", "cosine"], prog=PROG)
    assert (flags.output, flags.lr, flags.batch_size, flags.loss, flags.lr_schedule) == (
        "o", 0.001, 3, "hinge", "cosine")
    # dpa has no epochs field: num_train_epochs is unknown there, and says so.
    cfg.write_text("output_dir: o\nnum_train_epochs: 2\n")
    with pytest.raises(InvalidInput, match="num_train_epochs: unknown key"):
        read_config_file(DPAConfig, cfg)


def test_trl_name_and_own_name_together_is_an_error(tmp_path):
    cfg = tmp_path / "both.yaml"
    cfg.write_text("lr: 0.001\nlearning_rate: 0.002\n")
    with pytest.raises(InvalidInput) as e:
        read_config_file(DPOConfig, cfg)
    assert e.value.field == f"{cfg}: learning_rate" and "'lr'" in str(e.value)
    cfg.write_text("num_train_epochs: 1.5\n")  # TRL allows fractional epochs; we do not, and say which key
    with pytest.raises(InvalidInput, match="num_train_epochs: must be an integer"):
        read_config_file(DPOConfig, cfg)
    cfg.write_text("loss_type: [sigmoid, bco_pair]\n")  # TRL's multi-loss list: not a single loss
    with pytest.raises(InvalidInput, match="loss_type"):
        merge_config(DPOConfig, ["--config", str(cfg), "--data", "a", "--output", "o"], prog=PROG)


def test_log_level_any_case_and_named_when_wrong(tmp_path):
    assert merge_config(DPAConfig, ["--output", "o", "--log-level", "debug"], prog=PROG).log_level == "DEBUG"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output: o\nlog_level: warning\n")
    assert merge_config(DPAConfig, ["--config", str(cfg)], prog=PROG).log_level == "WARNING"
    cfg.write_text("output: o\nlog_level: chatty\n")
    with pytest.raises(InvalidInput) as e:
        merge_config(DPAConfig, ["--config", str(cfg)], prog=PROG)
    assert e.value.field == "log_level" and "chatty" in str(e.value)


def test_configure_logging_sets_the_level_and_refuses_unknown():
    import logging

    from steer.logs import configure_logging

    before = logging.getLogger().level
    try:
        configure_logging("error")
        assert logging.getLogger().level == logging.ERROR
        with pytest.raises(InvalidInput) as e:
            configure_logging("LOUD", field="log_level")
        assert e.value.field == "log_level"
    finally:
        logging.getLogger().setLevel(before)


def test_dpo_checks_epochs_and_max_steps():
    for field, value in (("epochs", 0), ("max_steps", -1)):
        with pytest.raises(InvalidInput) as e:
            DPOConfig(output="o", data=("a.jsonl",), **{field: value})
        assert e.value.field == field
