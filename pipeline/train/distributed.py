"""Training stages under ``torchrun``: DistributedDataParallel on one or many processes, same config.

``torchrun --nproc_per_node N -m pipeline.cli run --config C`` (or ``pipeline run --nproc N``, which wraps it) starts
N processes. Rank 0 runs the pipeline as usual -- it alone reads and writes the manifest and every artifact. Before a
stage that can use the other ranks (``train``, ``prune``), it broadcasts the stage's context; the other ranks run the same
stage code in lockstep on their shard of every batch and throw their copy of the outputs away. Between those
stages they wait for the next broadcast.

Semantics (documented in the README):
- the global batch is ``train.batch_size``: every rank builds the same shuffled, augmented global batch (shared
  generator) and trains on its slice ``[rank::world]``; DDP averages the gradients, so the step is the
  single-process step up to BatchNorm statistics and EnResNet's noise scale, which are taken per rank (over the
  rank's slice), and a global batch smaller than the world size is skipped;
- adversarial examples are crafted per rank on the unwrapped model (the weights are equal on every rank), with a
  generator seeded by (seed, epoch, rank), so a resumed run -- on any world size -- draws the same random starts;
- after every epoch the ranks take rank 0's BatchNorm statistics and are checked to hold identical weights;
- the prune stage's sparsifier (RGSM, RVSM, ADMM) runs on every rank on the DDP-averaged gradients and equal
  weights, so its steps and epoch-end projections are the same everywhere (the weight check covers them too);
- only rank 0 checkpoints; the checkpoint holds no per-rank state, so ``kill -9`` and a rerun with another
  ``--nproc`` resumes from it (multi-node: the run folder must be on a shared filesystem);
- every rank, and torchrun under ``pipeline run --nproc``, dies with its parent (``die_with_parent``).
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch

# the stages whose run() uses the other ranks; every other stage runs on rank 0 alone
DISTRIBUTED_STAGES = ("train", "prune", "finetune")


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; elsewhere nothing happens).

    torchrun starts each rank in a session of its own, so a ``kill -9`` of ``pipeline run --nproc`` or of
    torchrun would leave the ranks running on, holding the run folder's lock and the GPUs. With this, the
    launcher's death stops torchrun, and torchrun's death stops the ranks; a rerun then resumes from the last
    checkpoint. ``parent_pid``: the parent expected, in case it died before this call."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def init(device: torch.device | str = "cpu") -> World | None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); None when running alone."""
    import torch.distributed as dist

    world = world_from_env()
    if world.size == 1:
        return None
    die_with_parent()
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))   # one GPU per process
    if not dist.is_initialized():
        # rank 0 may spend hours in eval/export while the others wait for the next broadcast
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo",
                                timeout=datetime.timedelta(days=7))
    return world


def shutdown() -> None:
    """Leave the process group before the interpreter exits: left to interpreter shutdown, gloo's threads are
    sometimes torn down while still joinable ("terminate called without an active exception", SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def active() -> World | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return World(dist.get_rank(), dist.get_world_size())


def broadcast(obj=None):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(x: torch.Tensor, world: World | None) -> torch.Tensor:
    return x if world is None else x[world.rank::world.size]


def attack_generator(seed: int, epoch: int, world: World) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_009 + world.rank) % (2**63))


def epoch_attack_generator(seed: int, epoch: int, world: World | None) -> torch.Generator | None:
    """Under torchrun: this rank's generator for the epoch's attacks, and torch's global RNG (EnResNet's noise)
    reseeded per rank. Per rank and epoch, not per run: nothing per rank to checkpoint, so any world size can
    resume. None when running alone (the stage's own generator is used, as before)."""
    if world is None:
        return None
    gen = attack_generator(seed, epoch, world)
    torch.manual_seed(gen.initial_seed() + 1)
    return gen


def prepare(model: torch.nn.Module, world: World | None, device, batch_size: int, log,
            cuda_graphs: bool = False) -> torch.nn.Module:
    """The module a training stage steps: ``model`` itself alone, its DDP wrapper under torchrun (where
    ``train.cuda_graphs`` is refused: the capture would have to include DDP's collectives)."""
    from ..core.errors import UserError

    if cuda_graphs and world is not None:
        raise UserError(f"train.cuda_graphs = true runs in one process; under torchrun ({world.size} ranks) set "
                        "train.cuda_graphs = false")
    if cuda_graphs and torch.device(device).type != "cuda":
        raise UserError(f"train.cuda_graphs = true needs a CUDA device; this run trains on {torch.device(device)} "
                        "(set train.cuda_graphs = false)")
    if world is None:
        return model
    if batch_size < world.size:
        raise UserError(f"train.batch_size = {batch_size} is smaller than the {world.size} torchrun ranks "
                        "(the global batch is split across them)")
    log(f"DistributedDataParallel over {world.size} ranks: global batch {batch_size}, "
        f"about {batch_size // world.size} per rank")
    return wrap(model, world, device)


def end_epoch(model: torch.nn.Module, world: World | None) -> None:
    if world is not None:
        sync_buffers(model, world)
        check_in_sync(model, world)


def wrap(model: torch.nn.Module, world: World | None, device) -> torch.nn.Module:
    if world is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's BatchNorm running statistics on every rank (each rank updated its own from its slice), so that
    validation, checkpoint selection and the saved model agree across ranks."""
    import torch.distributed as dist

    for b in unwrap(model).buffers():
        dist.broadcast(b.data, src=0)


def check_in_sync(model: torch.nn.Module, world: World) -> None:
    """Every rank holds the same weights (DDP kept them equal); a RuntimeError naming the spread otherwise."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.state_dict().values()
                      if p.is_floating_point()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([float((flat - ref).abs().max())], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() > 0:
        raise RuntimeError(f"torchrun ranks diverged: max |weight difference| to rank 0 = {diff.item():.3e}")
