"""
Train a torchvision detector on driving scenes generated on the fly; CPU friendly.

Training image ``k`` is ``generate_scene(data_seed * TRAIN_SEED_STRIDE + k)``; held-out scenes
use seeds from ``HELDOUT_SEED_BASE`` on, a range no training run reaches. The checkpoint records
the command, seeds, time, images seen and the held-out COCO metrics, e.g. (ssdlite320 is the
default model)::

    python -m speculative_av.tools.train --out models/local_ssdlite320.pt --minutes 8
"""
from __future__ import annotations

import argparse
import ast
import math
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import build_model, save_checkpoint
from speculative_av.scenes.generator import CATEGORIES, generate_scene, Scene
from speculative_av.tools.coco_metrics import coco_map
import torch
from tqdm import tqdm

TRAIN_SEED_STRIDE = 10_000_000  # images one data seed can train on before reaching the next
HELDOUT_SEED_BASE = 1_000_000_000
WARMUP_ITERATIONS = 50
MIN_LR_FACTOR = 0.05  # the cosine schedule ends at this fraction of --lr
MAX_GRAD_NORM = 10.0

Detect = Callable[[npt.NDArray[np.uint8]], Detections]


def heldout_seeds(count: int) -> range:
    """Return the seeds of the first ``count`` held-out scenes."""
    return range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + count)


def evaluate(detect: Detect, seeds: Sequence[int], width: int, height: int) -> dict[str, float]:
    """Return :func:`coco_map` of ``detect`` on the scenes of ``seeds``."""
    predictions, truth = [], []
    for seed in tqdm(seeds, desc='held-out', unit='img', mininterval=5.0):
        scene = generate_scene(seed, width, height)
        predictions.append(detect(scene.image))
        truth.append(scene.ground_truth())
    return coco_map(predictions, truth, CATEGORIES, (width, height))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; at least one of --minutes and --iterations is required."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--model', default='ssdlite320_mobilenet_v3_large',
                        help='torchvision detection builder name')
    parser.add_argument('--out', required=True, help='checkpoint path to write')
    parser.add_argument('--minutes', type=float, help='training time budget')
    parser.add_argument('--iterations', type=int, help='training iterations (batches)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--lr', type=float, default=1e-3, help='peak AdamW learning rate')
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--seed', type=int, default=0,
                        help='data seed (selects the training scenes) and torch seed')
    parser.add_argument('--image-width', type=int, default=640)
    parser.add_argument('--image-height', type=int, default=480)
    parser.add_argument('--eval-scenes', type=int, default=100,
                        help='held-out scenes to evaluate on after training')
    parser.add_argument('--threads', type=int, default=0, help='torch threads; 0 = default')
    parser.add_argument('--model-kwarg', action='append', default=[], metavar='KEY=VALUE',
                        help='model builder keyword (Python literal value), e.g. min_size=480; '
                             'repeatable; stored in the checkpoint and used again on load')
    parser.add_argument('--int8', action='store_true',
                        help='store large weight tensors as int8 (a quarter of the file size)')
    args = parser.parse_args(argv)
    if args.minutes is None and args.iterations is None:
        parser.error('give --minutes and/or --iterations')
    try:
        args.model_kwargs = dict(_keyword(text) for text in args.model_kwarg)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on held-out scenes and save the checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = build_model(args.model, len(CATEGORIES), **args.model_kwargs)
    seconds, iterations = _train(net, args)
    images = iterations * args.batch_size
    net.eval()
    seeds = heldout_seeds(args.eval_scenes)
    metrics = evaluate(lambda rgb: _detect(net, rgb), seeds, args.image_width, args.image_height)
    first_seed = args.seed * TRAIN_SEED_STRIDE
    save_checkpoint(
        net, args.out, num_classes=len(CATEGORIES), categories=list(CATEGORIES), int8=args.int8,
        architecture=args.model, model_kwargs=args.model_kwargs,
        training_command=shlex.join(['python', '-m', 'speculative_av.tools.train', *argv]),
        data_seed=args.seed, train_seeds=[first_seed, first_seed + images],
        heldout_seeds=[seeds.start, seeds.stop], image_size=[args.image_width, args.image_height],
        train_seconds=round(seconds, 1), iterations=iterations, images_seen=images,
        heldout_metrics=metrics, torch_version=str(torch.__version__))
    print(f'{args.out}: {images} images in {seconds:.0f} s; held-out ({len(seeds)} scenes) '
          + ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()))
    return 0


def _train(net: torch.nn.Module, args: argparse.Namespace) -> tuple[float, int]:
    """Run the training loop; return the seconds spent and iterations done."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    budget = args.minutes * 60.0 if args.minutes is not None else math.inf
    limit = args.iterations if args.iterations is not None else math.inf
    net.train()
    start = time.monotonic()
    iteration, done = 0, 0.0
    with tqdm(total=100, unit='%', mininterval=5.0, desc='training') as bar:
        while done < 1.0:
            for group in optimizer.param_groups:
                group['lr'] = args.lr * _lr_factor(iteration, done)
            first = args.seed * TRAIN_SEED_STRIDE + iteration * args.batch_size
            scenes = [generate_scene(seed, args.image_width, args.image_height)
                      for seed in range(first, first + args.batch_size)]
            losses = net([_tensor(s.image) for s in scenes], [_target(s) for s in scenes])
            loss = torch.stack(list(losses.values())).sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            iteration += 1
            elapsed = time.monotonic() - start
            done = max(iteration / limit, elapsed / budget)
            bar.update(min(100, int(done * 100)) - bar.n)
            bar.set_postfix(loss=f'{loss.item():.3f}',
                            img_s=f'{iteration * args.batch_size / elapsed:.1f}', refresh=False)
    return time.monotonic() - start, iteration


def _lr_factor(iteration: int, done: float) -> float:
    """Linear warm-up over the first iterations, then cosine decay over the budget."""
    warmup = min(1.0, (iteration + 1) / WARMUP_ITERATIONS)
    cosine = MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * done))
    return warmup * cosine


def _tensor(rgb: npt.NDArray[np.uint8]) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def _target(scene: Scene) -> dict[str, torch.Tensor]:
    return {'boxes': torch.from_numpy(scene.boxes), 'labels': torch.from_numpy(scene.labels)}


def _detect(net: torch.nn.Module, rgb: npt.NDArray[np.uint8]) -> Detections:
    """Run the eval-mode ``net`` on one image, keeping every detection it returns."""
    with torch.inference_mode():
        output = net([_tensor(rgb)])[0]
    return Detections(output['boxes'].numpy(), output['scores'].numpy(),
                      output['labels'].numpy())


def _keyword(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` with VALUE a Python literal (a bare word stays a string)."""
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise ValueError(f'--model-kwarg expects KEY=VALUE, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


if __name__ == '__main__':
    sys.exit(main())
