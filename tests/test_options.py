"""Table tests of the /imagine parser: inline flags, command options and their conflicts."""

from __future__ import annotations

import pytest

from bot.options import MAX_SEED, Limits, OptionsError, parse_imagine
from generator.prompts import MAX_PROMPTS, Prompt

LIMITS = Limits(default_size=256, max_size=512, default_iterations=300, max_iterations=1000)


def texts(options) -> list[tuple[str, float]]:
    return [(p.text, p.weight) for p in options.prompts]


@pytest.mark.parametrize(
    ("prompt", "kwargs", "expected"),
    [
        # Plain prompt: defaults from the limits, seed left to chance.
        ("a lighthouse", {}, {"prompts": [("a lighthouse", 1.0)], "seed": None,
                              "size": (256, 256), "iterations": 300}),
        # Inline flags anywhere in the text.
        ("a cat --seed 7", {}, {"prompts": [("a cat", 1.0)], "seed": 7}),
        ("--seed 7 a cat", {}, {"prompts": [("a cat", 1.0)], "seed": 7}),
        ("a cat --seed=7", {}, {"seed": 7}),
        ("a cat --SEED 7", {}, {"seed": 7}),
        ("a cat \u2014seed 7", {}, {"seed": 7}),
        ("a cat --seed 0", {}, {"seed": 0}),
        (f"a cat --seed {MAX_SEED}", {}, {"seed": MAX_SEED}),
        ("a cat --iter 50", {}, {"iterations": 50}),
        ("a cat --iterations 50", {}, {"iterations": 50}),
        ("a cat --iter 1000", {}, {"iterations": 1000}),
        ("a cat --ar 16:9", {}, {"size": (256, 144)}),
        ("a cat --ar 9:16", {}, {"size": (144, 256)}),
        ("a cat --aspect 2:1", {}, {"size": (256, 128)}),
        ("a cat --ar 3x2", {}, {"size": (256, 176)}),
        ("a cat --ar 1:1", {}, {"size": (256, 256)}),
        ("a cat --ar 4:1", {}, {"size": (256, 64)}),
        # Options instead of flags.
        ("a cat", {"seed": 3, "iterations": 20, "aspect": "3:2", "size": 128},
         {"seed": 3, "iterations": 20, "size": (128, 80)}),
        ("a cat", {"size": 512}, {"size": (512, 512)}),
        ("a cat", {"size": 100}, {"size": (96, 96)}),
        ("a cat --ar 2:3", {"size": 384}, {"size": (256, 384)}),
        # Negatives: --no, the negative option, and both together.
        ("a forest --no fog, people", {},
         {"prompts": [("a forest", 1.0), ("fog", -1.0), ("people", -1.0)]}),
        ("a forest", {"negative": "fog,  dark clouds "},
         {"prompts": [("a forest", 1.0), ("fog", -1.0), ("dark clouds", -1.0)]}),
        ("a forest --no fog", {"negative": "people"},
         {"prompts": [("a forest", 1.0), ("fog", -1.0), ("people", -1.0)]}),
        # A negative given in both places, or twice, counts once.
        ("a forest --no fog, Fog", {"negative": "fog ,people"},
         {"prompts": [("a forest", 1.0), ("fog", -1.0), ("people", -1.0)]}),
        # Repeated positive prompts stay: together they weight the text.
        ("a cat | a cat", {}, {"prompts": [("a cat", 1.0), ("a cat", 1.0)]}),
        (f"a cat --no {', '.join(f'thing {n}' for n in range(MAX_PROMPTS - 1))}", {},
         {"prompts_count": MAX_PROMPTS}),
        ("a forest --seed 5 --no fog --iter 10", {},
         {"prompts": [("a forest", 1.0), ("fog", -1.0)], "seed": 5, "iterations": 10}),
        # Weights in both notations go through to the generator's grammar.
        ("cat::2 hat::-0.5", {}, {"prompts": [("cat", 2.0), ("hat", -0.5)]}),
        ("a cat:2 | fog:-0.5", {}, {"prompts": [("a cat", 2.0), ("fog", -0.5)]}),
        ("photo: a cat", {}, {"prompts": [("photo: a cat", 1.0)]}),
        # A hyphenated word is not a flag.
        ("a well-lit room", {}, {"prompts": [("a well-lit room", 1.0)]}),
    ],
)
def test_parse_imagine_accepts(prompt, kwargs, expected):
    options = parse_imagine(prompt, LIMITS, **kwargs)

    if "prompts" in expected:
        assert texts(options) == expected["prompts"]
    if "prompts_count" in expected:
        assert len(options.prompts) == expected["prompts_count"]
    if "seed" in expected:
        assert options.seed == expected["seed"]
    if "size" in expected:
        assert (options.width, options.height) == expected["size"]
    if "iterations" in expected:
        assert options.iterations == expected["iterations"]


@pytest.mark.parametrize(
    ("prompt", "kwargs", "words"),
    [
        # Empty prompts.
        ("", {}, ["empty"]),
        ("   ", {}, ["empty"]),
        ("--seed 4", {}, ["empty"]),
        # Values given twice.
        ("a cat --seed 1 --seed 2", {}, ["seed", "2 times", "--seed 1", "--seed 2"]),
        ("a cat --seed 1", {"seed": 2}, ["seed", "2 times", "seed:2", "--seed 1"]),
        ("a cat --iter 5 --iter 6", {}, ["iterations", "2 times"]),
        ("a cat --iter 5", {"iterations": 6}, ["iterations", "2 times"]),
        ("a cat --ar 1:2", {"aspect": "2:1"}, ["aspect", "2 times"]),
        ("a cat --ar 1:2 --aspect 2:1", {}, ["aspect", "2 times"]),
        # Missing or malformed values.
        ("a cat --seed", {}, ["--seed", "needs a value"]),
        ("a cat --seed --iter 4", {}, ["--seed", "needs a value"]),
        ("a cat --seed abc", {}, ["abc", "whole number"]),
        ("a cat --seed 1.5", {}, ["1.5", "whole number"]),
        ("a cat --iter many", {}, ["many", "whole number"]),
        ("a cat --ar wide", {}, ["wide", "W:H"]),
        ("a cat --ar 16:0", {}, ["16:0", "zero"]),
        ("a cat --ar 10:1", {}, ["10:1", "1:4"]),
        # Numbers out of range.
        ("a cat --seed -1", {}, ["-1", "out of range"]),
        (f"a cat --seed {MAX_SEED + 1}", {}, [str(MAX_SEED + 1), "out of range"]),
        ("a cat --iter 0", {}, ["0 iterations", "1 to 1000"]),
        ("a cat --iter 1001", {}, ["1001", "1 to 1000"]),
        ("a cat", {"iterations": -3}, ["-3", "out of range"]),
        ("a cat", {"size": 4096}, ["4096", "16 to 512"]),
        ("a cat", {"size": 8}, ["8", "out of range"]),
        # Unknown flags and grammar errors from the generator's parser.
        ("a cat --stylize 100", {}, ["--stylize"]),
        ("a cat --v 5", {}, ["--v"]),
        ("cat:0", {}, ["0"]),
        ("a cat | | dog", {}, ["empty"]),
        ("--no fog", {}, ["only negative"]),
        ("fog::-1", {}, ["negative"]),
        ("a cat --no", {}, ["--no"]),
        # The negative option.
        ("a cat", {"negative": ""}, ["empty item"]),
        ("a cat", {"negative": "fog,,people"}, ["fog,,people", "empty item"]),
        # Too many prompts, negatives included.
        (f"a cat --no {', '.join(f'thing {n}' for n in range(MAX_PROMPTS))}", {},
         [f"{MAX_PROMPTS + 1} prompts", f"at most {MAX_PROMPTS}"]),
    ],
)
def test_parse_imagine_rejects(prompt, kwargs, words):
    with pytest.raises(OptionsError) as caught:
        parse_imagine(prompt, LIMITS, **kwargs)

    message = str(caught.value)
    for word in words:
        assert word in message
    assert "/imagine prompt:" in message


def test_errors_are_one_paragraph():
    with pytest.raises(OptionsError) as caught:
        parse_imagine("a cat --seed 1 --seed 2", LIMITS)

    assert "\n" not in str(caught.value)


def test_draft_limits_shrink_defaults():
    draft = Limits(default_size=64, max_size=128, default_iterations=50, max_iterations=100)

    options = parse_imagine("a cat --ar 2:1", draft)

    assert (options.width, options.height) == (64, 32)
    assert options.iterations == 50


def test_negatives_property():
    options = parse_imagine("a cat --no fog", LIMITS, negative="rain")

    assert options.negatives == (Prompt("fog", -1.0), Prompt("rain", -1.0))


def test_token_estimate_never_exceeds_clip():
    import random

    from bot.options import estimate_min_tokens
    from generator.prompts import count_tokens

    texts = [
        "a lighthouse at dusk", "it's a cat's hat", "x!'s", "Ã© mojibake", "a² ½ ⅷ",
        "snake_case__x", "&amp; &lt;b&gt;", "日本語のテキスト", "🐱 emoji 👨\u200d👩\u200d👧",
        "l'été à Paris", "ДОБРО пожаловать", "123456 7.5e10", "a\u0301b", "@everyone <@&123>",
        "'; DROP TABLE jobs; --", "a " * 100, "lighthouse " * 80,
    ]
    generator = random.Random(1)
    alphabet = "abcXYZ éüß日本'\"!?.,;:-_0123456789²½ \t🐱&;<>#@"
    texts += [
        "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 120)))
        for _ in range(300)
    ]

    for text in texts:
        assert estimate_min_tokens(text) <= count_tokens(text), text
    assert estimate_min_tokens("lighthouse " * 76) == count_tokens("lighthouse " * 76) == 78
