"""``train.cuda_graphs``: the attack + forward + backward captured once as a CUDA graph and replayed
(pipeline/training.py ``TrainStep``). These need a CUDA device and skip elsewhere; the CPU-side rules (refused on
the CPU and under torchrun, one line each) are in tests/test_errors_catalogue.py and tests/test_training.py."""
import pytest
import torch

import models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


def _model(noise_coef=0.0, grouped=False):
    torch.manual_seed(0)   # seeds the default CUDA generator too
    model = models.create_model("test_resnet", ensemble=2, noise_coef=noise_coef).cuda().train()
    if grouped:
        from models.grouped import to_grouped

        model = to_grouped(model)
    return model


def _batches(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (size,), generator=g).cuda())
            for _ in range(n)]


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_replays_step_like_the_eager_step():
    """Deterministic model and attack (no noise, no random start): warm-up on batch 0, capture on batch 1, replays
    on batches 2-4 -- every step's loss and the final weights as the eager steps give them."""
    from pipeline.algorithms.attacks import make_attack
    from pipeline.train.loop import TrainStep

    attack = make_attack("pgd", eps=8 / 255, step=2 / 255, steps=3, random_start=False)
    data = _batches(5)
    runs = {}
    for graphs in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = TrainStep(model, opt, attack=attack, cuda_graphs=graphs, warmup=1)
        losses = [float(step(x, y)[0]) for x, y in data]
        runs[graphs] = (losses, _params(model), step.replays)
    assert runs[True][2] == 4 and runs[False][2] == 0
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-5)


def test_replays_draw_fresh_random_numbers():
    """The same batch replayed with lr = 0: with EnResNet's noise and a random start every replay draws anew
    (different losses); with neither, every replay gives the same loss."""
    from pipeline.algorithms.attacks import make_attack
    from pipeline.train.loop import TrainStep

    (x, y), = _batches(1)
    for noisy in (True, False):
        model = _model(noise_coef=0.1 if noisy else 0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        attack = make_attack("pgd", eps=8 / 255, step=2 / 255, steps=2, random_start=noisy)
        step = TrainStep(model, opt, attack=attack, cuda_graphs=True, warmup=1)
        losses = [float(step(x, y)[0]) for _ in range(5)][1:]   # the replays
        assert (len(set(losses)) == len(losses)) if noisy else (len(set(losses)) == 1), (noisy, losses)


@pytest.mark.parametrize("precision,channels_last,grouped", [("fp32", False, False), ("bf16", True, True)])
def test_graphed_epochs_train_like_eager_ones(precision, channels_last, grouped):
    """Two epochs of train_epoch with RGSM (the prune stage's loop), graphs vs eager: the same number of images,
    replays for every full batch after the warm-up, losses within 5 % and the same channel sparsity +- 5 points."""
    from pipeline.algorithms.attacks import make_attack
    from pipeline.algorithms.groups import paper_families
    from pipeline.algorithms.rgsm import RGSM
    from pipeline.algorithms.sparsity import sparsity_metrics
    from pipeline.train.data import Split
    from pipeline.train.loop import WARMUP_STEPS, train_epoch

    attack = make_attack("pgd", eps=8 / 255, step=2 / 255, steps=2, random_start=True)
    g = torch.Generator().manual_seed(5)
    split = Split(torch.randint(0, 256, (10 * 32 + 12, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (10 * 32 + 12,), generator=g))
    out = {}
    for graphs in (False, True):
        model = _model(noise_coef=0.1, grouped=grouped)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rgsm = RGSM(paper_families(model), beta=1.0, lambda1=0.3, lambda2=1e-4) if not grouped else None
        gen = torch.Generator().manual_seed(7)
        stats = []
        for _ in range(2):
            stats.append(train_epoch(model, split, opt, batch_size=32, attack=attack, generator=gen, augment=True,
                                     device="cuda", sparsifier=rgsm, precision=precision,
                                     channels_last=channels_last, cuda_graphs=graphs))
            if rgsm is not None:
                rgsm.end_epoch()
        out[graphs] = (stats, sparsity_metrics(model)["channel_sparsity"] if not grouped else 0.0)
    eager, graphed = out[False][0], out[True][0]
    assert [s["graph_replays"] for s in graphed] == [10 - WARMUP_STEPS] * 2
    for e, gr in zip(eager, graphed):
        assert gr["loss"] == pytest.approx(e["loss"], rel=0.05)
    assert abs(out[True][1] - out[False][1]) <= 5.0
