"""The run config as a specification: the plan G = W x k x b, and nothing wrong slips through.

Two of (G, k, b) plus the world size W state a plan; the third is derived, and numbers that
cannot hold together are refused by name. Every other mistake in a YAML file or a
`--set key=value` override (an unknown key, a wrong type, an unknown name, a missing file)
is a `ConfigError` that names the dotted field, never a silently ignored typo.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from distshare.config import (
    PlanConfig,
    ResolvedPlan,
    RunConfig,
    dump_config,
    load_config,
    to_dict,
)
from distshare.errors import ConfigError, UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def plan(w=1, g=None, k=None, b=None) -> PlanConfig:
    return PlanConfig(world_size=w, global_batch=g, accum_steps=k, micro_batch=b)


def refused(overrides: list[str], path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# --- the plan: G = W x k x b ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "g", "k", "b", "expected"),
    [
        (1, 32, 2, None, (32, 1, 2, 16)),  # derive b
        (2, 32, 2, None, (32, 2, 2, 8)),
        (4, 48, 3, None, (48, 4, 3, 4)),
        (2, 32, None, 4, (32, 2, 4, 4)),  # derive k
        (3, 36, None, 12, (36, 3, 1, 12)),
        (2, None, 3, 5, (30, 2, 3, 5)),  # derive G
        (1, None, 1, 1, (1, 1, 1, 1)),
        (4, 64, 2, 8, (64, 4, 2, 8)),  # all three given and consistent
    ],
)
def test_any_two_of_g_k_b_plus_w_derive_the_third(w, g, k, b, expected):
    resolved = plan(w, g, k, b).resolve()
    assert resolved == ResolvedPlan(*expected)
    assert resolved.global_batch == resolved.world_size * resolved.accum_steps * resolved.micro_batch


def test_changing_w_rederives_from_the_two_given_numbers():
    # G=32, k=2 stays the statement; --nproc only changes W, and b follows.
    p = plan(1, g=32, k=2)
    assert [p.resolve(w).micro_batch for w in (1, 2, 4, 8)] == [16, 8, 4, 2]
    assert p.resolve(2).global_batch == 32  # the global batch, hence the training, is unchanged


@given(w=st.integers(1, 64), k=st.integers(1, 64), b=st.integers(1, 64))
def test_plan_resolution_inverts_the_product(w, k, b):
    assert plan(w, g=w * k * b, k=k).resolve().micro_batch == b
    assert plan(w, g=w * k * b, b=b).resolve().accum_steps == k
    assert plan(w, k=k, b=b).resolve().global_batch == w * k * b


@pytest.mark.parametrize(("w", "g", "k", "b"), [(1, 32, 2, 8), (2, 32, 2, 4), (4, 30, 1, 8)])
def test_inconsistent_numbers_are_refused(w, g, k, b):
    with pytest.raises(ConfigError) as info:
        plan(w, g, k, b).resolve()
    assert info.value.field == "plan"
    assert "inconsistent" in str(info.value)


@pytest.mark.parametrize(
    ("w", "g", "k", "b", "divisor"),
    [
        (2, 33, 1, None, "2 x 1 = 2"),  # G not divisible by W x k
        (4, 36, 2, None, "4 x 2 = 8"),
        (2, 30, None, 4, "2 x 4 = 8"),  # G not divisible by W x b
        (3, 32, None, 1, "3 x 1 = 3"),
    ],
)
def test_global_batch_not_divisible_is_refused(w, g, k, b, divisor):
    with pytest.raises(ConfigError) as info:
        plan(w, g, k, b).resolve()
    assert info.value.field == "plan.global_batch"
    assert divisor in str(info.value)


@pytest.mark.parametrize(("g", "k", "b"), [(None, None, None), (32, None, None), (None, 2, None), (None, None, 4)])
def test_fewer_than_two_of_g_k_b_is_refused(g, k, b):
    with pytest.raises(ConfigError) as info:
        plan(2, g, k, b).resolve()
    assert info.value.field == "plan"
    assert "give two of" in str(info.value)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"w": 0, "g": 32, "k": 1}, "plan.world_size"),
        ({"w": -2, "g": 32, "k": 1}, "plan.world_size"),
        ({"g": 0, "k": 1}, "plan.global_batch"),
        ({"g": -32, "k": 1}, "plan.global_batch"),
        ({"g": 32, "k": 0}, "plan.accum_steps"),
        ({"g": 32, "b": -1}, "plan.micro_batch"),
    ],
)
def test_non_positive_sizes_are_refused_by_name(kw, field):
    with pytest.raises(ConfigError) as info:
        plan(**kw).resolve()
    assert info.value.field == field
    assert "positive" in str(info.value)


def test_resolve_refuses_a_non_positive_world_passed_in():
    with pytest.raises(ConfigError, match="plan.world_size"):
        plan(1, g=32, k=1).resolve(world_size=0)


# --- YAML files and overrides -------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.name == name
    assert cfg.plan.resolve().global_batch == 32


def test_no_file_gives_the_defaults():
    assert load_config() == RunConfig().validate()


def test_dotted_overrides_set_fields_with_their_types():
    cfg = load_config(
        CONFIGS / "transformer.yaml",
        ["plan.world_size=4", "model.dtype=float64", "optim.lr=0.01", "model.positional=false"],
    )
    assert cfg.plan.world_size == 4 and cfg.plan.resolve().micro_batch == 4  # 32 / (4 x 2)
    assert cfg.model.dtype == "float64"
    assert cfg.optim.lr == 0.01
    assert cfg.model.positional is False


def test_an_integer_is_accepted_for_a_float_field():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float


def test_null_clears_an_optional_field_and_a_later_override_wins():
    cfg = load_config(None, ["plan.accum_steps=null", "plan.micro_batch=8", "plan.micro_batch=4"])
    assert cfg.plan.resolve() == ResolvedPlan(global_batch=32, world_size=1, accum_steps=8, micro_batch=4)


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("wold_size", "wold_size"),  # top level
        ("plan.wold_size", "plan.wold_size"),  # nested
        ("optim.betas", "optim.betas"),
        ("model.attention.heads", "model.attention"),  # the first unknown part is named
    ],
)
def test_unknown_keys_are_refused_by_dotted_name(key, field):
    err = refused([f"{key}=1"])
    assert err.field == field
    assert "unknown key" in err.problem


def test_unknown_key_in_a_yaml_file_is_refused_by_dotted_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("plan:\n  global_batch: 32\n  wold_size: 2\n")
    assert refused([], path).field == "plan.wold_size"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("plan.world_size=two", "plan.world_size"),  # string for int
        ("steps=true", "steps"),  # bool for int: YAML true is not 1
        ("plan.global_batch=32.0", "plan.global_batch"),  # float for int
        ("model.d_model=1.5", "model.d_model"),
        ("model.d_model={a: 1}", "model.d_model"),  # mapping for scalar
        ("optim.lr=[0.1]", "optim.lr"),  # list for scalar
        ("model.positional=1", "model.positional"),  # int for bool
        ("model.name=null", "model.name"),  # null for a required field
        ("plan=3", "plan"),  # scalar for a section
    ],
)
def test_wrong_types_are_refused_by_name(override, field):
    err = refused([override])
    assert err.field == field
    assert "expected" in err.problem


def test_a_value_cannot_be_used_as_a_section():
    assert refused(["steps=3", "steps.x=1"]).field == "steps"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.name=rnn", "model.name"),
        ("data.name=imagenet", "data.name"),
        ("engine=horovod", "engine"),
        ("sync=magic", "sync"),
        ("model.dtype=float16", "model.dtype"),
        ("model.norm=layer", "model.norm"),
        ("optim.name=lion", "optim.name"),
    ],
)
def test_unknown_names_are_refused_with_the_choices(override, field):
    err = refused([override])
    assert err.field == field
    assert "unknown value" in err.problem and "expected one of" in err.problem


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.momentum=-0.9", "optim.momentum"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("timeout_s=0", "timeout_s"),
        ("timeout_s=.inf", "timeout_s"),  # no collective may wait forever
        ("timeout_s=.nan", "timeout_s"),
        ("steps=0", "steps"),
        ("check_every=-1", "check_every"),
        ("data.num_samples=0", "data.num_samples"),
        ("model.kernel_size=4", "model.kernel_size"),
        ("model.n_heads=5", "model.d_model"),
    ],
)
def test_out_of_range_numbers_are_refused_by_name(override, field):
    assert refused([override]).field == field


def test_file_data_without_a_path_is_refused():
    err = refused(["data.name=file"])
    assert err.field == "data.path"


def test_file_data_with_a_missing_path_is_refused(tmp_path):
    missing = tmp_path / "missing.csv"
    err = refused(["data.name=file", f"data.path={missing}"])
    assert err.field == "data.path"
    assert str(missing) in err.problem


@pytest.mark.parametrize("text", ["model: [unclosed\n", "plan:\n  global_batch: 32\n world_size: 2\n", "a: b: c\n"])
def test_malformed_yaml_is_a_usage_error_with_the_line(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_config(path)


def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_config(path)


def test_a_config_file_that_is_not_text_is_a_usage_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(UsageError, match="cannot be read"):
        load_config(path)


@pytest.mark.parametrize("where", ["missing.yaml", "."])
def test_a_missing_config_file_is_a_usage_error(tmp_path, where):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / where)


@pytest.mark.parametrize("item", ["noequals", "=3", " =3"])
def test_an_override_without_key_and_value_is_a_usage_error(item):
    with pytest.raises(UsageError, match="key=value"):
        load_config(None, [item])


# --- the resolved config in every run directory reproduces the run -------------------------


@pytest.mark.parametrize(
    ("source", "overrides", "world_size"),
    [
        ("transformer", [], None),
        ("transformer", ["model.positional=false", "optim.lr=1"], 4),
        ("cnn", ["model.norm=group", "plan.accum_steps=null", "plan.micro_batch=4"], 2),
        (None, ["plan.global_batch=null", "plan.micro_batch=3", "plan.accum_steps=5"], 3),
    ],
)
def test_dumped_config_loads_back_to_the_same_run(tmp_path, source, overrides, world_size):
    cfg = load_config(CONFIGS / f"{source}.yaml" if source else None, overrides)
    path = tmp_path / "config.yaml"
    dump_config(cfg, path, world_size)
    back = load_config(path)

    resolved = cfg.plan.resolve(world_size)
    # The dump records all four plan numbers, resolved; every other field as configured.
    assert back == dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, **dataclasses.asdict(resolved)))
    assert back.plan.resolve() == resolved
    assert to_dict(back) == to_dict(cfg, world_size) == yaml.safe_load(path.read_text())
    again = tmp_path / "again.yaml"
    dump_config(back, again)
    assert again.read_text() == path.read_text()  # a fixed point
