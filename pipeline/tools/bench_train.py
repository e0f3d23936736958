"""``pipeline bench-train``: images/s of one adversarial training epoch, this pipeline vs a reference-style loop.

(a) pipeline:  ``training.train_epoch`` on uint8 tensors with batched crop+flip on the training device.
(b) reference: torchvision ``CIFAR10`` + per-sample ``RandomCrop/RandomHorizontalFlip/ToTensor`` through a
    ``DataLoader``, as in typical PGD-training repositories.

Both train the same architecture from the same initial weights with the same attack callable, optimizer
settings and batch size, on the same images: the first ``images`` of the raw 50k CIFAR-10 training set in
file order. (Not the pipeline's seeded train/val split: throughput does not depend on which images, and file
order lets the reference side be a plain ``Subset(range(images))``.) Runs alternate a, b, a, b so drift from
other load on the machine hits both; the best run of each is reported.
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from models import create_model

from ..config import ConfigError, RunConfig
from ..train.data import Split, load_cifar10, resolve_root
from ..train.loop import train_epoch
from ..train.recipe import make_optimizer, training_attack
from ..train.setup import device_of, model_kwargs, seed_everything, synchronize

WARMUP_BATCHES = 3
ROUNDS = 2


def _cifar10_train(cfg: RunConfig):
    """torchvision's CIFAR-10 training set, read once; both loops take their images from it."""
    from torchvision import datasets

    root = resolve_root(cfg.data.root)
    if not (root / "cifar-10-batches-py").is_dir():
        load_cifar10(cfg.data.root, cfg.data.download)  # downloads, or raises the pipeline's one-line DataError
    return datasets.CIFAR10(str(root), train=True, download=False)


def _reference_loader(dataset, n: int, batch_size: int, augment: bool, workers: int, device: torch.device):
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    per_sample = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    dataset.transform = transforms.Compose([*per_sample, transforms.ToTensor()])
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda")


def _reference_epoch(model, loader, optimizer, attack, generator, device) -> None:
    # Bookkeeping mirrors train_epoch (loss/accuracy read back every batch) so both pay the same syncs.
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if attack is not None:
            x = attack(model, x, y, generator)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())


def run_bench(cfg: RunConfig, *, images: int, workers: int) -> dict:
    """Measure both loops, print a table and the result as JSON on the last line, and return the result."""
    if images <= 0:
        raise ConfigError(f"--images: expected > 0, got {images}")
    if workers < 0:
        raise ConfigError(f"--workers: expected >= 0, got {workers}")
    dataset = _cifar10_train(cfg)
    if images > len(dataset):
        raise ConfigError(f"--images: expected at most {len(dataset)} (the CIFAR-10 training set), got {images}")
    t, a = cfg.train, cfg.train.attack
    bs = t.batch_size
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    init_state = create_model(cfg.model.arch, **model_kwargs(cfg)).state_dict()
    attack = training_attack(cfg)

    def fresh():
        model = create_model(cfg.model.arch, **model_kwargs(cfg))
        model.load_state_dict(init_state)
        model.to(device)
        return model, make_optimizer(model, cfg, t.lr), torch.Generator().manual_seed(cfg.seed)

    # The same bytes as the reference loop reads, laid out as load_cifar10 does: uint8 [N, 3, 32, 32].
    split = Split(torch.from_numpy(dataset.data[:images]).permute(0, 3, 1, 2).contiguous(),
                  torch.tensor(dataset.targets[:images], dtype=torch.int64))
    warm_n = min(images, WARMUP_BATCHES * bs)

    def pipeline_run(n: int) -> float:
        model, opt, gen = fresh()
        part = split if n == images else Split(split.images[:n], split.labels[:n])
        synchronize(device)
        start = time.perf_counter()
        train_epoch(model, part, opt, batch_size=bs, attack=attack, generator=gen, augment=t.augment, device=device)
        synchronize(device)
        return n / (time.perf_counter() - start)

    def reference_run(n: int) -> float:
        model, opt, gen = fresh()
        loader = _reference_loader(dataset, n, bs, t.augment, workers, device)
        synchronize(device)
        # Iterator creation (worker start-up) is inside the timing: typical repos pay it every epoch.
        start = time.perf_counter()
        _reference_epoch(model, loader, opt, attack, gen, device)
        synchronize(device)
        return n / (time.perf_counter() - start)

    # Warm-up absorbs one-time costs (allocator, kernel selection, lazy imports, file cache) on throwaway models.
    pipeline_run(warm_n)
    reference_run(warm_n)
    runs = {"pipeline": [], "reference": []}
    for r in range(ROUNDS):
        for name, fn in (("pipeline", pipeline_run), ("reference", reference_run)):
            runs[name].append(fn(images))
            print(f"round {r + 1}/{ROUNDS} {name:9s} {runs[name][-1]:10.1f} images/s", flush=True)

    best = {k: max(v) for k, v in runs.items()}
    steps = {"pgd": a.steps, "fgsm_rs": 1}.get(a.kind, 0) if attack is not None else 0
    result = {
        "model": cfg.model.arch, "ensemble": cfg.model.ensemble,
        "attack": a.kind if attack is not None else "none", "attack_steps": steps,
        "batch_size": bs, "images": images, "workers": workers, "augment": t.augment,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "warmup_batches": WARMUP_BATCHES,
        "runs_images_per_s": runs, "pipeline_images_per_s": best["pipeline"],
        "reference_images_per_s": best["reference"], "ratio": best["pipeline"] / best["reference"],
    }
    print(f"\n{result['model']}, attack {result['attack']} ({steps} step(s)), batch {bs}, {images} images, "
          f"{result['device']}, {result['threads']} thread(s), reference workers {workers}; best of {ROUNDS}")
    print(f"{'loop':10s} {'images/s':>10s}")
    print(f"{'pipeline':10s} {best['pipeline']:10.1f}")
    print(f"{'reference':10s} {best['reference']:10.1f}")
    print(f"ratio pipeline/reference: {result['ratio']:.2f}x")
    print(json.dumps(result), flush=True)
    return result
