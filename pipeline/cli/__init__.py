"""The commands: ``pipeline run --config configs/X.toml [--out DIR] [--set section.key=value ...]``, ``eval``,
``sweep`` (``sweep.py``), ``show-config``, ``bench-train`` and ``device``. The top room: it may import every other."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="Robust EnResNet -> RGSM pruning -> ONNX -> bench")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run (or resume) every stage of a config")
    run.add_argument("--config", required=True, help="TOML file, e.g. configs/quickstart.toml")
    run.add_argument("--out", help="run directory (default: runs/<config name>)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value (repeatable), e.g. --set prune.lambda1=0.1")
    run.add_argument("--reuse-stale", action="store_true",
                     help="keep finished stages whose code changed since they ran (recorded in manifest.json)")
    run.add_argument("--share-from", action="append", default=[], metavar="DIR",
                     help="take finished stages with the same key from this run folder instead of recomputing "
                          "them (e.g. a paper config's train stage from its dense-baseline run); repeatable")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (e.g. train); no report is written")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train on N processes of this machine with torchrun (DistributedDataParallel; gloo on "
                          "CPU, NCCL on GPUs); the same as: torchrun --standalone --nproc_per_node N -m pipeline.cli run ...")
    run.add_argument("--bench-device", action="append", default=[], metavar="TARGET",
                     help="bench on this device too (repeatable): aarch64-emu, ssh://user@host[:port]; replaces "
                          "bench.devices by host + these (per-device settings: [[bench.devices]] in the config)")
    ev = sub.add_parser("eval", parents=[common],
                        help="re-evaluate a finished run's models (eval + transfer stages; never retrains)")
    ev.add_argument("--run", required=True, help="run directory written by 'pipeline run'")
    ev.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                    help="override an eval.* (or paper.*) setting, e.g. --set eval.images=200")
    ev.add_argument("--reuse-stale", action="store_true",
                    help="accept earlier stages whose code changed since they ran (as for 'pipeline run')")
    bl = sub.add_parser("baseline", parents=[common],
                        help="train the pruned run's final widths from scratch for the same epochs; bench it beside")
    bl.add_argument("--run", required=True, help="a finished pruned run folder; the baseline goes to RUN/baseline")
    bl.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a value of the baseline's config (the run's, with model.widths and the epochs)")
    bl.add_argument("--reuse-stale", action="store_true", help="as for 'pipeline run'")
    bl.add_argument("--until", metavar="STAGE", help="stop the baseline after this stage (e.g. train)")
    sw = sub.add_parser("sweep", parents=[common], help="one run per grid point; shared upstream stages; sweep.md")
    sw.add_argument("--config", required=True)
    sw.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                    help="values to sweep (repeatable: the grid is the product), e.g. --grid prune.lambda1=0.01,0.02")
    sw.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value for every point")
    sw.add_argument("--out", help="sweep folder (default: runs/<config name>-sweep)")
    sw.add_argument("--reuse-stale", action="store_true", help="as for 'pipeline run'")
    sw.add_argument("--share-from", action="append", default=[], metavar="DIR",
                    help="also take finished stages with the same key from this run (or sweep) folder; repeatable")
    sw.add_argument("--baseline", action="store_true",
                    help="also train each point's pruned widths from scratch ('pipeline baseline') and plot both")
    sw.add_argument("--until", metavar="STAGE",
                    help="stop every point (and baseline) after this stage; no tables (finish them with a rerun)")
    show = sub.add_parser("show-config", parents=[common], help="print the resolved config as TOML-like key = value lines")
    show.add_argument("--config", required=True)
    show.add_argument("--set", action="append", default=[])
    tb = sub.add_parser("bench-train", parents=[common], help="training throughput: this pipeline vs a reference-style loop")
    tb.add_argument("--config", default=None, help="config for data root/model (default: built-in defaults)")
    tb.add_argument("--set", action="append", default=[])
    tb.add_argument("--images", type=int, default=2048, help="training images per measured epoch")
    tb.add_argument("--workers", type=int, default=2, help="DataLoader workers for the reference loop")
    tb.add_argument("--variants", action="store_true",
                    help="instead: time the PGD training step for every variant below (synthetic data, no files)")
    tb.add_argument("--device", choices=("cpu", "cuda"), help="overrides the config's device")
    tb.add_argument("--batches", default="128,512", help="--variants: batch sizes, comma-separated")
    tb.add_argument("--precisions", default="fp32,bf16", help="--variants: fp32 and/or bf16 (autocast)")
    tb.add_argument("--impls", default="members,grouped", help="--variants: members and/or grouped")
    tb.add_argument("--channels-last", default="false,true", help="--variants: false and/or true")
    tb.add_argument("--cuda-graphs", default=None,
                    help="--variants: false and/or true (default: both on a CUDA device, false elsewhere)")
    tb.add_argument("--prune-step", action="store_true",
                    help="--variants: time the prune stage's step (the config's RGSM/RVSM after every step)")
    tb.add_argument("--steps", type=int, default=20, help="--variants: timed steps per variant")
    tb.add_argument("--warmup", type=int, default=5, help="--variants: untimed steps first")
    dv = sub.add_parser("device", help="set up or check a benchmark device (aarch64-emu: arm64 root under qemu)")
    dvs = dv.add_subparsers(dest="device_command", required=True)
    for name, text in (("setup", "build the arm64 root (debootstrap + aarch64 onnxruntime wheel; needs root, ~1 min)"),
                       ("check", "run a tiny ONNX model on the host and on the emulated device; compare logits")):
        d = dvs.add_parser(name, parents=[common], help=text)
        d.add_argument("kind", choices=("aarch64-emu",), help="the device kind")
        d.add_argument("--root", help="the arm64 root (default: $PIPELINE_ARM_ROOT, else ~/.cache/pipeline/aarch64-root)")
        if name == "check":
            d.add_argument("--qemu-cpu", default="neoverse-n1", help="emulated CPU: cortex-a72, cortex-a76, neoverse-n1, max")
    return p


def _fail(msg: str) -> int:
    print(f"pipeline: error: {msg}", file=sys.stderr)
    return 2


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e} (check the folder: free space, permissions, and that no parent is a file)"


def main(argv: list[str] | None = None) -> int:
    """The command line. SIGTERM (``kill``, a scheduler's stop, ``docker stop``) is handled as Ctrl-C: it raises
    KeyboardInterrupt, so the runner removes the stage's temporary folder and records the failure (mid-stage
    checkpoints stay) and one line is printed; a second SIGTERM during that clean-up kills at once. Under torchrun
    only rank 0 does so: the other ranks may sit for hours in a collective that no Python handler can interrupt,
    so they keep SIGTERM's default and die with their parent as before. Library warnings (matplotlib, numpy, ...)
    are hidden unless --debug (or python -W / $PYTHONWARNINGS) asks for them."""
    import os
    import signal
    import threading
    import warnings

    owner, terminated = os.getpid(), []
    # onnxruntime's telemetry would write a device id under $HOME (creating a missing home folder) and try the
    # network; the pipeline never reaches out at run time
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

    def on_sigterm(signum, frame):
        if os.getpid() != owner or terminated:   # a forked child, or a second SIGTERM: die as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        terminated.append(signum)
        raise KeyboardInterrupt

    installed = threading.current_thread() is threading.main_thread() and os.environ.get("RANK", "0") in ("", "0")
    if installed:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():
            if not debug and not sys.warnoptions:
                warnings.simplefilter("ignore")
            return _main(argv)
    except KeyboardInterrupt:   # at any point, start-up included
        how = " (SIGTERM)" if terminated else ""
        return _fail(f"interrupted{how}; finished stages are kept, rerun the same command to resume")
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    import os

    args = _parser().parse_args(argv)
    # model.arch = "module:function" may name a module in the current folder, as `python -m` would find it;
    # appended, so that it never shadows an installed package (or this project's own `models`)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    from ..config import load_config, show_lines
    from ..core.errors import UserError

    try:
        if args.command == "eval":
            return _eval(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "baseline":
            return _baseline(args)
        if args.command == "device":
            return _device(args)
        overrides = list(args.set)
        if getattr(args, "bench_device", None):
            targets = ["host"] + [t for t in args.bench_device if t != "host"]
            overrides.append(("--bench-device", "bench.devices=[" + ", ".join('{target = %s}' % json.dumps(t)
                                                                         for t in targets) + "]"))
        cfg = load_config(args.config, overrides)
        if args.command == "show-config":
            print("\n".join(show_lines(cfg)))
            return 0
        if args.command == "bench-train":
            if args.variants:
                return _bench_variants(args, cfg)
            from ..tools.bench_train import run_bench

            run_bench(cfg, images=args.images, workers=args.workers)
            return 0
        from ..report import write_report
        from ..run.runner import follow_pipeline, run_pipeline
        from ..train import distributed

        if args.nproc != 1:
            return _torchrun(args.nproc, argv)

        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        if out.exists() and not out.is_dir():
            return _fail(f"--out {out}: exists and is not a directory")
        stages = stages_until(args.until)
        t0 = time.perf_counter()
        for d in args.share_from:
            if not Path(d).is_dir():
                return _fail(f"--share-from {d}: not a folder")
        from ..train.setup import device_of

        world = distributed.init(device_of(cfg))
        if world is not None and not world.is_main:
            follow_pipeline(cfg, stages)
            distributed.shutdown()
            return 0
        manifest = run_pipeline(cfg, out, stages, log=lambda m: print(m, flush=True), reuse_stale=args.reuse_stale,
                                donors=tuple(Path(d) for d in args.share_from))
        if world is not None:
            distributed.broadcast(None)   # the other ranks' follow_pipeline returns
            distributed.shutdown()
        if args.until:
            print(f"stopped after stage {args.until} in {time.perf_counter() - t0:.1f}s: {out}", flush=True)
            return 0
        report = write_report(out, manifest)
        print(f"done in {time.perf_counter() - t0:.1f}s: {out / 'report.md'}", flush=True)
        _warn_failed_devices(report)
        return 0
    except UserError as e:
        return _fail(str(e))
    except BrokenPipeError:     # `pipeline show-config ... | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:        # the output folder under a file, read-only, a full disk, ...
        return _fail(_os_error(e))
    except Exception as e:
        if args.debug:
            raise
        print(f"pipeline: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _bench_variants(args, cfg) -> int:
    import torch

    from ..config import ConfigError
    from ..tools.bench_variants import run_variants
    from ..train.setup import device_of

    def items(name: str, text: str, cast):
        try:
            return [cast(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{name}: expected a comma-separated list, got {text!r}") from None

    def flag(v: str) -> bool:
        if v not in ("true", "false"):
            raise ValueError(v)
        return v == "true"

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here")
    device = torch.device(args.device) if args.device else device_of(cfg)
    graphs = args.cuda_graphs if args.cuda_graphs is not None else ("false,true" if device.type == "cuda" else "false")
    run_variants(cfg, device=device, batches=items("--batches", args.batches, int),
                 precisions=items("--precisions", args.precisions, str), impls=items("--impls", args.impls, str),
                 channels_last=items("--channels-last", args.channels_last, flag), steps=args.steps,
                 warmup=args.warmup, cuda_graphs=items("--cuda-graphs", graphs, flag),
                 prune_step=args.prune_step)
    return 0


def _device(args) -> int:
    from ..devices import aarch64_emu as emu

    root = Path(args.root).expanduser().absolute() if args.root else emu.default_root()
    if args.device_command == "setup":
        facts = emu.setup(root, log=lambda m: print(m, flush=True))
        for k, v in facts.items():
            print(f"{k} = {v}")
        return 0
    res = emu.check(root, args.qemu_cpu, log=lambda m: print(m, flush=True))
    rt = res["emu_runtime"]
    print(f"{res['device']}: onnxruntime {rt['onnxruntime']} on {rt['machine']} ({rt['cpu']}), python {rt['python']}, "
          f"{res['emu_seconds']}s; host onnxruntime {res['host_runtime']['onnxruntime']} on {res['host_runtime']['machine']}")
    print(f"logits vs host: {res['images']} images, max abs diff {res['max_abs']:.3g}, mean {res['mean_abs']:.3g}, "
          f"rel {res['rel']:.3g} (tolerance {res['rel_tol']:g}), top-1 agree {res['top1_agree']}/{res['images']}")
    if not res["ok"]:
        return _fail(f"device {res['device']}: logits differ from the host beyond the tolerance")
    print("ok: the emulated device matches the host")
    return 0


def _sweep(args) -> int:
    from .sweep import run_sweep

    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-sweep"
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out}: exists and is not a directory")
    t0 = time.perf_counter()
    sweep = run_sweep(args.config, args.grid, args.set, out, log=lambda m: print(m, flush=True),
                      reuse_stale=args.reuse_stale, share_from=tuple(Path(d) for d in args.share_from),
                      baseline=args.baseline, stages=stages_until(args.until))
    if "stopped_after" in sweep:
        print(f"stopped every point after stage {sweep['stopped_after']} in {time.perf_counter() - t0:.1f}s: {out}",
              flush=True)
        return 0
    n = len(sweep["points"])
    print(f"done in {time.perf_counter() - t0:.1f}s: {n - sweep['failed']}/{n} points finished: {out / 'sweep.md'}",
          flush=True)
    if sweep["failed"]:
        print(f"pipeline: error: {sweep['failed']} of {n} sweep points failed (see {out / 'sweep.md'})",
              file=sys.stderr)
        return 1
    return 0


def stages_until(until: str | None) -> list:
    """Every stage, or those up to ``until`` (a one-line UserError for an unknown name)."""
    from ..core.errors import UserError
    from ..stages import STAGES

    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise UserError(f"--until {until}: expected one of {', '.join(names)}")
    return STAGES[:names.index(until) + 1] if until else STAGES


def _baseline(args) -> int:
    from .baseline import run_baseline

    t0 = time.perf_counter()
    run_dir = Path(args.run)
    report = run_baseline(run_dir, args.set, log=lambda m: print(m, flush=True), reuse_stale=args.reuse_stale,
                          stages=stages_until(args.until))
    if args.until:
        print(f"stopped the baseline after stage {args.until} in {time.perf_counter() - t0:.1f}s", flush=True)
        return 0
    print(f"done in {time.perf_counter() - t0:.1f}s: {run_dir / 'report.md'} (thin from scratch beside pruned)",
          flush=True)
    _warn_failed_devices(report)
    return 0


def _eval(args) -> int:
    """``pipeline eval --run DIR``: the run's recorded config (+ eval.*/paper.* overrides); every stage before
    eval must be finished and up to date, so nothing is retrained."""
    from ..config import load_config
    from ..core.errors import UserError
    from ..report import write_report
    from ..run.manifest import load_manifest
    from ..run.runner import run_pipeline, stale_stages
    from ..stages import STAGES

    run_dir = Path(args.run)
    manifest = load_manifest(run_dir) if run_dir.is_dir() else {}
    if not manifest.get("config"):
        raise UserError(f"--run {run_dir}: no finished run here (no manifest.json with a config); "
                        "run 'pipeline run --config ...' first")
    for text in args.set:
        if not text.split("=", 1)[0].strip().startswith(("eval.", "paper.")):
            raise UserError(f"--set {text}: pipeline eval only changes eval.* and paper.* settings "
                            "(anything else would retrain; use 'pipeline run')")
    cfg = load_config(None, args.set, data=manifest["config"], source=f"{run_dir / 'manifest.json'} config")
    upstream = [s for s in STAGES if s.name not in ("eval", "transfer", "qeval", "bench")]
    stale = stale_stages(cfg, run_dir, upstream, reuse_stale=args.reuse_stale)
    if stale:
        raise UserError(f"--run {run_dir}: stage(s) {', '.join(stale)} not finished or out of date with this "
                        "code; finish the run with 'pipeline run' first, or accept code changes with --reuse-stale "
                        "(pipeline eval never retrains)")
    t0 = time.perf_counter()
    manifest = run_pipeline(cfg, run_dir, STAGES, log=lambda m: print(m, flush=True), reuse_stale=args.reuse_stale)
    report = write_report(run_dir, manifest)
    print(f"done in {time.perf_counter() - t0:.1f}s: {run_dir / 'report.md'}", flush=True)
    _warn_failed_devices(report)
    return 0


def _torchrun(nproc: int, argv: list[str] | None) -> int:
    """``pipeline run --nproc N ...``: the same command under torchrun on this machine."""
    import os
    import subprocess

    from ..core.errors import UserError

    if nproc < 1:
        raise UserError(f"--nproc {nproc}: expected a number of processes >= 1")
    if os.environ.get("WORLD_SIZE"):
        raise UserError("--nproc: already running under torchrun; drop --nproc")
    args = list(sys.argv[1:] if argv is None else argv)
    rest, skip = [], False
    for a in args:   # drop --nproc N / --nproc=N, keep everything else as given
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.cli", *rest]
    print("running: " + " ".join(cmd[1:]), flush=True)
    from ..train.distributed import die_with_parent

    launcher = os.getpid()
    return subprocess.run(cmd, preexec_fn=lambda: die_with_parent(parent_pid=launcher)).returncode


def _warn_failed_devices(report: dict) -> None:
    """The run is complete but these devices' rows are missing (report.md "Devices"); the next run retries them."""
    for name, d in report.get("devices", {}).items():
        if "error" in d:
            print(f"warning: device {name} gave no results (the next run retries it): {d['error']}",
                  file=sys.stderr, flush=True)
