"""Hostile and clumsy input, end to end through simcord: each input and the reply it gets.

Every row of ``CASES`` goes through a real slash command (options and attachments as a
member sends them) to the real bot, SQLite store and worker with tiny models. A row is
either refused by Discord's client before the bot sees it (simcord checks option lengths,
integer ranges and choices as Discord does), rejected by the bot with an ephemeral reply
that names the problem, or accepted and queued with cleaned text. A long job keeps the
worker busy meanwhile, so accepted rows wait in the queue and are cancelled.

After the table: the database passes ``PRAGMA integrity_check``, no job was stored for a
rejected input, every message the bot sent pings the requester at most, and another
member's /imagine still completes.
"""

from __future__ import annotations

import io
import re
import sqlite3
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import discord
import pytest
import pytest_asyncio
import simcord
from PIL import Image

from bot.client import ImagineBot, create_bot
from bot.guild_config import CONFIG_KEYS
from generator.request import RequestError
from tests.simworld import (
    BLOCKER,
    QUEUED_RE,
    TINY_CONFIG,
    apply_guild_config,
    create_admins_role,
    queued_job_id,
    tiny_settings,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGE_LIMIT = 2000


@dataclass
class World:
    env: simcord.Env
    bot: ImagineBot
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    role: simcord.RoleHandle
    admin: simcord.MemberActor
    alice: simcord.MemberActor
    bob: simcord.MemberActor
    database: str
    replies: list[tuple[str, str, str]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tiny_models, tmp_path_factory):
    settings = tiny_settings(tiny_models, tmp_path_factory.mktemp("bad-input-data"))
    bot = create_bot(settings)
    env = simcord.Env(bot)
    await env.start()

    guild = env.create_guild("Input club")
    channel = guild.create_text_channel("art")
    admins = create_admins_role(guild)
    role = guild.create_role("Painters")
    admin = guild.add_member(env.create_user("ada"), roles=[admins])
    alice = guild.add_member(env.create_user("alice"), roles=[role])
    bob = guild.add_member(env.create_user("bob"), roles=[role])
    await apply_guild_config(bot, guild.id, TINY_CONFIG)

    yield World(env, bot, guild, channel, role, admin, alice, bob, str(bot.store_path))

    await bot.close()
    await env.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def blocker(world):
    """A long job that keeps the worker busy while the table runs; cancelled after it."""
    job_id = await imagine(world, world.admin, BLOCKER)
    await wait_state(world.bot.store, job_id, "running")
    return job_id


# -- helpers ---------------------------------------------------------------------------------


async def imagine(world: World, member, prompt: str, **options) -> int:
    return queued_job_id(await member.slash(world.channel, "imagine", prompt=prompt, **options))



def count_jobs(world: World) -> int:
    """Count the rows of the jobs table through a second, read-only connection."""
    with sqlite3.connect(f"file:{world.database}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT count(*) FROM jobs").fetchone()[0]


def png_bytes(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 80).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_claiming(width: int, height: int, rows: int = 1) -> bytes:
    """Return a small grayscale PNG whose header claims ``width`` × ``height`` pixels.

    Only ``rows`` rows of pixel data follow, so the file costs nothing to build: a
    decompression bomb when the claimed size is huge.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1) * rows, 9)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def png_of_zeros(width: int, height: int) -> bytes:
    """Return a complete, valid grayscale PNG of ``width`` × ``height`` black pixels."""
    compressor = zlib.compressobj(1)
    row = b"\0" * (width + 1)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


HUNDRED_MEGAPIXELS = png_of_zeros(10_000, 10_000)
VALID_PNG = png_bytes(40)
VALID_JPEG = jpeg_bytes(64)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input and what the user must see.

    ``outcome`` is ``rejected`` (an ephemeral reply containing every string of ``expect``),
    ``refused`` (Discord's client refuses the option; simcord raises OptionError matching
    ``expect[0]``) or ``queued`` (accepted; ``stored`` is the prompt the job keeps).
    ``ROLE``, ``BOB`` and ``CHANNEL`` in string options become real ids.
    """

    name: str
    options: dict[str, Any]
    expect: tuple[str, ...] = ()
    outcome: str = "rejected"
    command: str = "imagine"
    stored: str | None = None


EMPTY = "The prompt is empty"
TOKENS = "but CLIP reads at most 77"
SEED_RANGE = "out of range: use a whole number from 0 to 4294967295"
NOT_READABLE = "is not a picture I can read"
TOO_LARGE = "over 4096×4096 pixels"

CASES = [
    # Empty and whitespace prompts, only negatives.
    Case("empty prompt", {"prompt": ""}, ("at least 1 characters",), "refused"),
    Case("one space", {"prompt": " "}, (EMPTY,)),
    Case("tabs and ideographic space", {"prompt": "\t \u3000 "}, (EMPTY,)),
    Case("zero-width spaces only", {"prompt": "\u200b\u200b\ufeff"}, (EMPTY,)),
    Case("joiner and combining mark only", {"prompt": "\u200d\u0301"}, (EMPTY,)),
    Case("flags only", {"prompt": "--seed 4 --iter 3"}, (EMPTY,)),
    Case("only --no", {"prompt": "--no fog"}, ("only negative parts",)),
    Case("--no plus negative option", {"prompt": "--no fog", "negative": "rain"},
         ("only negative parts",)),
    Case("only a negative weight", {"prompt": "fog::-1"}, ("only negative parts",)),
    Case("negative of commas", {"prompt": "a cat", "negative": " , "}, ("has an empty item",)),
    Case("negative of zero-width space", {"prompt": "a cat", "negative": "\u200b"},
         ("has an empty item",)),
    # Long prompts: Discord's 1000-character limit, then CLIP's 77 tokens.
    Case("10,000 characters", {"prompt": "x" * 10_000}, ("at most 1000 characters",),
         "refused"),
    Case("negative over 500 characters", {"prompt": "a cat", "negative": "fog " * 130},
         ("at most 500 characters",), "refused"),
    Case("999 characters of words", {"prompt": "a " * 499 + "a"}, (TOKENS, "502 tokens")),
    Case("78 tokens", {"prompt": "lighthouse " * 76}, (TOKENS, "78 tokens")),
    Case("long second part", {"prompt": "a cat | " + "dog " * 80}, (TOKENS, "`dog dog")),
    Case("long negative option", {"prompt": "a cat", "negative": "fog " * 100}, (TOKENS,)),
    Case("long --no", {"prompt": "a cat --no " + "rain " * 90}, (TOKENS,)),
    Case("40 negatives", {"prompt": "a cat", "negative": ", ".join(f"x{n}" for n in range(40))},
         ("41 prompts", "at most 32")),
    # Repeats count once, so they stay under the limit of 32 prompts.
    Case("one negative 90 times", {"prompt": "a cat", "negative": ", ".join(["fog"] * 90)},
         outcome="queued", stored="a cat"),
    Case("long malformed weight", {"prompt": "x:" + "1." * 499}, ("is not a valid weight",)),
    # Control and zero-width characters.
    Case("NUL", {"prompt": "a cat\x00"}, ("control character U+0000",)),
    Case("bell", {"prompt": "a \x07 bell"}, ("control character U+0007",)),
    Case("ANSI escape", {"prompt": "a \x1b[31mred cat"}, ("control character U+001B",)),
    Case("lone surrogate", {"prompt": "a \ud800 cat"}, ("control character U+D800",)),
    Case("NUL in negative", {"prompt": "a cat", "negative": "fo\x00g"},
         ("The negative contains the control character U+0000",)),
    Case("right-to-left override", {"prompt": "a \u202ecat"}, outcome="queued",
         stored="a cat"),
    Case("zero-width inside words", {"prompt": "a\u200b ca\u200bt\ufeff"}, outcome="queued",
         stored="a cat"),
    Case("line breaks", {"prompt": "a cat\r\nwith\nlines"}, outcome="queued",
         stored="a cat with lines"),
    Case("emoji with joiners", {"prompt": "a family \U0001f468\u200d\U0001f469\u200d\U0001f467"},
         outcome="queued", stored="a family \U0001f468\u200d\U0001f469\u200d\U0001f467"),
    # Markdown and mention injection: queued, shown escaped, pinging no one but the requester.
    Case("@everyone", {"prompt": "@everyone a cat"}, outcome="queued", stored="@everyone a cat"),
    Case("@here", {"prompt": "@here a cat"}, outcome="queued", stored="@here a cat"),
    Case("role mention", {"prompt": "<@&ROLE> a cat"}, outcome="queued", stored="<@&ROLE> a cat"),
    Case("user mention", {"prompt": "<@BOB> a cat"}, outcome="queued", stored="<@BOB> a cat"),
    Case("markdown", {"prompt": "**bold** __under__ ~~strike~~ `code` cat"}, outcome="queued"),
    Case("spoiler bars", {"prompt": "||spoiler|| cat"}, ("Part 1 of the prompt is empty",)),
    Case("masked link", {"prompt": "[click](https://example.com) a cat"}, outcome="queued"),
    Case("heading and quote", {"prompt": "# heading\n> quote"}, outcome="queued",
         stored="# heading > quote"),
    Case("mention in a flag value", {"prompt": "a cat --seed `@everyone`"},
         ("The seed `'@everyone'` is not a whole number",)),
    Case("mention in the negative", {"prompt": "a cat", "negative": "@everyone, <@&ROLE>"},
         outcome="queued"),
    # Weights. Midjourney's grammar reads "a::" as weight 1 and "a::x" as two parts.
    Case("a::", {"prompt": "a::"}, outcome="queued", stored="a::"),
    Case("a::x", {"prompt": "a::x"}, outcome="queued", stored="a::x"),
    Case("::2", {"prompt": "::2"}, ("has a weight but no text",)),
    Case("a::2::3", {"prompt": "a::2::3"}, ("has a weight but no text",)),
    Case("infinite weight", {"prompt": "cat::inf"}, ("'inf' in 'cat::inf' is not a finite",)),
    Case("NaN weight", {"prompt": "cat::nan"}, ("is not a finite number",)),
    Case("overflowing weight", {"prompt": "cat::1e400"}, ("is not a finite number",)),
    Case("zero weight", {"prompt": "cat:0"}, ("is 0, which would ignore the prompt",)),
    Case("zero Midjourney weight", {"prompt": "cat::0"}, ("is 0",)),
    Case("weight like a version", {"prompt": "a cat:1.2.3"}, ("'1.2.3'", "not a valid weight")),
    Case("weight without number", {"prompt": "a cat:"}, ("not a valid weight",)),
    Case("empty part", {"prompt": "a cat | | dog"}, ("Part 2 of the prompt is empty",)),
    # Duplicate, unknown and incomplete flags.
    Case("--seed twice", {"prompt": "a cat --seed 1 --seed 2"}, ("The seed is given 2 times",)),
    Case("--ar twice", {"prompt": "a cat --ar 1:1 --aspect 2:1"},
         ("The aspect is given 2 times",)),
    Case("--iter twice", {"prompt": "a cat --iter 5 --iterations 6"},
         ("The iterations is given 2 times",)),
    Case("seed flag and option", {"prompt": "a cat --seed 1", "seed": 2},
         ("given 2 times", "`seed:2`", "`--seed 1`")),
    Case("aspect flag and option", {"prompt": "a cat --ar 2:1", "aspect": "16:9"},
         ("The aspect is given 2 times",)),
    Case("iterations flag and option", {"prompt": "a cat --iter 2", "iterations": 3},
         ("The iterations is given 2 times",)),
    Case("--stylize", {"prompt": "a cat --stylize 100"}, ("Unknown option '--stylize'",)),
    Case("--v", {"prompt": "a cat --v 5"}, ("Unknown option '--v'",)),
    Case("em-dash flag", {"prompt": "a cat \u2014chaos 3"}, ("Unknown option '--chaos'",)),
    Case("--seed without value", {"prompt": "a cat --seed"}, ("`--seed` needs a value",)),
    Case("--no without value", {"prompt": "a cat --no"}, ("'--no' needs something",)),
    # Seeds.
    Case("seed -1", {"prompt": "a cat", "seed": -1}, ("The seed -1 is " + SEED_RANGE,)),
    Case("seed 2**32", {"prompt": "a cat", "seed": 2**32}, ("4294967296 is " + SEED_RANGE,)),
    Case("seed 2**53", {"prompt": "a cat", "seed": 2**53}, ("must be between",), "refused"),
    Case("seed of 23 digits", {"prompt": "a cat --seed 99999999999999999999999"},
         (SEED_RANGE,)),
    Case("hexadecimal seed", {"prompt": "a cat --seed 0x1F"}, ("`0x1F` is not a whole number",)),
    Case("fractional seed", {"prompt": "a cat --seed 1.5"}, ("`1.5` is not a whole number",)),
    # Sizes.
    Case("size -1", {"prompt": "a cat", "size": -1}, ("The size -1 is out of range", "16 to 64")),
    Case("size 0", {"prompt": "a cat", "size": 0}, ("The size 0 is out of range",)),
    Case("size 15", {"prompt": "a cat", "size": 15}, ("The size 15 is out of range",)),
    Case("size 100000", {"prompt": "a cat", "size": 100_000}, ("The size 100000 is out",)),
    Case("size 2**53-1", {"prompt": "a cat", "size": 2**53 - 1}, ("is out of range",)),
    # Iterations.
    Case("0 iterations", {"prompt": "a cat", "iterations": 0}, ("0 iterations is out of range",)),
    Case("-5 iterations", {"prompt": "a cat", "iterations": -5}, ("-5 iterations is out",)),
    Case("10**9 iterations", {"prompt": "a cat", "iterations": 10**9}, ("1 to 100000",)),
    Case("--iter 1e3", {"prompt": "a cat --iter 1e3"}, ("`1e3` is not a whole number",)),
    Case("--iter -1", {"prompt": "a cat --iter -1"}, ("-1 iterations is out of range",)),
    # Aspect ratios.
    Case("0:1", {"prompt": "a cat --ar 0:1"}, ("`0:1` has a zero side",)),
    Case("1:0", {"prompt": "a cat --ar 1:0"}, ("`1:0` has a zero side",)),
    Case("1000:1", {"prompt": "a cat --ar 1000:1"}, ("`1000:1` is too narrow", "1:4 and 4:1")),
    Case("16/9", {"prompt": "a cat --ar 16/9"}, ("`16/9` is invalid", "W:H")),
    Case("-1:2", {"prompt": "a cat --ar -1:2"}, ("`-1:2` is invalid",)),
    Case("1:1:1", {"prompt": "a cat --ar 1:1:1"}, ("`1:1:1` is invalid",)),
    Case("aspect not a choice", {"prompt": "a cat", "aspect": "5:4"}, ("only allows",),
         "refused"),
    # Attachments.
    Case("text file", {"prompt": "a cat", "image": ("notes.txt", b"hello")},
         ("'notes.txt' is not a picture (text/plain)",)),
    Case("PDF", {"prompt": "a cat", "image": ("report.pdf", b"%PDF-1.4\n%%EOF")},
         ("is not a picture (application/pdf)",)),
    Case("SVG", {"prompt": "a cat", "image": ("vector.svg", b"<svg></svg>")},
         ("is not a picture (image/svg+xml)",)),
    Case("text named .png", {"prompt": "a cat", "image": ("fake.png", b"not a png at all")},
         ("'fake.png' " + NOT_READABLE,)),
    Case("HTML named .jpg", {"prompt": "a cat", "image": ("page.jpg", b"<html></html>")},
         (NOT_READABLE,)),
    Case("PostScript named .png", {"prompt": "a cat", "image": ("eps.png", EPS)},
         (NOT_READABLE,)),
    Case("PNG named .gif", {"prompt": "a cat", "image": ("start.gif", VALID_PNG)},
         outcome="queued"),
    Case("no extension", {"prompt": "a cat", "image": ("picture", VALID_PNG)}, outcome="queued"),
    Case("empty file", {"prompt": "a cat", "image": ("empty.png", b"")}, ("an empty file",)),
    Case("truncated PNG", {"prompt": "a cat", "image": ("cut.png", VALID_PNG[:60])},
         ("'cut.png' is damaged or cut short",)),
    Case("truncated JPEG", {"prompt": "a cat",
                            "image": ("cut.jpg", VALID_JPEG[: len(VALID_JPEG) // 2])},
         ("'cut.jpg' is damaged or cut short",)),
    Case("100 megapixels", {"prompt": "a cat", "image": ("huge.png", HUNDRED_MEGAPIXELS)},
         ("'huge.png' is " + TOO_LARGE,)),
    Case("decompression bomb", {"prompt": "a cat",
                                "image": ("bomb.png", png_claiming(60_000, 60_000))},
         ("'bomb.png' is " + TOO_LARGE,)),
    Case("5000×4000 pixels", {"prompt": "a cat", "image": ("wide.png", png_claiming(5000, 4000))},
         ("is 5000×4000 pixels; the limit is 4096×4096",)),
    Case("9 MiB", {"prompt": "a cat", "image": ("big.png", b"\0" * (9 * 2**20))},
         ("is 9.0 MiB; the limit is 8 MiB",)),
    Case("mention as file name", {"prompt": "a cat", "image": ("@everyone.txt", b"x")},
         ("'@everyone.txt' is not a picture",)),
    # SQL-looking text everywhere.
    Case("SQL in prompt", {"prompt": "'; DROP TABLE jobs; --"}, outcome="queued",
         stored="'; DROP TABLE jobs; --"),
    Case("SQL in prompt and negative",
         {"prompt": "Robert'); DELETE FROM jobs WHERE 1=1; --", "negative": "x' OR '1'='1"},
         outcome="queued", stored="Robert'); DELETE FROM jobs WHERE 1=1; --"),
    Case("SQL in a flag value", {"prompt": "a cat --seed 1;DROP"}, ("`1;DROP` is not a whole",)),
    Case("SQL in --ar", {"prompt": "a cat --ar 1:1);DELETE"}, ("is invalid",)),
    Case("SQL in file name", {"prompt": "a cat", "image": ("x');DROP TABLE jobs;--.txt", b"x")},
         ("is not a picture (text/plain)",)),
    # /config keys and values (an admin's input) and /cancel job numbers.
    Case("unknown config key", {"key": "colour", "value": "red"}, ("Unknown setting 'colour'",),
         command="config set"),
    Case("SQL config key", {"key": "cutn; DROP TABLE guild_settings", "value": "1"},
         ("Unknown setting",), command="config set"),
    Case("SQL config value", {"key": "cutn", "value": "1; DROP TABLE jobs"},
         ("is not a whole number",), command="config set"),
    Case("negative config value", {"key": "max_size", "value": "-5"}, ("-5",),
         command="config set"),
    Case("huge config value", {"key": "default_iterations", "value": "9" * 30}, ("9999",),
         command="config set"),
    Case("unknown key to reset", {"key": "' OR 1=1 --"}, ("Unknown setting",),
         command="config reset"),
    Case("channel not in server", {"key": "allowed_channels", "value": "<#1>"},
         ("<#1>", "not a channel of this server"), command="config set"),
    Case("cancel job -1", {"job": -1}, ("#-1",), command="cancel"),
    Case("cancel a huge job number", {"job": 2**53 - 1}, (str(2**53 - 1),), command="cancel"),
]


def fill_ids(value: Any, world: World) -> Any:
    if not isinstance(value, str):
        return value
    return (
        value.replace("ROLE", str(world.role.id))
        .replace("BOB", str(world.bob.id))
        .replace("CHANNEL", str(world.channel.id))
    )


def case_name(case: Any) -> str:
    return case.values[0].name if hasattr(case, "values") else case.name


def plain_cases() -> list[Case]:
    return [case.values[0] if hasattr(case, "values") else case for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=case_name)
async def test_bad_input(world, blocker, case):
    member = world.admin if case.command.startswith("config") else world.alice
    options = {key: fill_ids(value, world) for key, value in case.options.items()}

    try:
        await check_case(world, case, member, options)
    finally:
        if case.command == "config set" and case.options["key"] in CONFIG_KEYS:
            # A row that wrongly succeeds must not change the server for the rows after it.
            await world.admin.slash(world.channel, "config reset", key=case.options["key"])


async def check_case(world: World, case: Case, member, options: dict[str, Any]) -> None:
    jobs_before = count_jobs(world)
    if case.outcome == "refused":
        with pytest.raises(simcord.OptionError, match=re.escape(case.expect[0])):
            await member.slash(world.channel, case.command, **options)
        world.replies.append((case.name, case.outcome, "(refused by Discord's client)"))
        assert count_jobs(world) == jobs_before
        return

    result = await member.slash(world.channel, case.command, **options)
    text = result.response.content
    world.replies.append((case.name, case.outcome, text))
    assert result.ephemeral
    assert len(text) <= MESSAGE_LIMIT

    if case.outcome == "queued":
        match = QUEUED_RE.fullmatch(text)
        assert match, text
        job = await world.bot.store.get(int(match[1]))
        assert job.state == "queued"
        if case.stored is not None:
            assert job.prompt == fill_ids(case.stored, world)
        world.accepted.append(job.id)
        cancelled = await world.admin.slash(world.channel, "cancel", job=job.id)
        assert cancelled.response.content == f"Cancelled #{job.id}."
        return

    for expected in case.expect:
        assert fill_ids(expected, world) in text
    assert "Queued as" not in text
    assert " is now " not in text
    assert "Something went wrong" not in text
    assert count_jobs(world) == jobs_before


async def test_table_size():
    assert len(CASES) >= 60
    assert {case.outcome for case in plain_cases()} == {"rejected", "refused", "queued"}


async def test_zero_width_cannot_hide_banned_word(world, blocker):
    await world.admin.slash(world.channel, "config set", key="banned_words", value="dragon")
    try:
        hidden = await world.alice.slash(world.channel, "imagine", prompt="a red dr\u200bagon")
        in_negative = await world.alice.slash(
            world.channel, "imagine", prompt="a castle", negative="dra\u00adgon"
        )
    finally:
        await world.admin.slash(world.channel, "config reset", key="banned_words")

    assert "'dragon'" in hidden.response.content
    assert "does not allow" in hidden.response.content
    assert "'dragon'" in in_negative.response.content


async def test_config_value_with_sql_is_text(world, blocker):
    value = "'; DELETE FROM jobs; --"
    changed = await world.admin.slash(
        world.channel, "config set", key="banned_words", value=value
    )
    try:
        stored = (await world.bot.store.guild_settings(world.guild.id))["banned_words"]
    finally:
        await world.admin.slash(world.channel, "config reset", key="banned_words")

    assert "banned_words" in changed.response.content
    assert stored == [value.lower()]
    assert count_jobs(world) > 0


async def test_generator_rejects_bomb(tmp_path):
    from generator.generate import _load_rgb

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(60_000, 60_000))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(VALID_PNG[:60])

    with pytest.raises(RequestError, match="too large"):
        _load_rgb(str(bomb), "init image")
    with pytest.raises(RequestError, match="could not be read"):
        _load_rgb(str(truncated), "init image")
    assert Image.MAX_IMAGE_PIXELS is not None


# -- after the table -------------------------------------------------------------------------


async def test_database_intact_after_table(world, blocker):
    with sqlite3.connect(f"file:{world.database}?mode=ro", uri=True) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        states = dict(
            connection.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        )

    # Only the blocker and the accepted rows were ever stored; the accepted ones are cancelled.
    queued_rows = sum(case.outcome == "queued" for case in plain_cases())
    assert len(world.accepted) == queued_rows
    assert states == {"running": 1, "cancelled": queued_rows}
    stored = sum(states.values())
    print(f"\ninputs tried: {len(CASES)}, queued: {queued_rows}, jobs stored: {stored}")


async def test_others_served_after_table(world, blocker):
    cancelled = await world.admin.slash(world.channel, "cancel", job=blocker)
    assert cancelled.response.content == f"Cancelled #{blocker}."
    await wait_state(world.bot.store, blocker, "cancelled")

    mentions = await imagine(world, world.alice, "@everyone <@&ROLE> **a cat**".replace(
        "ROLE", str(world.role.id)))
    job_id = await imagine(world, world.bob, "a quiet harbour")
    for finished in (mentions, job_id):
        await wait_state(world.bot.store, finished, "done")

    async def final_posted(job_id: int) -> discord.Message | None:
        for message in world.channel.history():
            if message.embeds and message.embeds[0].footer.text == f"Job #{job_id}":
                return message
        return None

    for finished in (mentions, job_id):
        message = await wait_for(lambda f=finished: final_posted(f), f"picture of {finished}")
        assert message.attachments[0].filename == f"imagine-{finished}.png"
        assert (await message.attachments[0].read()).startswith(b"\x89PNG")
    assert world.env.errors == []


async def test_messages_ping_requester_only(world):
    """Every message the bot sent, kept or deleted, allowed at most its requester's ping."""
    requesters = {member.id for member in (world.admin, world.alice, world.bob)}
    checked = 0
    for request in world.env.http_requests:
        payload = sent_payload(request)
        if payload is None:
            continue
        checked += 1
        mentions = payload.get("allowed_mentions")
        assert mentions is not None, (request.method, request.path, payload)
        assert mentions.get("parse") == [], (request.path, mentions)
        assert not mentions.get("roles"), (request.path, mentions)
        users = [int(user) for user in mentions.get("users", [])]
        assert len(users) <= 1, (request.path, mentions)
        for user in users:
            assert user in requesters
            assert f"<@{user}>" in payload.get("content", "")

    pinged = 0
    for messages in world.env.backend.messages.values():
        for message in messages.values():
            if message.author_id != world.bot.user.id:
                continue
            assert not message.mention_everyone, message.content
            assert message.ping_role_ids == [], message.content
            assert len(message.ping_user_ids) <= 1, message.content
            pinged += len(message.ping_user_ids)
    print(f"\nbot messages checked for mentions: {checked} payloads, {pinged} requester pings")
    assert checked > len(CASES)
    assert pinged >= 2


def sent_payload(request) -> dict[str, Any] | None:
    """Return the message body of a REST call that sends or edits a message, else None."""
    if request.method not in ("POST", "PATCH") or not isinstance(request.json, dict):
        return None
    body = request.json
    if request.path.endswith("/callback"):
        body = body.get("data") or {}
    elif not re.search(r"/messages(/\d+)?$|^/webhooks/\d+/[^/]+$", request.path):
        return None
    if not any(key in body for key in ("content", "embeds")):
        return None
    return body
