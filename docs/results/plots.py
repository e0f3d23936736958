"""Plots of docs/results.md from the study's run folders: python docs/results/plots.py [runs/study]."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study")
OUT = Path(__file__).resolve().parent


def points(name):
    data = json.loads((RUNS / name / "sweep.json").read_text())
    return [p for p in data["points"] if p["status"] == "done"]


def set_labels(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def save(fig, axes, name: str, legend_size: int) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=110)


fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
for name, label, marker in (("rgsm-resnet20", "ResNet20", "o"), ("rgsm-en2resnet20", "En2ResNet20", "s")):
    pts = points(name)
    ax1.plot([p["hyper"]["lambda1"] for p in pts], [p["channel_sparsity"] for p in pts], marker=marker, label=label)
    ax2.plot([p["channel_sparsity"] for p in pts], [p["a3"] for p in pts], marker=marker, label=f"{label}, RGSM")
admm = RUNS / "admm-channel" / "report.json"
if admm.exists():
    rep = json.loads(admm.read_text())
    man = json.loads((RUNS / "admm-channel" / "manifest.json").read_text())
    res = man["stages"]["eval"]["metrics"]["models"]["pruned"]
    res = res.get("noise_off") or res.get("stochastic")
    ax2.scatter([rep["models"][1]["channel_sparsity"]], [res["attacks"]["ifgsm"]["accuracy"]], marker="x", s=60,
                color="k", label="ResNet20, ADMM-channel", zorder=3)
set_labels(ax1, "λ1 (β = 1)", "channel sparsity (%)", "RGSM: channel sparsity at equal λ1")
set_labels(ax2, "channel sparsity (%)", "A3 IFGSM-20 accuracy (%)", "robust accuracy vs channel sparsity")
save(fig, (ax1, ax2), "rgsm.png", legend_size=8)

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
pts = points("rvsm-beta")
ax.plot([p["hyper"]["beta"] for p in pts], [p["weight_sparsity"] for p in pts], marker="o", label="ℓ0 (λ = 1e-6)")
for name, marker in (("rvsm-l1", "^"), ("rvsm-tl1", "v")):
    if (RUNS / name / "sweep.json").exists():
        for p in points(name):
            ax.scatter([p["hyper"]["beta"]], [p["weight_sparsity"]], marker=marker, s=50,
                       label=f"{p['hyper']['penalty']} (ℓ0's zeroing threshold at β = 0.01)")
ax.set_xscale("log")
set_labels(ax, "β", "weight sparsity, exact zeros (%)", "RVSM: sparsity vs β")
by_penalty = {}
for name in ("rvsm-beta", "rvsm-l1", "rvsm-tl1", "rvsm-l1-match", "rvsm-tl1-match"):
    if (RUNS / name / "sweep.json").exists():
        for p in points(name):
            if p["hyper"]["beta"] == 0.01:
                by_penalty.setdefault(p["hyper"]["penalty"], []).append((p["weight_sparsity"], p["a3"]))
for (penalty, xy), marker in zip(sorted(by_penalty.items()), "o^v"):
    ax2.plot(*zip(*sorted(xy)), marker=marker, label=penalty)
set_labels(ax2, "weight sparsity, exact zeros (%)", "A3 IFGSM-20 accuracy (%)", "β = 0.01: ℓ0 / ℓ1 / TL1")
save(fig, (ax, ax2), "rvsm.png", legend_size=7)
print("wrote", OUT / "rgsm.png", OUT / "rvsm.png")
