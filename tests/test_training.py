import pytest

from pipeline.training import step_lr


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
