import pytest
import torch

import models

from pipeline.train.loop import step_lr


def lrs(epochs, milestones, base=0.1, gamma=0.1):
    return [step_lr(e, base_lr=base, epochs=epochs, milestones=milestones, gamma=gamma) for e in range(epochs)]


def test_paper_schedule_200_epochs():
    got = lrs(200, (0.4, 0.6, 0.8))
    assert got[0] == got[79] == 0.1
    assert got[80] == pytest.approx(0.01) and got[119] == pytest.approx(0.01)
    assert got[120] == pytest.approx(0.001) and got[159] == pytest.approx(0.001)
    assert got[160] == pytest.approx(1e-4) and got[199] == pytest.approx(1e-4)


def test_short_runs_start_at_base_lr():
    assert lrs(1, (0.4, 0.6, 0.8)) == [0.1]          # no milestone may land on epoch 0
    assert lrs(5, (0.6, 0.8)) == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])


def test_nan_loss_stops_training_naming_epoch_and_batch():
    from pipeline.train.data import Split
    from pipeline.core.errors import TrainingDiverged
    from pipeline.train.loop import train_epoch

    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=1, noise_coef=0.0)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model.members[0].linear.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"train 3/5: the loss became nan at batch 1/2 \(lr = 0.1\)"):
        train_epoch(model, split, optimizer, batch_size=32, attack=None, generator=torch.Generator().manual_seed(0),
                    augment=False, device="cpu", progress="train 3/5")


def test_reset_optimizer_epoch_restarts_momentum():
    from pipeline.config import load_config
    from pipeline.train.recipe import epoch_optimizer

    model = models.create_model("test_resnet", ensemble=1, noise_coef=0.0)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    for mode, fresh in (("never", False), ("epoch", True)):
        cfg = load_config(None, [f"train.reset_optimizer={mode}"])
        first = epoch_optimizer(None, model, cfg, 0.1)
        first.step()                                   # creates momentum buffers
        assert len(first.state) > 0
        nxt = epoch_optimizer(first, model, cfg, 0.1)
        assert (nxt is not first) == fresh
        assert (len(nxt.state) == 0) == fresh


def test_prune_stage_drives_every_sparsifier_through_one_protocol():
    """train_epoch calls before_batch / regularize / pull on whatever sparsifier it gets (ADMM needs all three)."""
    from pipeline.train.data import Split
    from pipeline.train.loop import train_epoch

    calls = []

    class Recorder:
        def before_batch(self):
            calls.append("before_batch")

        def regularize(self):
            calls.append("regularize")

        def pull(self, lr):
            calls.append(f"pull {lr}")

    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=1, noise_coef=0.0)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_epoch(model, split, optimizer, batch_size=32, attack=None, generator=torch.Generator().manual_seed(0),
                augment=False, device="cpu", sparsifier=Recorder())
    assert calls == ["before_batch", "regularize", "pull 0.05"] * 2


@pytest.mark.parametrize("precision,channels_last", [("fp32", True), ("bf16", False), ("bf16", True)])
def test_precision_and_channels_last_train_like_the_default(precision, channels_last):
    """bf16 autocast and NHWC tensors are speed options: one epoch from the same start lands near fp32/NCHW."""
    from pipeline.algorithms.attacks import make_attack
    from pipeline.train.data import Split
    from pipeline.train.loop import train_epoch

    torch.manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    attack = make_attack("pgd", eps=8 / 255, step=4 / 255, steps=2)
    init = models.create_model("test_resnet", ensemble=2, noise_coef=0.0).state_dict()
    out = {}
    for key in (("fp32", False), (precision, channels_last)):
        model = models.create_model("test_resnet", ensemble=2, noise_coef=0.0)
        model.load_state_dict(init)
        if key[1]:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        stats = train_epoch(model, split, opt, batch_size=32, attack=attack, generator=torch.Generator().manual_seed(1),
                            augment=True, device="cpu", precision=key[0], channels_last=key[1])
        out[key] = (stats["loss"], torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert all(p.dtype == torch.float32 for p in model.parameters())   # autocast never changes the weights
    (loss_a, w_a), (loss_b, w_b) = out.values()
    tol = 1e-5 if precision == "fp32" else 5e-3   # NHWC only reorders sums; bf16 keeps ~3 significant digits
    assert abs(loss_a - loss_b) <= tol * max(1.0, abs(loss_a))
    assert (w_a - w_b).abs().max() <= (1e-5 if precision == "fp32" else 5e-3)


def test_train_step_is_the_plain_adversarial_step():
    """TrainStep (what train_epoch and bench-train --variants run) against the step written out by hand: attack,
    cross-entropy, backward, the sparsifier's regularize, SGD, pull. Bit-identical on the CPU, noise included."""
    import torch.nn.functional as F

    from pipeline.algorithms.attacks import make_attack
    from pipeline.algorithms.groups import paper_families
    from pipeline.algorithms.rgsm import RGSM
    from pipeline.train.loop import TrainStep

    attack = make_attack("pgd", eps=8 / 255, step=2 / 255, steps=2, random_start=True)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    finals = []
    for by_hand in (True, False):
        torch.manual_seed(0)
        model = models.create_model("test_resnet", ensemble=2, noise_coef=0.1).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rgsm = RGSM(paper_families(model), beta=1.0, lambda1=0.5, lambda2=1e-3)
        gen = torch.Generator().manual_seed(3)
        step = TrainStep(model, opt, attack=attack, attack_generator=gen, sparsifier=rgsm)
        for _ in range(3):
            if by_hand:
                x_adv = attack(model, x, y, gen)
                loss = F.cross_entropy(model(x_adv), y)
                opt.zero_grad()
                loss.backward()
                rgsm.regularize()
                opt.step()
                rgsm.pull(0.05)
            else:
                loss, _ = step(x, y)
        finals.append((float(loss.detach()), torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert finals[0][0] == finals[1][0]
    assert torch.equal(finals[0][1], finals[1][1])


def test_train_step_refuses_cuda_graphs_off_the_gpu():
    from pipeline.train.loop import TrainStep

    model = models.create_model("test_resnet", ensemble=1, noise_coef=0.0)
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device, not cpu"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), attack=None, cuda_graphs=True)


def test_lr_warmup_ramps_then_follows_the_steps():
    got = [
        step_lr(e, base_lr=0.4, epochs=10, milestones=(0.5,), gamma=0.1, warmup_epochs=4) for e in range(10)]
    assert got[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert got[4] == pytest.approx(0.4) and got[5:] == pytest.approx([0.04] * 5)
    assert [step_lr(e, base_lr=0.1, epochs=5, milestones=(), gamma=0.1, warmup_epochs=0) for e in range(5)] == [0.1] * 5
