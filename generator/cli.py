"""The command line: ``python -m generator "a prompt" -o out.png`` and its ``download`` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any, NoReturn

from generator.errors import ModelError
from generator.prompts import (
    PromptError,
    check_prompt_count,
    check_prompt_length,
    merge_repeated_negatives,
    parse_prompts,
)
from generator.registry import MODELS_DIR_VARIABLE
from generator.request import MAX_SEED, GenerationRequest, RequestError, canonical_optimizer

if TYPE_CHECKING:
    from generator.generate import Progress

logger = logging.getLogger("generator.cli")

EXIT_USAGE = 2
DEFAULT_CLIP = GenerationRequest(prompts=[], seed=0).clip
DEFAULT_VQGAN = GenerationRequest(prompts=[], seed=0).vqgan
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Turn a text prompt into a picture with VQGAN+CLIP.

Prompt grammar: parts separated by '|', each 'text', 'text:weight' or
'text:weight:stop'; Midjourney's 'text::weight'; '--no a, b' for things to
avoid (quote the prompt so the shell passes it as one argument).

The first run downloads the default models (about 1.6 GB); to fetch them
ahead of time: python -m generator download [NAME ...]
"""


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a usage error in one line plus a pointer to --help.

    The exit status of a usage error stays 2, as with argparse.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``error: MESSAGE`` and a --help hint to stderr, then exit with status 2."""
        message = message.removeprefix("argument ")
        self.exit(EXIT_USAGE, f"error: {message}\nRun '{self.prog} --help' to see the options.\n")


def whole_number(example: str) -> Callable[[str], int]:
    """Return an argparse type that parses an int and names `example` when it cannot."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a whole number; use e.g. {example}"
            ) from None

    return parse


def decimal_number(example: str) -> Callable[[str], float]:
    """Return an argparse type that parses a float and names `example` when it cannot."""

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a number; use e.g. {example}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the generate command."""
    defaults = GenerationRequest(prompts=[], seed=0)
    parser = CommandParser(
        prog="python -m generator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="+", help="what to draw; several words are joined")
    _add_picture_arguments(parser.add_argument_group("picture"), defaults)
    _add_optimisation_arguments(parser.add_argument_group("optimisation"), defaults)
    _add_model_arguments(parser.add_argument_group("models and device"), defaults)
    return parser


def _add_picture_arguments(group: argparse._ArgumentGroup, defaults: GenerationRequest) -> None:
    group.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("output.png"),
        help="PNG file to write (default: %(default)s)",
    )
    group.add_argument(
        "--no",
        action="append",
        default=[],
        metavar="TEXT",
        help="things to avoid, comma-separated (repeatable)",
    )
    group.add_argument(
        "--seed",
        type=whole_number("--seed 42"),
        default=None,
        help="random seed; the same seed and settings repeat a picture (default: random)",
    )
    group.add_argument(
        "--size",
        type=whole_number(f"--size {defaults.width} {defaults.height}"),
        nargs=2,
        metavar=("WIDTH", "HEIGHT"),
        default=(defaults.width, defaults.height),
        help="image size in pixels, rounded to the model's factor "
        f"(default: {defaults.width} {defaults.height})",
    )
    group.add_argument(
        "--init-image",
        default=None,
        metavar="PATH",
        help="start from this image instead of random noise",
    )
    group.add_argument(
        "--image-prompt",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="steer toward an image as well (repeatable, weight default 1)",
    )
    group.add_argument(
        "--save-every",
        type=whole_number("--save-every 50"),
        default=0,
        metavar="N",
        help="also write OUTPUT-NNNN.png every N iterations (default: off)",
    )
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_optimisation_arguments(
    group: argparse._ArgumentGroup, defaults: GenerationRequest
) -> None:
    group.add_argument(
        "--iterations",
        type=whole_number(f"--iterations {defaults.iterations}"),
        default=defaults.iterations,
        help="optimisation steps (default: %(default)s)",
    )
    group.add_argument(
        "--cutn",
        type=whole_number(f"--cutn {defaults.cutn}"),
        default=defaults.cutn,
        help="random crops judged by CLIP per step (default: %(default)s)",
    )
    group.add_argument(
        "--cut-pow",
        type=decimal_number(f"--cut-pow {defaults.cut_pow}"),
        default=defaults.cut_pow,
        help="crop size exponent; higher favours small crops (default: %(default)s)",
    )
    group.add_argument(
        "--lr",
        type=decimal_number(f"--lr {defaults.lr}"),
        default=defaults.lr,
        help="learning rate (default: %(default)s)",
    )
    group.add_argument(
        "--optimizer",
        default=defaults.optimizer,
        help="a torch.optim class name, e.g. Adam, AdamW, SGD (default: %(default)s)",
    )


def _add_model_arguments(group: argparse._ArgumentGroup, defaults: GenerationRequest) -> None:
    group.add_argument(
        "--vqgan",
        default=defaults.vqgan,
        metavar="NAME|PATH",
        help="registered VQGAN name or .ckpt path with its .yaml beside it (default: %(default)s)",
    )
    group.add_argument(
        "--clip",
        action="append",
        default=None,
        metavar="MODEL/PRETRAINED",
        help=f"CLIP model; repeat for an ensemble (default: {defaults.clip[0]})",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="use tiny random-weight models made on the spot instead of --vqgan and --clip: "
        "the picture is noise, but it checks the install without downloading weights",
    )
    group.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    group.add_argument(
        "--threads",
        type=whole_number("--threads 2"),
        default=None,
        help="CPU threads (default: the cores this process may use)",
    )
    group.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where models are stored, as for the download command "
        f"(default: ${MODELS_DIR_VARIABLE} or ./data/models); a --vqgan PATH gets a "
        f"fast-loading copy here only when this or ${MODELS_DIR_VARIABLE} is set",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if arguments[:1] == ["download"]:
        return _download(arguments[1:])

    options = build_parser().parse_args(arguments)
    try:
        return _generate(options)
    except (PromptError, RequestError, ModelError) as error:
        return _fail(error)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def configure_logging(level: int = logging.WARNING) -> None:
    """Print log records of `level` and above to stderr as ``LEVEL: message``, once each.

    huggingface_hub attaches its own stderr handler to its logger and still
    passes records on to the root logger, so each of its warnings (download
    retries, for example) would print twice. That handler is removed here, and
    the records reach the root handler alone.
    """
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    try:
        # Importing it attaches the handler; afterwards it is never attached again.
        import huggingface_hub.utils.logging  # noqa: F401
    except ImportError:
        return
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)


def build_request(options: argparse.Namespace) -> GenerationRequest:
    """Turn parsed options into a validated GenerationRequest.

    Raises:
        PromptError: the prompt does not follow the grammar, is too long, or has more
            than 32 prompts, negatives included.
        RequestError: an option is out of range.
    """
    text = " ".join(options.prompt)
    for item in options.no:
        text += f" --no {item}"
    prompts = merge_repeated_negatives(parse_prompts(text))
    check_prompt_count(prompts)

    seed = options.seed
    if seed is None:
        seed = random.SystemRandom().randrange(MAX_SEED + 1)
    request = GenerationRequest(
        prompts=prompts,
        seed=seed,
        width=options.size[0],
        height=options.size[1],
        iterations=options.iterations,
        cutn=options.cutn,
        cut_pow=options.cut_pow,
        lr=options.lr,
        optimizer=canonical_optimizer(options.optimizer),
        vqgan=options.vqgan,
        clip=tuple(options.clip) if options.clip else DEFAULT_CLIP,
        init_image=options.init_image,
        image_prompts=[parse_image_prompt(item) for item in options.image_prompt],
        progress_every=options.save_every,
    )
    request.validate()
    # Checked last because the tokenizer imports open_clip and torch, which take seconds.
    check_prompt_length(prompts)
    return request


def parse_image_prompt(value: str) -> tuple[str, float]:
    """Split ``PATH[:WEIGHT]`` into a path and a weight (1 when missing)."""
    path, colon, weight = value.rpartition(":")
    if colon and path:
        try:
            number = float(weight)
        except ValueError:
            return value, 1.0
        if not math.isfinite(number) or number == 0:
            raise RequestError(
                f"The weight '{weight}' of image prompt '{path}' must be a finite, non-zero number."
            )
        return path, number
    return value, 1.0


def _generate(options: argparse.Namespace) -> int:
    if options.tiny and (options.clip or options.vqgan != DEFAULT_VQGAN):
        raise RequestError("--tiny replaces --vqgan and --clip: give either --tiny or those.")
    # The quick checks come first: build_request's token count imports torch.
    output: Path = options.output
    if not output.parent.is_dir():
        raise RequestError(f"The output folder '{output.parent}' does not exist: create it first.")
    if output.is_dir():
        raise RequestError(
            f"The output '{output}' is a folder: give a file name, for example "
            f"-o {output / 'picture.png'}."
        )
    if options.threads is not None and options.threads < 1:
        raise RequestError(f"--threads is {options.threads}: use 1 or more CPU threads.")
    request = build_request(options)
    _check_files_exist(request)

    # Imported here so that --help and prompt errors do not wait for torch.
    from generator.generate import generate
    from generator.models import load_models
    from generator.png import generation_metadata, save_png

    # None unless --models-dir is given: load_models then uses $IMAGINE_MODELS_DIR or
    # ./data/models for downloads, and caches no VQGAN given by path outside a chosen folder.
    with contextlib.ExitStack() as cleanup:
        models_dir = options.models_dir
        if options.tiny:
            # The tiny models and their load cache go away with the run.
            models_dir = Path(cleanup.enter_context(TemporaryDirectory()))
            request = _with_tiny_models(request, models_dir)
        models = load_models(request.vqgan, request.clip, options.device, models_dir=models_dir)
        bar = _ProgressBar(request, output, disable=options.quiet)
        try:
            image = generate(request, bar.update, models=models, threads=options.threads)
        finally:
            bar.close()

    save_png(image, output, generation_metadata(request, *image.size))
    print(f"Saved {output} ({image.width}x{image.height}, seed {request.seed}).")
    return 0


def _with_tiny_models(request: GenerationRequest, directory: Path) -> GenerationRequest:
    """Write tiny random-weight models into ``directory``; return ``request`` using them."""
    from generator.testing import build_tiny_models

    tiny = build_tiny_models(directory)
    return dataclasses.replace(request, vqgan=tiny.vqgan, clip=(tiny.clip,))


class _ProgressBar:
    """A tqdm bar fed by generate's progress callback; also writes the intermediate images."""

    def __init__(self, request: GenerationRequest, output: Path, disable: bool) -> None:
        self.request = request
        self.output = output
        self.disable = disable
        self.bar: Any = None

    def update(self, progress: Progress) -> None:
        if self.bar is None:
            # Created at the first step, so that errors before it print without a bar.
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total, unit="it", disable=self.disable, file=sys.stderr)
        self.bar.update(progress.iteration - self.bar.n)
        losses = {_short(label): f"{value:.3f}" for label, value in progress.losses.items()}
        self.bar.set_postfix(losses, refresh=False)
        if progress.image is not None and progress.iteration < progress.total:
            self._save_intermediate(progress)

    def _save_intermediate(self, progress: Progress) -> None:
        from generator.png import generation_metadata, save_png

        assert progress.image is not None
        path = self.output.with_name(f"{self.output.stem}-{progress.iteration:04d}.png")
        metadata = generation_metadata(self.request, *progress.image.size)
        save_png(progress.image, path, metadata)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_files_exist(request: GenerationRequest) -> None:
    """Reject a missing input image before the models take seconds to load."""
    files = [("init image", request.init_image)] if request.init_image else []
    files += [("image prompt", path) for path, _weight in request.image_prompts]
    for role, path in files:
        if not Path(path).is_file():
            raise RequestError(f"The {role} '{path}' was not found: check the path.")


def _download(arguments: list[str]) -> int:
    from generator.download import main_download

    return main_download(arguments)


def _fail(error: Exception) -> int:
    """Print an error to stderr as ``error: MESSAGE``, keeping the message's line breaks."""
    lines = [line.rstrip() for line in str(error).strip().splitlines()] or [type(error).__name__]
    print("error: " + "\n".join(lines), file=sys.stderr)
    return EXIT_USAGE


def _short(label: str, limit: int = 16) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"
