import pytest

from bot.guild_config import (
    CONFIG_KEYS,
    CPU_DRAFT_PRESET,
    ConfigError,
    default_values,
    effective,
    find_banned_word,
    format_value,
    is_channel_allowed,
    parse_value,
)
from bot.settings import Settings

SETTINGS = Settings(max_size=512, max_iterations=1000, max_jobs_per_user=10)


# key, text typed by an admin, stored value
VALID_CASES = [
    ("default_iterations", "120", 120),
    ("default_iterations", " 1 ", 1),
    ("max_iterations", "1000", 1000),
    ("default_size", "256", 256),
    ("max_size", "32", 32),
    ("cutn", "64", 64),
    ("progress_interval", "10", 10),
    ("max_jobs_per_user", "10", 10),
    ("allowed_channels", "<#123> <#456>", [123, 456]),
    ("allowed_channels", "123, 456,123", [123, 456]),
    ("allowed_channels", "all", []),
    ("allowed_channels", "", []),
    ("banned_words", "Gore, blood ,  red   mist", ["gore", "blood", "red mist"]),
    ("banned_words", "none", []),
    ("DEFAULT_SIZE", "128", 128),
]


@pytest.mark.parametrize(("key", "text", "expected"), VALID_CASES)
def test_parse_valid_values(key, text, expected):
    assert parse_value(key, text, SETTINGS) == expected


# key, text, a fragment the error message must contain
INVALID_CASES = [
    ("default_iterations", "0", "from 1 to 1000"),
    ("default_iterations", "1001", "from 1 to 1000"),
    ("default_iterations", "many", "not a whole number"),
    ("max_size", "1024", "from 32 to 512 pixels"),
    ("default_size", "16", "from 32 to 512 pixels"),
    ("max_jobs_per_user", "11", "from 1 to 10"),
    ("cutn", "0", "from 1 to 128"),
    ("allowed_channels", "#general", "not a channel"),
    ("banned_words", "x" * 65, "at most 64 characters"),
    ("banned_words", ",".join(f"w{i}" for i in range(101)), "at most 100 entries"),
    ("colour", "red", "Unknown setting 'colour'"),
]


@pytest.mark.parametrize(("key", "text", "fragment"), INVALID_CASES)
def test_parse_invalid_values(key, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_value(key, text, SETTINGS)


def test_unknown_key_lists_keys():
    with pytest.raises(ConfigError) as raised:
        parse_value("colour", "red", SETTINGS)

    for key in CONFIG_KEYS:
        assert key in str(raised.value)


def test_bounds_follow_settings_caps():
    small = Settings(max_size=128, max_iterations=50, max_jobs_per_user=2)

    with pytest.raises(ConfigError, match="from 32 to 128"):
        parse_value("max_size", "256", small)
    with pytest.raises(ConfigError, match="from 1 to 2"):
        parse_value("max_jobs_per_user", "3", small)


def test_every_key_has_description_and_valid_default():
    for cpu in (False, True):
        defaults = default_values(SETTINGS, cpu=cpu)
        assert set(defaults) == set(CONFIG_KEYS)
        for name, key in CONFIG_KEYS.items():
            assert key.description.endswith(".")
            if key.kind == "int":
                low, high = key.bounds(SETTINGS)
                assert low <= defaults[name] <= high


def test_cpu_defaults_use_draft_preset():
    gpu = default_values(SETTINGS, cpu=False)
    cpu = default_values(SETTINGS, cpu=True)

    for key, value in CPU_DRAFT_PRESET.items():
        assert cpu[key] == value
    assert cpu["default_size"] < gpu["default_size"]
    assert cpu["default_iterations"] < gpu["default_iterations"]
    assert cpu["cutn"] < gpu["cutn"]


def test_effective_merges_guild_values():
    config = effective({"default_size": 192, "banned_words": ["gore"]}, SETTINGS)

    assert config["default_size"] == 192
    assert config["banned_words"] == ["gore"]
    assert config["max_size"] == 512
    assert config["allowed_channels"] == []


def test_effective_clamps_to_lowered_caps():
    stored = {"max_size": 512, "default_size": 512, "max_iterations": 1000, "retired_key": 1}
    lowered = Settings(max_size=256, max_iterations=100)

    config = effective(stored, lowered)

    assert config["max_size"] == 256
    assert config["default_size"] == 256
    assert config["max_iterations"] == 100
    assert "retired_key" not in config


def test_defaults_never_exceed_guild_maximums():
    config = effective({"max_size": 64, "max_iterations": 20}, SETTINGS)

    assert config["default_size"] == 64
    assert config["default_iterations"] == 20


def test_small_caps_clamp_cpu_preset():
    tiny = Settings(max_size=64, max_iterations=10)

    config = default_values(tiny, cpu=True)

    assert config["default_size"] == 64
    assert config["default_iterations"] == 10


def test_format_values():
    assert format_value("allowed_channels", [1, 2]) == "<#1> <#2>"
    assert format_value("allowed_channels", []) == "all channels"
    assert format_value("banned_words", []) == "none"
    assert format_value("default_size", 256) == "256 pixels"
    assert format_value("cutn", 16) == "16"


def test_channel_allowed():
    assert is_channel_allowed(effective({}, SETTINGS), 5)
    limited = effective({"allowed_channels": [1, 2]}, SETTINGS)
    assert is_channel_allowed(limited, 2)
    assert not is_channel_allowed(limited, 5)


@pytest.mark.parametrize(
    ("prompt", "found"),
    [
        ("a GORE scene", "gore"),
        ("gorestone castle", None),
        ("red   mist over water", "red mist"),
        ("a red misty morning", None),
        ("a calm lake", None),
    ],
)
def test_banned_words(prompt, found):
    config = effective({"banned_words": ["gore", "red mist"]}, SETTINGS)

    assert find_banned_word(config, prompt) == found
