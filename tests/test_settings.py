import logging
from pathlib import Path

import pytest

from bot.settings import Settings, SettingsError, TokenRedactor

TOKEN = "MTIzNDU2Nzg5.secret-token-value.abcdef"


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.token is None
    assert settings.device == "auto"
    assert settings.clip_models == ("ViT-B-32/openai",)
    assert settings.vqgan_model == "vqgan_imagenet_f16_16384"
    assert settings.models_dir == Path("data") / "models"


def test_reads_every_variable(tmp_path):
    settings = Settings.from_env(
        {
            "DISCORD_TOKEN": TOKEN,
            "IMAGINE_DATA_DIR": str(tmp_path),
            "IMAGINE_MODELS_DIR": str(tmp_path / "weights"),
            "IMAGINE_DEVICE": "CUDA:1",
            "IMAGINE_CLIP_MODEL": "ViT-B-32/openai, ViT-B-16/openai",
            "IMAGINE_VQGAN_MODEL": "wikiart_16384",
            "IMAGINE_MAX_SIZE": "768",
            "IMAGINE_MAX_ITERATIONS": "500",
            "IMAGINE_MAX_QUEUE": "20",
            "IMAGINE_MAX_JOBS_PER_USER": "3",
            "IMAGINE_OWNER_IDS": "111, 222",
            "IMAGINE_LOG_LEVEL": "debug",
            "IMAGINE_THREADS": "4",
        }
    )
    assert settings.require_token() == TOKEN
    assert settings.data_dir == tmp_path
    assert settings.models_dir == tmp_path / "weights"
    assert settings.device == "cuda:1"
    assert settings.clip_models == ("ViT-B-32/openai", "ViT-B-16/openai")
    assert settings.vqgan_model == "wikiart_16384"
    assert (settings.max_size, settings.max_iterations) == (768, 500)
    assert (settings.max_queue, settings.max_jobs_per_user) == (20, 3)
    assert settings.owner_ids == frozenset({111, 222})
    assert settings.log_level == "DEBUG"
    assert settings.threads == 4


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("IMAGINE_DEVICE", "gpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("IMAGINE_MAX_SIZE", "big", "whole number from 16 to 4096."),
        ("IMAGINE_MAX_SIZE", "8", "from 16 to 4096"),
        ("IMAGINE_MAX_ITERATIONS", "0", "from 1 to 100000"),
        ("IMAGINE_MAX_QUEUE", "-5", "from 1 to 100000"),
        ("IMAGINE_MAX_JOBS_PER_USER", "1.5", "whole number"),
        ("IMAGINE_OWNER_IDS", "alice", "not a Discord user id"),
        ("IMAGINE_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("IMAGINE_CLIP_MODEL", " , ", "MODEL/PRETRAINED"),
        ("IMAGINE_CLIP_MODEL", "garbage", "MODEL/PRETRAINED"),
        ("IMAGINE_CLIP_MODEL", "ViT-B-32/openai,/openai", "MODEL/PRETRAINED"),
    ],
)
def test_invalid_value_names_variable(variable, value, expected):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value, "DISCORD_TOKEN": TOKEN})
    message = str(caught.value)
    assert variable in message
    assert expected in message
    assert TOKEN not in message


def test_missing_token_says_how_to_get_one():
    with pytest.raises(SettingsError, match="developers/applications"):
        Settings.from_env({}).require_token()


def test_token_hidden_from_repr():
    assert TOKEN not in repr(Settings(token=TOKEN))


def test_redactor_masks_token_in_log_records(caplog):
    logger = logging.getLogger("test.redactor")
    caplog.handler.addFilter(TokenRedactor(TOKEN))
    with caplog.at_level(logging.INFO):
        logger.info("connecting with %s", TOKEN)
    assert TOKEN not in caplog.text
    assert "[token]" in caplog.text


INTERACTION_TOKEN = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5OmFiY2RlZg.x-Y_z"


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        # discord.py's HTTP client at DEBUG level.
        (f"POST https://discord.com/api/v10/webhooks/123/{INTERACTION_TOKEN} with None has "
         "returned 200", "/webhooks/123/[token] with None"),
        (f"POST https://discord.com/api/v10/interactions/456/{INTERACTION_TOKEN}/callback",
         "/interactions/456/[token]/callback"),
        # Its gateway at DEBUG level logs each event as a dict.
        (f"WebSocket Event: {{'t': 'INTERACTION_CREATE', 'd': {{'token': '{INTERACTION_TOKEN}'}}}}",
         "{'token': '[token]'}"),
        (f'{{"type": 2, "token": "{INTERACTION_TOKEN}", "id": "7"}}', '"token": "[token]", "id"'),
    ],
)
def test_redactor_masks_interaction_tokens(caplog, message, kept):
    logger = logging.getLogger("test.redactor")
    caplog.handler.addFilter(TokenRedactor(TOKEN))
    with caplog.at_level(logging.DEBUG):
        logger.debug("%s", message)

    assert INTERACTION_TOKEN not in caplog.text
    assert kept in caplog.text
