"""Run directory + manifest: each stage runs into its own folder, is keyed by its config and inputs,
and is skipped on a rerun when its key and output hashes still match."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from ..config import RunConfig, to_dict
from ..core.errors import ManifestError, UserError
from ..core.files import atomic_write_text, sha256_file, sha256_json, write_json
from .fingerprint import code_digests, code_fingerprint
from .manifest import MANIFEST, load_manifest, now, outputs_valid, package_versions, git_commit
from .stage import Stage, StageContext

LOCK = ".lock"


class RunDirBusy(UserError, RuntimeError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Exclusive, non-blocking lock on ``run_dir/.lock`` for the whole run (released by the OS if we die)."""
    import fcntl

    with open(run_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(f"{run_dir}: another 'pipeline run' is using this folder (lock file {run_dir / LOCK}); "
                             "wait for it to finish or choose another --out") from None
        yield


# Settings that change how a stage runs but never what it produces: left out of every key, so changing them
# (or adding them to the config) reruns nothing.
RESULT_NEUTRAL = {("train", "checkpoint_every"), ("train", "cuda_graphs")}
# Keys added after runs existed, with the value that reproduces what those runs did: at that value a key is left
# out of the stage key, so adding it to the config does not make every finished run recompute.
ADDED_LATER = {("data", "dataset"): "cifar10", ("data", "image_size"): 0, ("model", "kwargs"): {},
               ("prune", "budget_every"): 1, ("prune", "admm.bits"): 0}


def _drop_added_later(config: dict) -> None:
    """Remove, in place, every ADDED_LATER key that is absent or at its old value (dotted keys are nested)."""
    for (section, key), old in ADDED_LATER.items():
        *parents, leaf = key.split(".")
        table = config.get(section)
        for parent in parents:
            table = table.get(parent) if isinstance(table, dict) else None
        if isinstance(table, dict) and table.get(leaf, old) == old:
            table.pop(leaf, None)


def stage_code(stage: Stage) -> str:
    """Fingerprint of the code behind the stage's result (pipeline/run/fingerprint.py)."""
    return code_fingerprint(*stage.code_modules)


def stage_key(stage: Stage, cfg: RunConfig, manifest: dict, *, code: bool = True) -> str:
    """Hash of what the stage's result depends on: its config sections, its inputs' hashes and (``code``) the
    fingerprint of its code."""
    cfg_dict = to_dict(cfg)
    for section, key in RESULT_NEUTRAL:
        cfg_dict[section].pop(key, None)
    _drop_added_later(cfg_dict)
    upstream = {name: {k: v["sha256"] for k, v in manifest["stages"][name]["outputs"].items()}
                for name in stage.inputs}
    parts = {"stage": stage.name, "config": {s: cfg_dict[s] for s in stage.sections}, "inputs": upstream}
    if code:
        parts["code"] = stage_code(stage)
    return sha256_json(parts)


def _config_key(entry: dict) -> str | None:
    """The entry's key without the code fingerprint. Entries written before fingerprints existed have no
    ``code`` field, and their ``key`` was computed exactly that way."""
    return entry.get("config_key") or (entry.get("key") if "code" not in entry else None)


def stale_stages(cfg: RunConfig, run_dir: Path, stages: list[Stage], *, reuse_stale: bool = False) -> list[str]:
    """Names of the stages (in order) that a run would recompute: not done, other key, or outputs changed
    (with ``reuse_stale``, a key that differs only by the code fingerprint counts as current)."""
    manifest = load_manifest(run_dir)
    stale = []
    for stage in stages:
        entry = manifest.get("stages", {}).get(stage.name, {})
        if set(stale).intersection(stage.inputs) or entry.get("status") != "done" or entry.get("incomplete"):
            stale.append(stage.name)   # (its key cannot even be computed while an input is unfinished)
            continue
        current = entry.get("key") == stage_key(stage, cfg, manifest) or (
            reuse_stale and _config_key(entry) == stage_key(stage, cfg, manifest, code=False))
        if not current or not outputs_valid(run_dir, entry):
            stale.append(stage.name)
    return stale


def _release_followers(stage: str, ctx: StageContext) -> None:
    """Under torchrun, rank 0 tells the other ranks to run ``stage`` with this context (pipeline/train/distributed.py)."""
    from ..train import distributed

    if distributed.active() is not None and stage in distributed.DISTRIBUTED_STAGES:
        distributed.broadcast({"stage": stage, "run_dir": str(ctx.run_dir),
                               "inputs": {n: {k: str(p) for k, p in d.items()} for n, d in ctx.inputs.items()},
                               "metrics_of": ctx.metrics_of,
                               "resume_dir": str(ctx.resume_dir) if ctx.resume_dir else None})


def follow_pipeline(cfg: RunConfig, stages: list[Stage], *, log=print) -> None:
    """Ranks > 0 under torchrun: run each distributed stage rank 0 announces, in lockstep with it, into a scratch
    folder that is thrown away; return when rank 0 is done (it broadcasts None)."""
    import tempfile

    from ..train import distributed

    by_name = {s.name: s for s in stages}
    while (msg := distributed.broadcast()) is not None:
        stage = by_name[msg["stage"]]
        with tempfile.TemporaryDirectory(prefix=f"pipeline-rank-{stage.name}-") as scratch:
            ctx = StageContext(cfg=cfg, run_dir=Path(msg["run_dir"]), out_dir=Path(scratch),
                               inputs={n: {k: Path(p) for k, p in d.items()} for n, d in msg["inputs"].items()},
                               metrics_of=msg["metrics_of"], log=lambda m: None,
                               resume_dir=Path(msg["resume_dir"]) if msg["resume_dir"] else None)
            stage.run(ctx)


class ForeignFolder(UserError, RuntimeError):
    """The run folder (or a stage folder in it) holds files the pipeline did not write."""


# What the pipeline itself leaves in a run folder before its manifest exists: the lock, and a first stage's
# temporary folder and mid-stage checkpoint (a run killed during its first stage).
_OWN_HIDDEN = (LOCK,)


def check_run_dir(run_dir: Path) -> None:
    """The pipeline writes only into a folder it created, an empty one, or one that holds its manifest: any other
    folder may be the user's, and its files must never be replaced."""
    if not run_dir.is_dir() or (run_dir / MANIFEST).exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in _OWN_HIDDEN
                     and not (p.name.startswith(".") and p.name.endswith((".tmp", ".resume"))))
    if foreign:
        raise ForeignFolder(f"{run_dir}: not empty and not a pipeline run folder (no {MANIFEST}; holds "
                            f"{_some(foreign)}); "
                            "the pipeline writes only into a new or empty folder or one of its own runs: choose "
                            "another --out")


def _check_stage_folders(run_dir: Path, manifest: dict, stages: list[Stage]) -> None:
    """A stage folder is replaced only when the manifest says the pipeline wrote it (a finished entry)."""
    for stage in stages:
        folder = run_dir / stage.name
        if folder.exists() and manifest.get("stages", {}).get(stage.name, {}).get("status") != "done":
            raise ForeignFolder(f"{folder}: exists but {run_dir / MANIFEST} records no finished '{stage.name}' "
                                "stage there, so the pipeline did not write it (or its record is gone); move it "
                                "aside, then rerun")


def run_pipeline(cfg: RunConfig, run_dir: Path, stages: list[Stage], *, log=print, after_stage=None,
                 reuse_stale: bool = False, donors: tuple[Path, ...] = ()) -> dict:
    """Run or skip each stage in order. A stage is skipped when its key and output hashes match its entry;
    with ``reuse_stale`` also when only its code fingerprint differs (recorded in the entry as ``stale_code``).
    A stage that would run is first looked up in the ``donors`` (other run folders, e.g. earlier points of a
    sweep): one that finished there with the same key is linked in instead of recomputed (``shared_from``).
    Refused before anything is written: a folder that is not the pipeline's (``check_run_dir``)."""
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir):
        check_run_dir(run_dir)
        return _run_locked(cfg, run_dir, stages, log=log, after_stage=after_stage, reuse_stale=reuse_stale,
                           donors=donors)


def rerun_reason(stage: Stage, cfg: RunConfig, run_dir: Path, entry: dict, reran: set[str]) -> str | None:
    """Why a finished stage is recomputed, in a few words (None when it has never finished)."""
    if entry.get("status") != "done":
        failure = entry.get("last_failure", {}).get("error")
        return f"the last attempt failed ({failure.splitlines()[0][:120]})" if failure else None
    inputs = sorted(reran.intersection(stage.inputs))
    if inputs:
        return f"its input stage {', '.join(inputs)} was recomputed with other results"
    for out in entry.get("outputs", {}).values():
        path = run_dir / out["path"]
        if not path.is_file():
            return f"its output {path} is missing"
        if sha256_file(path) != out["sha256"]:
            return f"its output {path} changed or is damaged (sha256 differs from the manifest)"
    now_config = json.loads(json.dumps({s: to_dict(cfg)[s] for s in stage.sections}, default=str))   # as recorded
    before = json.loads(json.dumps(entry.get("config")))
    if isinstance(before, dict):   # a key added later, at the value that reproduces older runs, changed nothing
        for side in (now_config, before):
            _drop_added_later(side)
    if isinstance(before, dict) and before != now_config:
        now_flat, before_flat = _flat(now_config), _flat(before)
        changed = [k for k in now_flat.keys() | before_flat.keys()
                   if now_flat.get(k, "<unset>") != before_flat.get(k, "<unset>")]
        return f"its settings changed: {_some(sorted(changed, key=lambda k: (k.count('.'), k)))}"
    if entry.get("code") != stage_code(stage):
        before_modules = entry.get("code_modules")
        if not isinstance(before_modules, dict):
            return "its code changed (the modules were not recorded by the version that ran it)"
        now_modules = code_digests(*stage.code_modules)
        changed = sorted(m for m in now_modules.keys() | before_modules.keys()
                         if now_modules.get(m) != before_modules.get(m))
        return f"its code changed: {_some(changed)} (--reuse-stale keeps the old result)"
    return "its inputs changed"


def _some(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, and how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v, default=str, sort_keys=True)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links cost no space; artifacts are only ever replaced whole (atomic writes), never edited in place."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_in(run_dir: Path, name: str) -> Path:
    """Replace ``run_dir/name`` by the finished ``run_dir/.name.tmp`` in whole, so a crash never leaves a
    half-written stage folder behind."""
    final_dir, tmp_dir, old_dir = run_dir / name, run_dir / f".{name}.tmp", run_dir / f".{name}.old"
    shutil.rmtree(old_dir, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(old_dir)
    tmp_dir.rename(final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return final_dir


def _adopt(stage: Stage, key: str, run_dir: Path, manifest: dict, donors: tuple[Path, ...]) -> Path | None:
    for donor in donors:
        if Path(donor).resolve() == run_dir.resolve():
            continue
        try:
            entry = load_manifest(Path(donor)).get("stages", {}).get(stage.name, {})
        except ManifestError:
            continue
        if entry.get("status") != "done" or entry.get("key") != key or entry.get("incomplete") \
                or not outputs_valid(Path(donor), entry):
            continue
        tmp = run_dir / f".{stage.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(donor) / stage.name, tmp, copy_function=_link_or_copy)
        manifest["stages"][stage.name] = {**{k: v for k, v in entry.items() if k not in ("last_failure", "stale_code")},
                                          "shared_from": str(Path(donor).resolve()), "shared_at": now()}
        write_json(run_dir / MANIFEST, manifest)   # recorded before swapped in, as in _run_locked
        _swap_in(run_dir, stage.name)
        return Path(donor)
    return None


def _same_result(entry: dict, outputs: dict, metrics: dict) -> bool:
    """Did a rerun reproduce the finished entry exactly (every output's hash and the metrics)? Then the stages
    that read it have the same inputs as before and keep their results."""
    if entry.get("status") != "done":
        return False
    before = {k: v.get("sha256") for k, v in entry.get("outputs", {}).items()}
    return before == {k: v["sha256"] for k, v in outputs.items()} and \
        entry.get("metrics") == json.loads(json.dumps(metrics, default=str))


def _resume_dir(run_dir: Path, stage: str, key: str) -> Path:
    """``RUN/.<stage>.resume``, emptied unless it was written under this very key (config, inputs and code):
    a checkpoint of other settings or other code must never be continued."""
    folder = run_dir / f".{stage}.resume"
    tag = folder / "KEY"
    if folder.exists() and (not tag.is_file() or tag.read_text().strip() != key):
        shutil.rmtree(folder)
    if not tag.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tag, key + "\n")
    return folder


def _run_locked(cfg: RunConfig, run_dir: Path, stages: list[Stage], *, log, after_stage, reuse_stale: bool,
                donors: tuple[Path, ...] = ()) -> dict:
    manifest = load_manifest(run_dir)
    _check_stage_folders(run_dir, manifest, stages)
    manifest.setdefault("stages", {})
    manifest.update({"config": to_dict(cfg), "versions": package_versions(), "git_commit": git_commit(),
                     "command": sys.argv, "updated": now()})
    write_json(run_dir / MANIFEST, manifest)   # from now on the folder is recognisably a run folder
    reran: set[str] = set()
    for stage in stages:
        key = stage_key(stage, cfg, manifest)
        entry = manifest["stages"].get(stage.name, {})
        # an input recomputed with other outputs or metrics forces a rerun (metrics are no part of the key, but
        # a stage may read its inputs' metrics); one that came out exactly as before does not
        done = not reran.intersection(stage.inputs) and entry.get("status") == "done"
        if done and entry.get("incomplete"):
            log(f"[{stage.name}] retrying: the last run was incomplete ({entry['incomplete']})")
        elif done and entry.get("key") == key and outputs_valid(run_dir, entry):
            log(f"[{stage.name}] skipped: up to date (key {key[:12]})")
            continue
        if done and not entry.get("incomplete") and reuse_stale and _config_key(entry) == stage_key(stage, cfg, manifest, code=False) \
                and outputs_valid(run_dir, entry):
            entry["stale_code"] = {"built_with": entry.get("code"), "current": stage_code(stage), "reused": now()}
            write_json(run_dir / MANIFEST, manifest)
            log(f"[{stage.name}] skipped: built by other code, reused because of --reuse-stale")
            continue
        # a donor's result is only as good as its inputs: never share below a stage that reran here
        donor = None if reran.intersection(stage.inputs) else _adopt(stage, key, run_dir, manifest, donors)
        if donor is not None:
            log(f"[{stage.name}] shared: finished with the same key in {donor}")
            continue
        reason = None if entry.get("incomplete") else rerun_reason(stage, cfg, run_dir, entry, reran)
        log(f"[{stage.name}] running")
        if reason:
            log(f"[{stage.name}] recomputed because {reason}")
        tmp_dir = run_dir / f".{stage.name}.tmp"
        started, t0 = now(), time.perf_counter()
        try:   # from the temporary folder's creation on: an interruption (Ctrl-C, SIGTERM) leaves none behind
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
            ctx = StageContext(cfg=cfg, run_dir=run_dir, out_dir=tmp_dir,
                               inputs={n: {k: run_dir / v["path"] for k, v in manifest["stages"][n]["outputs"].items()}
                                       for n in stage.inputs},
                               metrics_of={n: manifest["stages"][n].get("metrics", {}) for n in stage.inputs},
                               log=lambda msg, _n=stage.name: log(f"[{_n}] {msg}"),
                               resume_dir=_resume_dir(run_dir, stage.name, key))
            _release_followers(stage.name, ctx)
            result = stage.run(ctx)
        except BaseException as e:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            failure = {"key": key, "failed_at": now(), "error": f"{type(e).__name__}: {e}"[:500]}
            # A good entry (and its untouched folder) survives a failed or interrupted rerun, so going back to
            # the config that produced it reuses it instead of recomputing it.
            good = entry if entry.get("status") == "done" else {"status": "failed", "key": key}
            manifest["stages"][stage.name] = {**good, "last_failure": failure}
            write_json(run_dir / MANIFEST, manifest)
            raise
        # Recorded first, then swapped in: an interruption in between leaves an entry whose files do not match
        # (the stage reruns, saying why), never a stage folder the manifest does not own.
        outputs = {}
        for name, path in result.outputs.items():
            rel = Path(path).relative_to(tmp_dir)
            outputs[name] = {"path": str(Path(stage.name) / rel), "sha256": sha256_file(tmp_dir / rel)}
        if not _same_result(entry, outputs, result.metrics):
            reran.add(stage.name)
        manifest["stages"][stage.name] = {
            "status": "done", "key": key, "config_key": stage_key(stage, cfg, manifest, code=False),
            "code": stage_code(stage), "code_modules": code_digests(*stage.code_modules),
            "config": {s: to_dict(cfg)[s] for s in stage.sections},
            "inputs": list(stage.inputs), "outputs": outputs, "metrics": result.metrics,
            "started": started, "finished": now(), "seconds": round(time.perf_counter() - t0, 3),
            **({"incomplete": result.incomplete} if result.incomplete else {})}
        write_json(run_dir / MANIFEST, manifest)
        _swap_in(run_dir, stage.name)
        shutil.rmtree(ctx.resume_dir, ignore_errors=True)   # finished: the mid-stage checkpoint is spent
        log(f"[{stage.name}] done in {time.perf_counter() - t0:.1f}s")
        if after_stage is not None:
            after_stage(stage.name, manifest)
    manifest["updated"] = now()
    write_json(run_dir / MANIFEST, manifest)
    return manifest
