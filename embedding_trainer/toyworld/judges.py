"""Small CNN judges: what shape, colour, background, texture and size does a toy-world image show?

One network with a shared trunk and one head per attribute (about 0.2M parameters, stored in fp16 as safetensors,
well under 1 MB). It trains on clean generator images with mild degradations (blur, down-up sampling, noise, colour
jitter within the class) so it also judges the blurrier samples of a small text-to-image model; its accuracy is
measured on clean images.

    python -m embedding_trainer.toyworld.judges train --out embedding_trainer/toyworld/weights/judges.safetensors
    python -m embedding_trainer.toyworld.judges evaluate --count 2000
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from . import world

WEIGHTS = Path(__file__).with_name("weights") / "judges.safetensors"
FORMAT_VERSION = "1"
#: A 5x5 stride-2 stem, then 3x3 blocks at 32, 16, 8 and 4 px.
WIDTHS = (24, 32, 64, 96, 128)

ImagesLike = Sequence[Image.Image] | np.ndarray | torch.Tensor


class JudgeNet(nn.Module):
    """A 5x5 stride-2 stem (wide enough to see a 4 px dot, and 4x cheaper than full-resolution convs on a CPU),
    four 3x3 conv blocks, then average and max pooling (a background is a mean, texture and corners are local
    peaks) into one linear head per attribute."""

    def __init__(self, classes: dict[str, Sequence[str]], widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        stem, *blocks = widths
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(stem)]
        layers.append(nn.ReLU())
        channels = stem
        for i, width in enumerate(blocks):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(blocks) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.attributes = list(classes)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, len(names)) for name, names in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Centre the input: the net sees [0, 1] images as [-1, 1].
        features = self.trunk(x * 2.0 - 1.0)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Verdict:
    """One attribute's judgement of a batch: class names, probabilities ``[N, C]`` and the class list."""

    labels: list[str]
    probs: np.ndarray
    classes: tuple[str, ...]

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)


class Judges:
    """The trained judges; call with images to get ``{attribute: Verdict}``."""

    def __init__(self, net: JudgeNet, classes: dict[str, tuple[str, ...]], metadata: dict[str, str]) -> None:
        self.net = net.eval()
        self.classes = classes
        self.metadata = metadata

    @torch.no_grad()
    def __call__(self, images: ImagesLike, batch_size: int = 256) -> dict[str, Verdict]:
        x = to_tensor(images)
        probs: dict[str, list[np.ndarray]] = {name: [] for name in self.classes}
        for start in range(0, len(x), batch_size):
            logits = self.net(x[start : start + batch_size])
            for name in self.classes:
                probs[name].append(torch.softmax(logits[name].float(), dim=1).numpy())
        out = {}
        for name, names in self.classes.items():
            p = np.concatenate(probs[name]) if probs[name] else np.zeros((0, len(names)), dtype=np.float32)
            out[name] = Verdict([names[i] for i in p.argmax(axis=1)], p, names)
        return out

    def shows(self, images: ImagesLike, expected: dict[str, str]) -> np.ndarray:
        """Per image: do the judges see every attribute in ``expected`` (``{"shape": "heart", ...}``)?"""
        verdicts = self(images)
        ok = np.ones(len(next(iter(verdicts.values())).labels), dtype=bool)
        for attribute, value in expected.items():
            ok &= np.array([label == value for label in verdicts[attribute].labels], dtype=bool)
        return ok


def to_tensor(images: ImagesLike) -> torch.Tensor:
    """Images -> float ``[N, 3, 64, 64]`` in [0, 1]. Accepts PIL images (any size: resized with a box filter),
    a uint8 ``[N, H, W, 3]`` array, or a float tensor ``[N, 3, H, W]`` in [0, 1]."""
    size = world.IMAGE_SIZE
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        return x.clamp(0, 1)
    if isinstance(images, np.ndarray):
        array = images
    elif len(images) == 0:
        array = np.zeros((0, size, size, 3), dtype=np.uint8)
    else:
        rgb = [im.convert("RGB") for im in images]
        array = np.stack(
            [np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BOX)) for im in rgb]
        )
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def load_judges(path: str | Path | None = None) -> Judges:
    """The judges from ``path`` (default: the weights shipped in the package). Reads one local file, nothing else."""
    return _load(str(Path(path) if path is not None else WEIGHTS))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Judges:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != "toyworld-judges" or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a toy-world judges file of version {FORMAT_VERSION} (metadata {metadata})")
    classes = {name: tuple(names) for name, names in json.loads(metadata["classes"]).items()}
    widths = tuple(json.loads(metadata["widths"]))
    net = JudgeNet(classes, widths)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    net.load_state_dict(state)
    return Judges(net, classes, metadata)


def judge(images: ImagesLike, judges: Judges | None = None) -> dict[str, Verdict]:
    """``{attribute: Verdict}`` for ``images`` by ``judges`` (default: the shipped judges)."""
    return (judges or load_judges())(images)


# ---------------------------------------------------------------------------------------------------------------
# Data and augmentation


def render_batch(scenes: Sequence[world.Scene]) -> np.ndarray:
    return np.stack([np.asarray(world.render(scene)) for scene in scenes])


def labelled_sample(count: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``count`` clean images with every class equally likely (held-out ones included), and their labels."""
    rng = np.random.default_rng([seed, 31337])
    scenes = [world.sample_scene(rng, uniform=True) for _ in range(count)]
    labels = {
        name: np.array([names.index(getattr(s, name)) for s in scenes], dtype=np.int64)
        for name, names in world.CLASSES.items()
    }
    return render_batch(scenes), labels


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x [N, C, H, W]`` with its own ``sigma [N]`` (separable, reflect padding)."""
    n, c, h, w = x.shape
    radius = 4
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)[:, None, :]  # [N*C, 1, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, :, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, :, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild, class-preserving degradations like a small generative model's: blur, down-up sampling, colour and
    brightness jitter within the class, a little desaturation, noise. About a quarter of images stay clean."""
    n = x.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    clean = draw(n) < 0.25
    sigma = torch.where(draw(n) < 0.6, 0.3 + 1.2 * draw(n), torch.zeros(n))
    y = torch.where((sigma > 0)[:, None, None, None], gaussian_blur(x, sigma.clamp_min(0.3)), x)
    down = draw(n) < 0.3
    if down.any():
        small = F.interpolate(y[down], scale_factor=0.5, mode="area")
        y[down] = F.interpolate(small, scale_factor=2.0, mode="bilinear", align_corners=False)
    gains = 1.0 + (draw(n, 3) - 0.5) * 0.12
    offset = (draw(n, 1) - 0.5) * 0.08
    y = y * gains[:, :, None, None] + offset[:, :, None, None]
    grey = y.mean(dim=1, keepdim=True)
    saturation = 1.0 - 0.15 * draw(n)
    y = grey + (y - grey) * saturation[:, None, None, None]
    noise = 0.05 * draw(n)
    y = y + torch.randn(y.shape, generator=generator) * noise[:, None, None, None]
    return torch.where(clean[:, None, None, None], x, y.clamp(0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def train(
    out: str | Path,
    seed: int = 0,
    pool: int = 40000,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    log: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Train the judges from ``seed`` and save them to ``out``; returns the file's metadata.

    Deterministic on one CPU thread: a fixed pool of rendered images, a seeded order and seeded augmentation.
    """
    log = log or (lambda _message: None)
    torch.manual_seed(seed)
    started = time.perf_counter()
    images, labels = labelled_sample(pool, seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 keeps the pool at 12 KB per image
    y_all = {name: torch.from_numpy(v) for name, v in labels.items()}
    log(f"rendered {pool} images in {time.perf_counter() - started:.0f} s")

    classes = {name: tuple(names) for name, names in world.CLASSES.items()}
    net = JudgeNet(classes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(steps // 20, 1)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(pool, generator=generator)
    cursor = 0
    net.train()
    for step in range(steps):
        if cursor + batch_size > pool:
            order, cursor = torch.randperm(pool, generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        x = degrade(x_all[index].float() / 255.0, generator)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[name], y_all[name][index]) for name in classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")

    net.eval()
    seconds = time.perf_counter() - started
    metadata = {
        "format": "toyworld-judges",
        "version": FORMAT_VERSION,
        "classes": json.dumps(classes),
        "widths": json.dumps(list(WIDTHS)),
        "seed": str(seed),
        "pool": str(pool),
        "steps": str(steps),
        "batch_size": str(batch_size),
        "lr": str(lr),
        "train_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out), metadata=metadata)
    _load.cache_clear()
    return metadata


def accuracy(judges: Judges, images: np.ndarray | torch.Tensor, labels: dict[str, np.ndarray]) -> dict[str, float]:
    verdicts = judges(images)
    return {name: float(np.mean(v.probs.argmax(axis=1) == labels[name])) for name, v in verdicts.items()}


def blurred(images: np.ndarray, sigma: float) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return gaussian_blur(x, torch.full((x.shape[0],), sigma))


def soft(images: np.ndarray) -> torch.Tensor:
    """A small-VAE-like softening: half resolution and back, then a slight blur."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="area"), scale_factor=2.0, mode="bilinear")
    return gaussian_blur(x, torch.full((x.shape[0],), 0.5))


def evaluate(judges: Judges, count: int = 2000, seed: int = 12345) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy on ``count`` fresh images: clean, blurred (sigma 1 and 1.5 px) and softened."""
    images, labels = labelled_sample(count, seed)
    return {
        "clean": accuracy(judges, images, labels),
        "blur1.0": accuracy(judges, blurred(images, 1.0), labels),
        "blur1.5": accuracy(judges, blurred(images, 1.5), labels),
        "soft": accuracy(judges, soft(images), labels),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedding_trainer.toyworld.judges", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the judges from a seed and save them")
    p_train.add_argument("--out", type=Path, default=WEIGHTS)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--pool", type=int, default=40000)
    p_train.add_argument("--steps", type=int, default=3000)
    p_train.add_argument("--batch-size", type=int, default=128)
    p_train.add_argument("--lr", type=float, default=3e-3)
    p_train.add_argument("--threads", type=int, default=1)
    p_eval = sub.add_parser("evaluate", help="accuracy on fresh clean and degraded images")
    p_eval.add_argument("--weights", type=Path, default=WEIGHTS)
    p_eval.add_argument("--count", type=int, default=2000)
    p_eval.add_argument("--seed", type=int, default=12345)
    p_eval.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        torch.use_deterministic_algorithms(True)
        meta = train(args.out, args.seed, args.pool, args.steps, args.batch_size, args.lr, log=print)
        print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) after {meta['train_seconds']} s")
        weights = args.out
    else:
        weights = args.weights
    results = evaluate(load_judges(weights), count=args.count if args.command == "evaluate" else 2000)
    for condition, scores in results.items():
        print(f"{condition:8s} " + "  ".join(f"{name} {100 * acc:.2f}%" for name, acc in scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
