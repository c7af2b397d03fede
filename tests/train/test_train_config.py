"""TrainConfig: strict YAML + --set parsing, the shipped configs, and CLI error handling."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yaml")

from click.testing import CliRunner  # noqa: E402

from diffcse_train.cli import main, train_cmd  # noqa: E402
from diffcse_train.config import (  # noqa: E402
    ConfigError,
    TrainConfig,
    load_config,
    resume_mismatch,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BASE = "model_name_or_path: m\ntrain_file: t.txt\noutput_dir: out\ngenerator_name_or_path: g\n"


# ---------------------------------------------------------------- paper and demo configs


@pytest.mark.parametrize(
    ("name", "model", "generator", "lr", "mask", "lam"),
    [
        # Table 12 (STS), with the official run script's settings
        ("sts_bert.yaml", "bert-base-uncased", "distilbert-base-uncased", 7e-6, 0.30, 0.005),
        ("sts_roberta.yaml", "roberta-base", "distilroberta-base", 1e-5, 0.20, 0.005),
        # Table 13 (transfer)
        ("transfer_bert.yaml", "bert-base-uncased", "distilbert-base-uncased", 2e-6, 0.15, 0.05),
        ("transfer_roberta.yaml", "roberta-base", "distilroberta-base", 3e-6, 0.15, 0.05),
    ],
)
def test_paper_configs_hold_the_paper_values(name, model, generator, lr, mask, lam):
    cfg = load_config(CONFIGS / name)
    assert cfg.model_name_or_path == model
    assert cfg.generator_name_or_path == generator
    assert cfg.learning_rate == pytest.approx(lr, rel=0, abs=1e-12)
    assert cfg.mask_ratio == pytest.approx(mask)
    assert cfg.lambda_weight == pytest.approx(lam)
    assert (cfg.batch_size, cfg.epochs, cfg.max_seq_length) == (64, 2, 32)
    assert (cfg.temperature, cfg.eval_steps) == (0.05, 125)
    assert (cfg.augmentation, cfg.projector, cfg.condition_on) == ("mlm", "batchnorm", "projector")
    assert cfg.precision == "fp16"
    assert cfg.max_steps is None
    assert cfg.pooling == "cls"  # the paper's protocol, said explicitly
    # the official code's details are the defaults
    assert cfg.generator_train_mode and cfg.rtd_loss_over_padding and cfg.eval_fp32
    assert cfg.projector_init == "normal"


def test_demo_config_needs_no_download():
    cfg = load_config(CONFIGS / "demo_cpu.yaml")
    assert cfg.model_name_or_path == "builtin:all-MiniLM-L6-v2"
    assert cfg.train_file == "builtin:wiki_en"
    # the paper's MLM path, with a generator the first run fits itself (fit_generator)
    assert cfg.needs_generator and cfg.fit_generator
    assert not cfg.generator_name_or_path.startswith("builtin:")
    assert cfg.max_seq_length == 32 and cfg.device == "cpu"
    # MiniLM keeps its own (mean) pooling; the run ends with export + before/after table
    assert cfg.pooling == "auto" and cfg.export_dir and "int8" in cfg.export_variants
    # the paper's protocol: STS-B dev picks the step, the input model competing, so it never
    # ships a model below MiniLM on STS-B dev; SICK-R trial is scored as a second opinion
    assert cfg.keep_initial and not cfg.gain_on_every_task
    assert cfg.select_tasks == ["STSBenchmark"] and "SICKRelatedness" in cfg.eval_tasks
    # it trains the SimCSE twin too and ships the better, naming it
    assert cfg.compare_with == "simcse"


# ---------------------------------------------------------------- strict parsing


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'learning_rat'.*'learning_rate'"):
        load_config(path)


def test_bad_type_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"key 'batch_size' must be an integer, got 'lots'"):
        load_config(path)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `7e-6` as a string; the config must still take it as the number.
    cfg = load_config(write(tmp_path / "c.yaml", BASE + "learning_rate: 7e-6\n"))
    assert cfg.learning_rate == 7e-6 and isinstance(cfg.learning_rate, float)


def test_set_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path / "c.yaml", BASE + "augmentation: delete\n")
    cfg = load_config(path, ["learning_rate=1e-5", "max_steps=3", "eval_data_dir=null"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.eval_data_dir) == (1e-5, 3, None)
    with pytest.raises(ConfigError, match="unknown key 'lamda'"):
        load_config(path, ["lamda=0.1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["lambda_weight"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("augmentation: shuffle\n", "'augmentation' must be one of"),
        ("mask_ratio: 1.5\n", "'mask_ratio' must be a finite number > 0 and < 1"),
        ("batch_size: 1\n", "'batch_size' must be an integer >= 2"),
        ("generator_name_or_path: null\n", "augmentation 'mlm' needs generator_name_or_path"),
        ("augmentation: none\n", "lambda_weight > 0 needs an augmentation"),
    ],
)
def test_inconsistent_values_are_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "c.yaml", BASE + extra))


def test_simcse_needs_no_generator(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", BASE + "lambda_weight: 0\n"))
    assert not cfg.needs_generator and not cfg.uses_discriminator


def test_required_keys_and_top_level_shape(tmp_path):
    with pytest.raises(ConfigError, match="'model_name_or_path' is required"):
        load_config(write(tmp_path / "a.yaml", "train_file: t\noutput_dir: o\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path / "b.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_retired_key_saved_as_null_still_loads_and_a_value_is_refused(tmp_path):
    """Runs saved before crash_at_step was removed list it as null: they still resume."""
    old = load_config(write(tmp_path / "old.yaml", BASE + "crash_at_step: null\n"))
    assert old == load_config(write(tmp_path / "new.yaml", BASE))
    with pytest.raises(ConfigError, match="key 'crash_at_step' was a test hook.*remove it"):
        load_config(write(tmp_path / "c.yaml", BASE + "crash_at_step: 5\n"))


def test_resume_mismatch_ignores_only_free_keys():
    a = TrainConfig(model_name_or_path="m", train_file="t", output_dir="o")
    b = TrainConfig(model_name_or_path="m", train_file="t", output_dir="o", save_steps=3)
    assert resume_mismatch(a, b) is None
    b.learning_rate = 1e-3
    assert "learning_rate" in resume_mismatch(a, b)


# ---------------------------------------------------------------- CLI


def test_cli_prints_one_line_errors(tmp_path):
    runner = CliRunner()
    typo = write(tmp_path / "c.yaml", BASE + "temprature: 0.05\n")
    result = runner.invoke(train_cmd, ["--config", str(typo)])
    assert result.exit_code == 1
    assert "unknown key 'temprature'" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1

    missing = write(
        tmp_path / "m.yaml",
        f"model_name_or_path: m\ntrain_file: {tmp_path / 'nope.txt'}\n"
        f"output_dir: {tmp_path / 'out'}\nlambda_weight: 0\n",
    )
    result = runner.invoke(train_cmd, ["--config", str(missing)])
    assert result.exit_code == 1 and "nope.txt: file not found" in result.output


def test_cli_refuses_to_overwrite_a_run_without_flag(tmp_path):
    out = tmp_path / "out"
    (out / "last").mkdir(parents=True)
    cfg = write(
        tmp_path / "c.yaml",
        f"model_name_or_path: m\ntrain_file: t\noutput_dir: {out}\nlambda_weight: 0\n",
    )
    result = CliRunner().invoke(train_cmd, ["--config", str(cfg)])
    assert result.exit_code == 1 and "--resume" in result.output and "--overwrite" in result.output
    result = CliRunner().invoke(train_cmd, ["--config", str(cfg), "--resume"])
    assert result.exit_code == 1 and "no last/ checkpoint" in result.output


def test_fit_generator_subcommand_dispatches(monkeypatch):
    import click

    seen = {}

    @click.command()
    @click.argument("args", nargs=-1)
    def fake(args):
        seen["args"] = args

    from diffcse_train import cli

    monkeypatch.setattr(cli, "fit_generator_cmd", fake)
    with pytest.raises(SystemExit) as exc:
        main(["fit-generator", "a", "b"])
    assert exc.value.code == 0 and seen["args"] == ("a", "b")


# ---------------------------------------------------------------- numeric ranges (issue 23, 14)

NUMERIC_KEYS = [
    name
    for name, hint in __import__("typing").get_type_hints(TrainConfig).items()
    if int in getattr(hint, "__args__", (hint,)) or float in getattr(hint, "__args__", (hint,))
]
NOT_FINITE = [float("nan"), float("inf"), float("-inf")]


def test_every_numeric_key_declares_its_range():
    from diffcse_runtime.bounds import field_bound

    assert {"learning_rate", "temperature", "lambda_weight", "seed"} <= set(NUMERIC_KEYS)
    assert [k for k in NUMERIC_KEYS if field_bound(TrainConfig, k) is None] == []


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("raw", ["nan", ".nan", "inf", "-.inf", "-1", "1e400"])
def test_non_finite_or_negative_set_values_are_refused_naming_the_key(tmp_path, key, raw):
    path = write(tmp_path / "c.yaml", BASE)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(path, [f"{key}={raw}"])


@pytest.mark.parametrize("text", ["temperature: .inf\n", "lambda_weight: .nan\n"])
def test_non_finite_file_values_name_the_file_and_key(tmp_path, text):
    path = write(tmp_path / "c.yaml", BASE + text)
    key = text.split(":")[0]
    with pytest.raises(ConfigError, match=f"c.yaml: key '{key}' must be a finite number"):
        load_config(path)


def test_ranges_hold_for_any_value(tmp_path):
    """Whatever number a key gets, load_config either accepts a finite value inside the
    declared range or raises one ConfigError naming that key: never a silent NaN."""
    import math

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from diffcse_runtime.bounds import field_bound

    path = write(tmp_path / "c.yaml", BASE)

    @settings(max_examples=300, deadline=None)
    @given(
        key=st.sampled_from(NUMERIC_KEYS),
        value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()),
    )
    def check(key, value):
        try:
            cfg = load_config(path, [f"{key}={value!r}".replace("nan", ".nan")])
        except ConfigError as exc:
            assert f"'{key}'" in str(exc) and "\n" not in str(exc)
            return
        got = getattr(cfg, key)
        assert math.isfinite(got) and field_bound(TrainConfig, key).problem(got) is None

    check()


@pytest.mark.parametrize(
    ("override", "key"),
    [("learning_rate=nan", "learning_rate"), ("temperature=inf", "temperature")],
)
def test_cli_refuses_non_finite_keys_in_one_line(tmp_path, override, key):
    cfg = write(tmp_path / "c.yaml", BASE)
    result = CliRunner().invoke(train_cmd, ["--config", str(cfg), "--set", override])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and f"key '{key}'" in result.output


def test_simcse_config_refuses_a_nan_lambda_instead_of_turning_d_off(tmp_path):
    cfg = TrainConfig(model_name_or_path="m", train_file="t", output_dir="o", lambda_weight=0.1)
    cfg.lambda_weight = float("nan")
    assert not cfg.uses_discriminator  # what the trainer would have read
    from diffcse_train.config import validate

    with pytest.raises(ConfigError, match="'lambda_weight' must be a finite number >= 0"):
        validate(cfg)


def test_option_type_refuses_what_click_float_range_lets_through():
    import click

    from diffcse_runtime.bounds import Bound, option_type

    assert click.FloatRange(min=0).convert("nan", None, None) != 0  # click: NaN passes
    kind = option_type(Bound(ge=0))
    for raw in ("nan", "inf", "-1", "x"):
        with pytest.raises(click.BadParameter):
            kind.convert(raw, None, None)
    assert kind.convert("2.5", None, None) == 2.5
