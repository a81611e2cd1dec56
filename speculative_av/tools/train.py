r"""
Train a torchvision detector on driving scenes generated on the fly; CPU friendly.

Training image ``k`` is ``generate_scene(data_seed * TRAIN_SEED_STRIDE + k)``; held-out scenes
use seeds from ``HELDOUT_SEED_BASE`` on, a range no training run reaches. The checkpoint records
the command, seeds, time, images seen and the held-out COCO metrics, e.g. (ssdlite320 is the
default model)::

    python -m speculative_av.tools.train --out models/local_ssdlite320.pt --minutes 8

Fine-tuning (the data engine's retraining step) starts from a checkpoint (``--init``: its
architecture, model_kwargs, categories and weights) and trains on a curated set of mined
frames with the cloud's detections as labels (``--dataset``, :mod:`speculative_av.tools.dataset`),
mixing generated scenes with exact ground truth into every batch (``--mix-generated``) so the
mined data adds to what the model learnt instead of replacing it::

    python -m speculative_av.tools.train --init models/local_ssdlite320.pt \
        --dataset out/curated --mix-generated 0.5 --out out/candidate.pt --minutes 5 --lr 2e-4
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import math
from pathlib import Path
import pickle
import shlex
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import (build_model, save_checkpoint,
                                                           TorchvisionDetector)
from speculative_av.scenes.generator import CATEGORIES, generate_scene
from speculative_av.tools.coco_metrics import coco_map
from speculative_av.tools.dataset import Dataset, load_dataset
import torch
from tqdm import tqdm

TRAIN_SEED_STRIDE = 10_000_000  # images one data seed can train on before reaching the next
HELDOUT_SEED_BASE = 1_000_000_000
WARMUP_ITERATIONS = 50
MIN_LR_FACTOR = 0.05  # the cosine schedule ends at this fraction of --lr
MAX_GRAD_NORM = 10.0
DEFAULT_MODEL = 'ssdlite320_mobilenet_v3_large'
DEFAULT_MIX = 0.5  # share of each batch from generated scenes when training on a --dataset

Detect = Callable[[npt.NDArray[np.uint8]], Detections]


def heldout_seeds(count: int) -> range:
    """Return the seeds of the first ``count`` held-out scenes."""
    return range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + count)


def evaluate(detect: Detect, seeds: Sequence[int], width: int, height: int) -> dict[str, float]:
    """Return :func:`coco_map` of ``detect`` on the scenes of ``seeds`` (none: no metrics)."""
    if not seeds:
        return {}
    predictions, truth = [], []
    for seed in tqdm(seeds, desc='held-out', unit='img', mininterval=5.0):
        scene = generate_scene(seed, width, height)
        predictions.append(detect(scene.image))
        truth.append(scene.ground_truth())
    return coco_map(predictions, truth, CATEGORIES, (width, height))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; at least one of --minutes and --iterations is required."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--model', help='torchvision detection builder name (default '
                        f"{DEFAULT_MODEL}, or the --init checkpoint's architecture)")
    parser.add_argument('--init', type=Path, metavar='CHECKPOINT',
                        help='fine-tune from this checkpoint: its architecture, model_kwargs, '
                             'categories and weights')
    parser.add_argument('--dataset', type=Path, metavar='DIR',
                        help='a curated training set (speculative_av.tools.dataset) to train on')
    parser.add_argument('--mix-generated', type=float, metavar='FRACTION',
                        help='with --dataset: share of each batch taken from generated scenes '
                             f'with exact ground truth (default {DEFAULT_MIX}; 0 = the set only)')
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
                        help='held-out scenes to evaluate on after training (0 = none)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads; 0 = default')
    parser.add_argument('--model-kwarg', action='append', default=[], metavar='KEY=VALUE',
                        help='model builder keyword (Python literal value), e.g. min_size=480; '
                             'repeatable; stored in the checkpoint and used again on load')
    parser.add_argument('--int8', action='store_true',
                        help='store large weight tensors as int8 (a quarter of the file size)')
    args = parser.parse_args(argv)
    if args.minutes is None and args.iterations is None:
        parser.error('give --minutes and/or --iterations')
    if args.batch_size < 1 or args.eval_scenes < 0:
        parser.error('--batch-size must be positive and --eval-scenes not negative')
    if args.init is not None and args.model_kwarg:
        parser.error('--init takes model_kwargs from the checkpoint; drop --model-kwarg')
    if args.mix_generated is not None and args.dataset is None:
        parser.error('--mix-generated needs --dataset (without one every image is generated)')
    args.mix_generated = DEFAULT_MIX if args.mix_generated is None else args.mix_generated
    if not 0.0 <= args.mix_generated <= 1.0:
        parser.error(f'--mix-generated must be in [0, 1], got {args.mix_generated}')
    try:
        args.model_kwargs = dict(_keyword(text) for text in args.model_kwarg)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate on held-out scenes and save the checkpoint."""
    metadata = run(list(sys.argv[1:] if argv is None else argv))
    print(f'{metadata["out"]}: {metadata["images_seen"]} images ({metadata["dataset_images_seen"]}'
          f' from the data set) in {metadata["train_seconds"]:.0f} s; held-out '
          f'({metadata["heldout_seeds"][1] - metadata["heldout_seeds"][0]} scenes) '
          + ', '.join(f'{k} {v:.3f}' for k, v in metadata['heldout_metrics'].items()))
    return 0


def run(argv: Sequence[str]) -> dict[str, Any]:
    """
    Train as the command line ``argv`` says; return the metadata stored in the checkpoint.

    Raises ValueError when the --init checkpoint or the --dataset cannot be used (and
    SystemExit for a malformed command line, as argparse does).
    """
    argv = list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net, architecture, model_kwargs, categories, init = _initial_model(args)
    dataset = _dataset(args.dataset, categories) if args.dataset is not None else None
    batches = _Batches(args, dataset)
    seconds, iterations = _train(net, args, batches)
    net.eval()
    seeds = heldout_seeds(args.eval_scenes)
    metrics = evaluate(lambda rgb: _detect(net, rgb), seeds, args.image_width, args.image_height)
    first_seed = args.seed * TRAIN_SEED_STRIDE
    metadata: dict[str, Any] = {
        'architecture': architecture, 'model_kwargs': model_kwargs,
        'training_command': shlex.join(['python', '-m', 'speculative_av.tools.train', *argv]),
        'data_seed': args.seed, 'train_seeds': [first_seed, first_seed + batches.generated],
        'heldout_seeds': [seeds.start, seeds.stop],
        'image_size': [args.image_width, args.image_height],
        'train_seconds': round(seconds, 1), 'iterations': iterations,
        'images_seen': iterations * args.batch_size,
        'dataset_images_seen': iterations * args.batch_size - batches.generated,
        'heldout_metrics': metrics, 'torch_version': str(torch.__version__)}
    if init is not None:
        metadata['init'] = init
    if dataset is not None:
        metadata['dataset'] = _dataset_provenance(dataset)
        metadata['mix_generated'] = args.mix_generated
    save_checkpoint(net, args.out, num_classes=len(categories), categories=categories,
                    int8=args.int8, **metadata)
    return {'out': str(args.out), **metadata}


def _initial_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, dict[str, Any],
                                                      list[str], dict[str, Any] | None]:
    """Return the network to train, its architecture, kwargs, categories and --init record."""
    if args.init is None:
        architecture = args.model or DEFAULT_MODEL
        return (build_model(architecture, len(CATEGORIES), **args.model_kwargs), architecture,
                args.model_kwargs, list(CATEGORIES), None)
    try:
        stored = torch.load(args.init, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f'--init {args.init}: cannot load: {exc}') from None
    if not isinstance(stored, dict) or not isinstance(stored.get('architecture'), str):
        raise ValueError(f'--init {args.init}: not a checkpoint of this tool (no architecture)')
    architecture = stored['architecture']
    if args.model is not None and args.model != architecture:
        raise ValueError(f'--model {args.model} but --init {args.init} is a {architecture}')
    parent = TorchvisionDetector(architecture, str(args.init))
    record = {'path': str(args.init),
              'sha256': hashlib.sha256(args.init.read_bytes()).hexdigest(),
              'training_command': str(stored.get('training_command', '')),
              'heldout_metrics': stored.get('heldout_metrics', {})}
    return (parent.module, architecture, dict(stored.get('model_kwargs', {})),
            parent.categories, record)


def _dataset(directory: Path, categories: list[str]) -> Dataset:
    """Load the curated set; its label map must be the model's."""
    dataset = load_dataset(directory)
    if list(dataset.categories) != categories:
        raise ValueError(f'--dataset {directory} has categories {list(dataset.categories)}, the '
                         f'model {categories}')
    if not len(dataset):
        raise ValueError(f'--dataset {directory} holds no images')
    return dataset


def _dataset_provenance(dataset: Dataset) -> dict[str, Any]:
    """Return what identifies the set a checkpoint was trained on."""
    labels = (dataset.directory / 'labels.json').read_bytes()
    return {'path': str(dataset.directory), 'labels_sha256': hashlib.sha256(labels).hexdigest(),
            'images': len(dataset), 'boxes': dataset.boxes, 'provenance': dict(dataset.provenance)}


class _Batches:
    """
    Batches of (image tensor, target): generated scenes, curated images, or both mixed.

    Each batch holds ``round(mix * batch_size)`` generated scenes (the next training seeds)
    and the rest from the data set, visited in a seeded random order, reshuffled each pass.
    """

    def __init__(self, args: argparse.Namespace, dataset: Dataset | None) -> None:
        self._args = args
        self._dataset = dataset
        mix = 1.0 if dataset is None else args.mix_generated
        self._per_batch = round(mix * args.batch_size)
        self.generated = 0
        self._order = self._shuffled(np.random.default_rng(args.seed))

    def take(self) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Return the next batch's images and targets."""
        args = self._args
        first = args.seed * TRAIN_SEED_STRIDE + self.generated
        images, targets = [], []
        for seed in range(first, first + self._per_batch):
            scene = generate_scene(seed, args.image_width, args.image_height)
            images.append(_tensor(scene.image))
            targets.append(_target(scene.boxes, scene.labels))
        self.generated += self._per_batch
        for _ in range(args.batch_size - self._per_batch):
            entry = next(self._order)
            images.append(_tensor(entry.image()))
            targets.append(_target(entry.boxes, entry.labels))
        return images, targets

    def _shuffled(self, rng: np.random.Generator) -> Iterator[Any]:
        entries = self._dataset.entries if self._dataset is not None else ()
        while entries:
            for index in rng.permutation(len(entries)):
                yield entries[index]


def _train(net: torch.nn.Module, args: argparse.Namespace,
           batches: _Batches) -> tuple[float, int]:
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
            losses = net(*batches.take())
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


def _target(boxes: npt.NDArray[np.float32],
            labels: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
    return {'boxes': torch.from_numpy(boxes), 'labels': torch.from_numpy(labels)}


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
