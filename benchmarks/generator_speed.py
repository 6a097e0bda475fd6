"""Seconds per iteration of the generator with the real architectures and random weights.

The models are CLIP ViT-B/32 (open_clip's ``ViT-B-32-quickgelu``, wrapped by
``load_clip`` as for OpenAI's weights) and the vqgan_imagenet_f16_16384
autoencoder. Both are built from their configs with random weights, so no
download is needed. The time of a step does not depend on the weight values.

For each setting (output side and cutouts) a fresh child process builds the
models and then measures:

- ``total``: the real ``generate()`` loop, timed between progress callbacks.
  The first iteration (warm-up) and the last (it also decodes the final
  image) are left out, so ``--iterations N`` runs N + 2 iterations.
- the split of one step, from a copy of the step with a timer between stages:
  decode (quantise, decode, clamp), cutouts (crops and augmentation), CLIP
  forward (embedding and losses), backward (all stages), optimiser step.
- peak resident memory of the child process, and on CUDA the peak memory
  allocated by torch.

``--reference`` adds, for each setting, a step computed the way
nerdyrodent/VQGAN-CLIP's ``generate.py`` computes it (taming's decoder, CLIP
without our faster paths, one-hot quantisation, AdamW), so that the reference
can be compared on the same machine without its code or weights. Its steps
alternate with ours in the same process, so that load from other processes
slows both alike, and the peak memory then covers both sets of models.

Run from the repository root::

    python benchmarks/generator_speed.py --iterations 3 --json speed.json

Figures are medians over the timed iterations. Other processes on the machine
slow every stage down, so the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from generator import GenerationRequest, Models, Progress, generate, parse_prompts  # noqa: E402
from generator.clip import Clip, load_clip  # noqa: E402
from generator.cutouts import MakeCutouts, normalize  # noqa: E402
from generator.losses import (  # noqa: E402
    PromptTarget,
    clamp_with_grad,
    quantize_latent,
    replace_grad,
)
from generator.models import resolve_device  # noqa: E402
from generator.vqgan import VQGAN, VQGANConfig  # noqa: E402

CLIP_SPEC = "ViT-B-32-quickgelu/random"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
STAGES = ("decode", "cutouts", "clip_forward", "backward", "optimiser")
DEFAULT_SETTINGS = "256:32,128:16"

# The ddconfig of vqgan_imagenet_f16_16384 (taming's model.yaml for that checkpoint).
F16_16384_DDCONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 256,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": (1, 1, 2, 2, 4),
    "num_res_blocks": 2,
    "attn_resolutions": (16,),
    "dropout": 0.0,
}


def build_vqgan(device: torch.device) -> VQGAN:
    """Build the vqgan_imagenet_f16_16384 architecture with random weights, frozen."""
    config = VQGANConfig(ddconfig=dict(F16_16384_DDCONFIG), n_embed=16384, embed_dim=256)
    model = VQGAN(config, name="vqgan_imagenet_f16_16384 (random weights)")
    return model.to(device).eval().requires_grad_(False)


def build_models(device: torch.device) -> Models:
    """Build the VQGAN and CLIP ViT-B/32 with random weights (seeded, so runs repeat)."""
    torch.manual_seed(0)
    return Models(vqgan=build_vqgan(device), clips=[load_clip(CLIP_SPEC, device)], device=device)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timer reads the work's true end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(
    models: Models, side: int, cutn: int, iterations: int, threads: int
) -> list[float]:
    """Run ``generate`` for iterations + 2 steps; return the seconds of the middle ones."""
    stamps: list[float] = []

    def progress(_: Progress) -> None:
        synchronize(models.device)
        stamps.append(time.perf_counter())

    request = GenerationRequest(
        prompts=parse_prompts(PROMPT),
        seed=0,
        width=side,
        height=side,
        iterations=iterations + 2,
        cutn=cutn,
    )
    generate(request, progress, models=models, threads=threads)
    # stamps[k] follows step k + 1. The first interval is step 2 (step 1 warms up),
    # and the interval of the last step, which also decodes the final image, is dropped.
    return [later - earlier for earlier, later in itertools.pairwise(stamps[:-1])]


class _Stopwatch:
    """Seconds per stage, accumulated between calls to ``lap``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.laps: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.last = time.perf_counter()

    def start(self) -> None:
        synchronize(self.device)
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.laps[stage] += now - self.last
        self.last = now


def _targets(clip: Clip) -> list[PromptTarget]:
    with torch.no_grad():
        embedding = clip.encode_text([PROMPT])[0].float()
    return [PromptTarget(PROMPT, embedding, 1.0)]


@dataclass
class StepRecipe:
    """The parts of one optimisation step, so that two implementations can be timed alike.

    ``decode`` maps a quantised latent to an image in about [-1, 1], and
    ``quantize(z, codebook)`` snaps z to the codebook with a straight-through gradient.
    """

    decode: Callable[[Tensor], Tensor]
    quantize: Callable[[Tensor, Tensor], Tensor]
    codebook: Tensor
    factor: int
    clips: list[Clip]
    optimizer: type[torch.optim.Optimizer]


def our_recipe(models: Models) -> StepRecipe:
    """Return the parts of the step ``generate`` takes (see ``generator.generate._Run._step``)."""
    return StepRecipe(
        decode=models.vqgan.decode,
        quantize=quantize_latent,
        codebook=models.vqgan.codebook.detach(),
        factor=models.vqgan.factor,
        clips=models.clips,
        optimizer=torch.optim.Adam,
    )


def _one_hot_quantize(z: Tensor, codebook: Tensor) -> Tensor:
    """Quantise z to the nearest codes through a one-hot matrix product, as the reference does."""
    x = z.movedim(1, -1)
    distances = x.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(1) - 2 * x @ codebook.T
    one_hot = F.one_hot(distances.argmin(-1), codebook.shape[0]).to(x.dtype)
    return replace_grad(one_hot @ codebook, x).movedim(-1, 1)


def reference_recipe(device: torch.device) -> StepRecipe:
    """Build a step computed as nerdyrodent/VQGAN-CLIP's generate.py computes it (random weights).

    taming-transformers' own decoder modules, CLIP without our faster attention
    and patch embedding, one-hot quantisation and AdamW. The cutouts and
    losses are ours, which cost the same as the reference's.
    """
    try:
        from taming.modules.diffusionmodules.model import Decoder
    except ImportError as error:
        raise SystemExit(
            f"--reference needs taming-transformers' modules ({error}): run "
            "'pip install --no-deps taming-transformers-rom1504==0.0.6 einops'."
        ) from error

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # taming prints the layer shapes.
        decoder = Decoder(**F16_16384_DDCONFIG)
    post_quant_conv = nn.Conv2d(256, 256, 1)
    for module in (decoder, post_quant_conv):
        module.to(device).eval().requires_grad_(False)
    codebook = torch.empty(16384, 256, device=device).uniform_(-1 / 16384, 1 / 16384)
    clip = load_clip(CLIP_SPEC, device, sdpa_attention=False, matmul_patch_embedding=False)
    return StepRecipe(
        decode=lambda quantized: decoder(post_quant_conv(quantized)),
        quantize=_one_hot_quantize,
        codebook=codebook,
        factor=16,
        clips=[clip],
        optimizer=torch.optim.AdamW,
    )


class SplitStep:
    """One optimisation step of a recipe, run with a synchronising timer between stages.

    The step follows ``generate``'s sequence of public building blocks. Each
    call of ``run`` takes one step and returns the seconds of each stage.
    """

    def __init__(self, recipe: StepRecipe, device: torch.device, side: int, cutn: int) -> None:
        self.recipe = recipe
        self.device = device
        codebook = recipe.codebook
        self.z_min = codebook.min(dim=0).values.view(1, -1, 1, 1)
        self.z_max = codebook.max(dim=0).values.view(1, -1, 1, 1)
        cells = side // recipe.factor
        indices = torch.randint(codebook.shape[0], (cells * cells,)).to(device)
        z = codebook.index_select(0, indices).view(1, cells, cells, -1).permute(0, 3, 1, 2)
        self.z = z.contiguous().requires_grad_(True)
        self.optimizer = recipe.optimizer([self.z], lr=0.1)
        self.guides = [
            (clip, MakeCutouts(clip.input_size, cutn), _targets(clip)) for clip in recipe.clips
        ]

    def run(self) -> dict[str, float]:
        watch = _Stopwatch(self.device)
        watch.start()
        self.optimizer.zero_grad(set_to_none=True)
        decoded = self.recipe.decode(self.recipe.quantize(self.z, self.recipe.codebook))
        image = clamp_with_grad(decoded.add(1).div(2), 0.0, 1.0)
        watch.lap("decode")

        losses = []
        for clip, cutouts, targets in self.guides:
            batch = normalize(cutouts(image), clip.mean, clip.std)
            watch.lap("cutouts")
            embeddings = clip.encode_image(batch)
            losses += [target.loss(embeddings) for target in targets]
            watch.lap("clip_forward")

        torch.stack(losses).sum().backward()
        watch.lap("backward")
        self.optimizer.step()
        with torch.no_grad():
            self.z.copy_(torch.maximum(torch.minimum(self.z, self.z_max), self.z_min))
        watch.lap("optimiser")
        return watch.laps


def time_split(
    recipes: list[StepRecipe], device: torch.device, side: int, cutn: int, iterations: int
) -> list[list[dict[str, float]]]:
    """Time the stages of each recipe's step; return, per recipe, one dict per timed iteration.

    With several recipes their steps alternate, so that load from other
    processes falls on all of them alike. The first step of each is a warm-up
    and is not returned.
    """
    steps = [SplitStep(recipe, device, side, cutn) for recipe in recipes]
    results: list[list[dict[str, float]]] = [[] for _ in recipes]
    for _ in range(iterations + 1):
        for step, times in zip(steps, results, strict=True):
            times.append(step.run())
    return [times[1:] for times in results]


def _summary(splits: list[dict[str, float]]) -> dict[str, Any]:
    sums = [sum(split.values()) for split in splits]
    return {
        "split_s": {stage: statistics.median(s[stage] for s in splits) for stage in STAGES},
        "split_sum_s": statistics.median(sums),
        "split_sum_min_s": min(sums),
        "split_sum_all_s": sums,
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_setting(
    device: torch.device, side: int, cutn: int, iterations: int, threads: int, reference: bool
) -> list[dict[str, Any]]:
    """Build the models and measure one setting in this process; return JSON-safe rows.

    The first row is ``generate()`` with our step's split. With ``reference``
    a second row times the reference-equivalent step, alternating with ours
    (whose split then comes from the alternated run). The reference's total is
    the sum of its stages, because it cannot run inside ``generate``. Peak
    memory is then the process's, both models included.
    """
    torch.set_num_threads(threads)
    started = time.perf_counter()
    models = build_models(device)
    recipes = [our_recipe(models)]
    if reference:
        recipes.append(reference_recipe(device))
    build_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    load_before = os.getloadavg()[0]
    totals = time_generate(models, side, cutn, iterations, threads)
    torch.set_num_threads(threads)
    splits = time_split(recipes, device, side, cutn, iterations)
    load_after = os.getloadavg()[0]

    common = {
        "side": side,
        "cutn": cutn,
        "device": str(device),
        "threads": threads,
        "iterations": iterations,
        "build_s": build_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": (
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        "load_average": [load_before, load_after],
    }
    rows = [
        {
            **common,
            "step": "imagine",
            "total_s": statistics.median(totals),
            "total_min_s": min(totals),
            "total_all_s": totals,
            **_summary(splits[0]),
        }
    ]
    if reference:
        summary = _summary(splits[1])
        rows.append(
            {
                **common,
                "step": "reference",
                "total_s": summary["split_sum_s"],
                "total_min_s": summary["split_sum_min_s"],
                "total_all_s": summary["split_sum_all_s"],
                **summary,
            }
        )
    return rows


def parse_settings(text: str) -> list[tuple[int, int]]:
    """Parse ``SIDE:CUTN,SIDE:CUTN`` (for example ``256:32,128:16``) into pairs."""
    settings = []
    for part in text.split(","):
        side, _, cutn = part.strip().partition(":")
        if not (side.isdigit() and cutn.isdigit() and int(side) > 0 and int(cutn) > 0):
            raise argparse.ArgumentTypeError(
                f"Invalid setting {part!r}: write SIDE:CUTN, for example 256:32 (pixels, cutouts)."
            )
        settings.append((int(side), int(cutn)))
    return settings


def machine_info(threads: int, device: torch.device) -> dict[str, Any]:
    """Describe the CPU (and GPU), torch and the thread count for the results."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_child(
    args: argparse.Namespace, side: int, cutn: int, reference: bool
) -> list[dict[str, Any]]:
    """Measure one setting in a fresh process, so that its peak memory is its own."""
    command = [
        sys.executable,
        __file__,
        "--device", args.device,
        "--iterations", str(args.iterations),
        "--threads", str(args.threads),
        "--child", f"{side}:{cutn}",
    ]
    if reference:
        command.append("--reference")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"Measuring {side}x{side} with {cutn} cutouts failed (see above).")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(results: list[dict[str, Any]]) -> str:
    """Format results as a markdown table (seconds per iteration, GiB)."""
    lines = [
        "| step | output, cutouts | s/iteration (best) | decode | cutouts | CLIP fwd | backward "
        "| optimiser | peak RSS | peak CUDA | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        split = r["split_s"]
        cuda = f"{r['peak_cuda_bytes'] / 2**30:.2f} GiB" if r["peak_cuda_bytes"] else "-"
        load = "–".join(f"{value:.1f}" for value in r["load_average"])
        rss = r["peak_rss_bytes"] / 2**30
        lines.append(
            f"| {r['step']} | {r['side']}², {r['cutn']} | {r['total_s']:.2f} "
            f"({r['total_min_s']:.2f}) | {split['decode']:.2f} "
            f"| {split['cutouts']:.2f} | {split['clip_forward']:.2f} | {split['backward']:.2f} "
            f"| {split['optimiser']:.3f} | {rss:.2f} GiB | {cuda} | {load} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument(
        "--iterations", type=int, default=3, help="timed iterations per setting (default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: usable cores)"
    )
    parser.add_argument(
        "--sizes",
        type=parse_settings,
        default=parse_settings(DEFAULT_SETTINGS),
        help=f"SIDE:CUTN pairs, comma-separated (default {DEFAULT_SETTINGS})",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time a reference-equivalent step (needs taming-transformers-rom1504)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", type=parse_settings, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error(f"--iterations is {args.iterations}: use 1 or more.")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1
        )
    if args.threads < 1:
        parser.error(f"--threads is {args.threads}: use 1 or more.")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure each setting in a child process and print a markdown table."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.child:
        (side, cutn), = args.child
        result = measure_setting(
            device, side, cutn, args.iterations, args.threads, args.reference
        )
        print(json.dumps(result))
        return 0

    results = []
    for side, cutn in args.sizes:
        print(f"Measuring {side}x{side} with {cutn} cutouts on {device}...", file=sys.stderr)
        results += run_child(args, side, cutn, args.reference)
    info = machine_info(args.threads, device)
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
