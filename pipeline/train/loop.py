"""The training/evaluation loops shared by the train and prune stages (no file I/O here)."""
from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.nn.functional as F

from models import noise_disabled

from .data import Split, batches
from ..core.errors import TrainingDiverged


def step_lr(epoch: int, *, base_lr: float, epochs: int, milestones: tuple[float, ...], gamma: float,
            warmup_epochs: int = 0) -> float:
    """Step decay at fractions of the run, e.g. (0.4, 0.6, 0.8) of 200 epochs = the paper's 80/120/160.

    A milestone never falls on epoch 0: a short run starts at ``base_lr`` however the fractions round.
    ``warmup_epochs`` W > 0 ramps the rate linearly over the first W epochs (base_lr·(e+1)/W in epoch e), the
    gradual warm-up that goes with a learning rate scaled up for a larger batch (Goyal et al., 2017)."""
    passed = sum(epoch >= max(1, round(m * epochs)) for m in milestones)
    ramp = min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0
    return base_lr * gamma ** passed * ramp


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


WARMUP_STEPS = 3   # eager steps before a CUDA graph capture: cuDNN/cuBLAS set-up and lazy allocations


def _on_side_stream(fn):
    """``fn()`` on a fresh CUDA stream, ordered after and before the current one (how warm-up before a capture
    must run: autograd then records its backward streams the way the capture will see them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


class TrainStep:
    """One adversarial training step: the attack, forward, cross-entropy and backward, then the sparsifier's
    ``regularize()``, the optimizer step and the sparsifier's ``pull(lr)``. Returns the detached (loss, logits).

    ``cuda_graphs``: the gradient part -- attack + forward + backward, all but a handful of the step's kernels --
    is captured as a CUDA graph on the first batch shape after ``warmup`` eager steps, and replayed with each
    batch of that shape copied into its static input; a batch of another shape (an epoch's last) runs eagerly.
    The optimizer step and the sparsifier stay eager, so a new learning rate or optimizer needs no re-capture and
    the sparsifiers' host-side decisions (RGSM's aligned widths) keep working. The gradients then live in the
    graph's memory pool and are overwritten by every replay, never set to None. Random numbers inside the graph
    (EnResNet's noise, the attack's random start: ``attack_generator`` must be None on CUDA) come from the
    default CUDA generator, whose graph-safe offsets give every replay fresh draws.

    ``precision = "bf16"``: attack and forward under bf16 autocast (weights, gradients and optimizer stay fp32).
    ``model`` may be the DDP wrapper: the attack runs on the unwrapped module (crafting needs no gradient sync)."""

    def __init__(self, model, optimizer, *, attack, attack_generator=None, sparsifier=None, precision: str = "fp32",
                 cuda_graphs: bool = False, warmup: int = WARMUP_STEPS, natural_weight: float = 0.0,
                 adversarial_weight: float = 1.0):
        from .distributed import unwrap

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.model, self.attacked = model, unwrap(model)
        self.optimizer, self.attack, self.attack_generator = optimizer, attack, attack_generator
        self.sparsifier, self.precision, self.warmup = sparsifier, precision, warmup
        self.device = next(self.attacked.parameters()).device
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs the model on a CUDA device, not {self.device}")
            if model is not self.attacked:
                raise ValueError("cuda_graphs does not support DistributedDataParallel here (one process only)")
            if attack_generator is not None:
                raise ValueError("cuda_graphs: the attack must draw from the default CUDA generator "
                                 "(attack_generator=None)")
        if self.device.type == "cuda":
            # the batch shapes are fixed: let cuDNN time its algorithms once per shape (process-wide setting)
            torch.backends.cudnn.benchmark = True
        self.cuda_graphs = cuda_graphs
        # loss = natural_weight·CE(f(x)) + adversarial_weight·CE(f(x_adv)); (1, 8) is Binary-Relax's trade-off loss
        self.natural_weight, self.adversarial_weight = float(natural_weight), float(adversarial_weight)
        self.graph = None
        self.graph_shape = None
        self.eager_steps = self.replays = 0

    def _autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        # the autocast weight cache would hold casts made during capture: off under graphs, as torch advises
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs)

    def _gradients(self, x, y):
        with self._autocast():
            clean = x
            if self.attack is not None:
                x = self.attack(self.attacked, x, y, self.attack_generator)
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            if self.natural_weight or self.adversarial_weight != 1.0:
                loss = self.adversarial_weight * loss
                if self.natural_weight:
                    loss = loss + self.natural_weight * F.cross_entropy(self.model(clean), y)
        loss.backward()
        return loss.detach(), logits.detach()

    def _graphed_gradients(self, x, y):
        if self.graph is not None:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            self.replays += 1
            return self.static_loss, self.static_logits
        if self.eager_steps < self.warmup:
            self.optimizer.zero_grad(set_to_none=True)
            self.eager_steps += 1
            return _on_side_stream(lambda: self._gradients(x, y))
        self.static_x, self.static_y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)   # backward then allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss, self.static_logits = self._gradients(self.static_x, self.static_y)
        self.graph = graph
        graph.replay()   # a capture only records: this batch runs now
        self.replays += 1
        return self.static_loss, self.static_logits

    def gradients(self, x, y):
        """(loss, logits) of the batch, with the parameters' .grad set to its gradient."""
        if self.cuda_graphs:
            if self.graph_shape is None:
                self.graph_shape = (x.shape, x.stride(), y.shape)
            if (x.shape, x.stride(), y.shape) == self.graph_shape:
                return self._graphed_gradients(x, y)
        # keep the graph's gradient tensors (backward accumulates into the zeroed ones) while a graph exists
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        self.eager_steps += 1
        return self._gradients(x, y)

    def update(self) -> None:
        """The update from the gradients ``gradients()`` left: regularize, optimizer step, pull."""
        if self.sparsifier is not None:
            self.sparsifier.regularize()
        self.optimizer.step()
        if self.sparsifier is not None:
            self.sparsifier.pull(self.optimizer.param_groups[0]["lr"])

    def __call__(self, x, y):
        if self.sparsifier is not None:
            self.sparsifier.before_batch()
        loss, logits = self.gradients(x, y)
        self.update()
        return loss, logits


def train_epoch(model, split: Split, optimizer, *, batch_size: int, attack, generator: torch.Generator,
                augment: bool, device, sparsifier=None, progress: str | None = None, precision: str = "fp32",
                channels_last: bool = False, world=None, attack_generator: torch.Generator | None = None,
                cuda_graphs: bool = False, loss_weights: tuple[float, float] = (0.0, 1.0)) -> dict:
    """One epoch of (adversarial) training, step by step through ``TrainStep``. A ``sparsifier`` (RGSM, RVSM,
    ADMM) gets ``before_batch()``, ``regularize()`` after backward and ``pull(lr)`` after the optimizer step; the
    caller ends its epoch.

    ``channels_last`` feeds NHWC batches (the model must be converted by the caller); ``precision`` and
    ``cuda_graphs``: see ``TrainStep``. Loss and accuracy accumulate on the device: on a GPU the loop never waits
    for the host, and a non-finite loss is reported at the end of the epoch (naming its first batch) instead of
    at once. On a GPU the whole split is moved to the device once, and the attack's random starts come from the
    default CUDA generator (seeded by the caller; no per-batch host-to-device copy of random numbers).

    ``world`` (pipeline/distributed.py; ``model`` then is the DDP wrapper): every rank draws the same global batch
    and trains on its slice; the attack uses ``attack_generator`` (per rank), and the returned
    loss/accuracy/throughput are over all ranks."""
    from .distributed import shard
    from tqdm import tqdm

    device = torch.device(device)
    model.train()
    on_gpu = device.type == "cuda"
    if on_gpu:
        split = Split(split.images.to(device), split.labels.to(device))
    step = TrainStep(model, optimizer, attack=attack, sparsifier=sparsifier, precision=precision,
                     cuda_graphs=cuda_graphs, natural_weight=loss_weights[0], adversarial_weight=loss_weights[1],
                     attack_generator=None if on_gpu else (attack_generator or generator))
    lr = optimizer.param_groups[0]["lr"]
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.zeros((), dtype=torch.int64, device=device)   # 1-based index of the first non-finite loss
    start = time.perf_counter()
    n_batches = (len(split) + batch_size - 1) // batch_size
    it = batches(split, batch_size, shuffle=True, generator=generator, augment_images=augment, device=device)
    bar = tqdm(it, total=n_batches, desc=progress, leave=False, disable=None if progress else True, mininterval=2)

    def diverged(index, value):
        return TrainingDiverged(f"{progress or 'training'}: the loss became {value} at batch {index}/{n_batches} "
                                f"(lr = {lr}); lower the learning rate")

    for batch_index, (x, y) in enumerate(bar, start=1):
        if world is not None:
            if len(y) < world.size:
                continue   # a slice per rank would be empty
            x, y = shard(x, world), shard(y, world)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if sparsifier is not None:
            sparsifier.before_batch()
        loss, logits = step.gradients(x, y)
        finite = torch.isfinite(loss)
        if not on_gpu and not bool(finite):   # on the CPU a check costs nothing: stop before the bad update
            raise diverged(batch_index, float(loss))
        first_bad = torch.where((first_bad == 0) & ~finite, batch_index, first_bad)
        step.update()
        seen += len(y)
        loss_sum += loss.double() * len(y)
        correct += (logits.argmax(1) == y).sum()
    if int(first_bad):
        raise diverged(int(first_bad), "non-finite")
    if world is not None:
        import torch.distributed as dist

        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                       device=device)])
        dist.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
    seconds = time.perf_counter() - start
    return {"loss": float(loss_sum) / max(seen, 1), "train_acc": 100.0 * int(correct) / max(seen, 1),
            "images_per_s": seen / seconds, "seconds": seconds, "lr": lr,
            **({"graph_replays": step.replays} if cuda_graphs else {})}


def evaluate(model, split: Split, *, batch_size: int, device, attack=None,
             generator: torch.Generator | None = None, noise: bool = True) -> float:
    """Accuracy (%) in eval mode, on adversarial examples when ``attack`` is given."""
    model.eval()
    correct = 0
    ctx = noise_disabled(model) if not noise else contextlib.nullcontext()
    with ctx:
        for x, y in batches(split, batch_size, shuffle=False, device=device):
            if attack is not None:
                x = attack(model, x, y, generator)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / max(len(split), 1)


def snapshot(model) -> dict:
    return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
