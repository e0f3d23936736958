"""The manifest runner with fast fake stages: skip / rerun logic, failure handling, manifest contents."""
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.run.manifest import MANIFEST
from pipeline.run.runner import LOCK, RunDirBusy, run_pipeline
from pipeline.run.stage import Stage, StageResult


class Boom(RuntimeError):
    pass


class Toy:
    """Three stages: a (section seed) -> b (section prune, reads a) -> c (section bench, reads b)."""

    def __init__(self):
        self.calls = Counter()
        self.fail = set()

    def _a(self, ctx):
        self.calls["a"] += 1
        p = ctx.out_dir / "a.txt"
        p.write_text(f"a seed={ctx.cfg.seed}\n")
        (ctx.out_dir / "sub").mkdir()
        (ctx.out_dir / "sub" / "extra.txt").write_text("extra\n")
        return StageResult({"a": p, "extra": ctx.out_dir / "sub" / "extra.txt"}, {"n": 1})

    def _b(self, ctx):
        self.calls["b"] += 1
        upstream = ctx.inputs["a"]["a"].read_text()
        assert ctx.metrics_of["a"] == {"n": 1}
        if "b" in self.fail:
            (ctx.out_dir / "partial.txt").write_text("half-written\n")
            raise Boom("stage b failed")
        p = ctx.out_dir / "b.txt"
        p.write_text(upstream + f"b lambda1={ctx.cfg.prune.methods['rgsm'].lambda1}\n")
        return StageResult({"b": p}, {"lambda1": ctx.cfg.prune.methods["rgsm"].lambda1})

    def _c(self, ctx):
        self.calls["c"] += 1
        p = ctx.out_dir / "c.txt"
        p.write_text(ctx.inputs["b"]["b"].read_text() + f"c runs={ctx.cfg.bench.runs}\n")
        return StageResult({"c": p})

    @property
    def stages(self):
        return [Stage("a", ("seed",), (), self._a),
                Stage("b", ("prune",), ("a",), self._b),
                Stage("c", ("bench",), ("b",), self._c)]

    def run(self, run_dir, overrides=()):
        logs = []
        before = Counter(self.calls)
        manifest = run_pipeline(load_config(None, list(overrides)), run_dir, self.stages, log=logs.append)
        ran = {k for k in "abc" if self.calls[k] > before[k]}
        return manifest, ran, logs


@pytest.fixture
def toy():
    return Toy()


def read_manifest(run_dir):
    return json.loads((run_dir / MANIFEST).read_text())


def test_first_run_runs_all_then_rerun_skips_all(toy, tmp_path):
    manifest, ran, logs = toy.run(tmp_path)
    assert ran == {"a", "b", "c"}
    assert (tmp_path / "c" / "c.txt").read_text() == "a seed=0\nb lambda1=0.05\nc runs=300\n"
    assert all(manifest["stages"][s]["status"] == "done" for s in "abc")
    # what is returned is what was written (tuples become JSON lists)
    assert read_manifest(tmp_path)["stages"] == json.loads(json.dumps(manifest["stages"], default=str))
    # no temporary folders left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "a", "b", "c", MANIFEST]

    manifest2, ran, logs = toy.run(tmp_path)
    assert ran == set()
    assert [line.split(":")[0] for line in logs] == ["[a] skipped", "[b] skipped", "[c] skipped"]
    assert toy.calls == Counter(a=1, b=1, c=1)


def test_config_change_reruns_from_the_stage_that_uses_it(toy, tmp_path):
    toy.run(tmp_path)
    _, ran, logs = toy.run(tmp_path, ["prune.rgsm.lambda1=0.5"])
    assert ran == {"b", "c"}
    assert "[a] skipped" in logs[0] and "[b] running" in logs
    assert (tmp_path / "c" / "c.txt").read_text() == "a seed=0\nb lambda1=0.5\nc runs=300\n"
    # a section only the last stage uses
    _, ran, _ = toy.run(tmp_path, ["prune.rgsm.lambda1=0.5", "bench.runs=7"])
    assert ran == {"c"}
    # a section nobody uses changes nothing
    _, ran, _ = toy.run(tmp_path, ["prune.rgsm.lambda1=0.5", "bench.runs=7", "export.opset=19"])
    assert ran == set()
    # the first stage's section reruns everything
    _, ran, _ = toy.run(tmp_path, ["prune.rgsm.lambda1=0.5", "bench.runs=7", "seed=3"])
    assert ran == {"a", "b", "c"}
    # ... and going back to an earlier config is a change too (no stale skip)
    _, ran, _ = toy.run(tmp_path)
    assert ran == {"a", "b", "c"}
    assert (tmp_path / "c" / "c.txt").read_text() == "a seed=0\nb lambda1=0.05\nc runs=300\n"


@pytest.mark.parametrize("damage", ["delete", "modify", "delete_nested"])
def test_damaged_output_reruns_from_its_stage(toy, tmp_path, damage):
    toy.run(tmp_path)
    if damage == "delete":
        (tmp_path / "a" / "a.txt").unlink()
    elif damage == "modify":
        (tmp_path / "a" / "a.txt").write_text("tampered\n")
    else:
        (tmp_path / "a" / "sub" / "extra.txt").unlink()
    _, ran, _ = toy.run(tmp_path)
    # a reruns; it reproduces its outputs and metrics exactly, so b and c (made from them) keep their results
    assert ran == {"a"}
    assert (tmp_path / "a" / "a.txt").read_text() == "a seed=0\n"


def test_damaged_downstream_output_reruns_only_downstream(toy, tmp_path):
    toy.run(tmp_path)
    (tmp_path / "b" / "b.txt").write_text("tampered\n")
    _, ran, _ = toy.run(tmp_path)
    assert ran == {"b"}                           # b's rerun reproduces what c was made from


def test_a_rerun_with_other_metrics_reruns_its_readers(toy, tmp_path):
    toy.run(tmp_path)
    (tmp_path / "a" / "a.txt").write_text("tampered\n")
    real = toy._a   # same outputs, other metrics: b reads a's metrics, so it must rerun

    def a_with_other_metrics(ctx):
        result = real(ctx)
        result.metrics["note"] = "other"
        return result
    toy._a = a_with_other_metrics
    try:
        toy.run(tmp_path)
    except AssertionError:   # the toy's b insists on a's old metrics: it ran, which is the point
        pass
    assert toy.calls["b"] == 2


def test_failing_stage_keeps_previous_outputs(toy, tmp_path):
    toy.run(tmp_path)
    old_b = (tmp_path / "b" / "b.txt").read_text()
    old_entry = read_manifest(tmp_path)["stages"]["b"]

    toy.fail.add("b")
    with pytest.raises(Boom):
        toy.run(tmp_path, ["prune.rgsm.lambda1=0.7"])
    # the previous outputs of b are intact, its half-written new folder is gone
    assert (tmp_path / "b" / "b.txt").read_text() == old_b
    assert not (tmp_path / "b" / "partial.txt").exists()
    assert not (tmp_path / ".b.tmp").exists()
    manifest = read_manifest(tmp_path)   # valid JSON after the failure
    # the good entry is kept whole; the failure is recorded beside it
    assert {k: v for k, v in manifest["stages"]["b"].items() if k != "last_failure"} == old_entry
    assert "Boom: stage b failed" in manifest["stages"]["b"]["last_failure"]["error"]
    assert manifest["stages"]["a"]["status"] == "done"
    assert manifest["stages"]["c"]["status"] == "done"       # c was never reached
    assert toy.calls["c"] == 1

    # the same failing config fails again: a failed stage is never skipped
    with pytest.raises(Boom):
        toy.run(tmp_path, ["prune.rgsm.lambda1=0.7"])
    assert toy.calls["b"] == 3

    # fixed: b and everything after it run; a is still up to date
    toy.fail.clear()
    _, ran, _ = toy.run(tmp_path, ["prune.rgsm.lambda1=0.7"])
    assert ran == {"b", "c"}
    assert read_manifest(tmp_path)["stages"]["b"]["status"] == "done"
    assert "last_failure" not in read_manifest(tmp_path)["stages"]["b"]
    assert "lambda1=0.7" in (tmp_path / "c" / "c.txt").read_text()


def test_failure_under_changed_config_then_original_config_retrains_nothing(toy, tmp_path):
    toy.run(tmp_path)
    toy.fail.add("b")
    with pytest.raises(Boom):
        toy.run(tmp_path, ["prune.rgsm.lambda1=0.7"])
    toy.fail.clear()
    _, ran, logs = toy.run(tmp_path)          # back to the config that produced the finished stages
    assert ran == set(), logs
    assert (tmp_path / "c" / "c.txt").read_text() == "a seed=0\nb lambda1=0.05\nc runs=300\n"


def test_failure_on_first_run(toy, tmp_path):
    toy.fail.add("b")
    with pytest.raises(Boom):
        toy.run(tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["stages"]["a"]["status"] == "done"
    assert manifest["stages"]["b"]["status"] == "failed" and "last_failure" in manifest["stages"]["b"]
    assert "c" not in manifest["stages"]
    assert not (tmp_path / "b").exists()


def test_manifest_contents(toy, tmp_path):
    manifest, _, _ = toy.run(tmp_path, ["prune.rgsm.lambda1=0.25"])
    on_disk = read_manifest(tmp_path)
    for key in ("config", "versions", "git_commit"):
        assert key in on_disk
    assert on_disk["config"]["prune"]["rgsm"]["lambda1"] == 0.25
    assert on_disk["config"]["train"]["attack"]["kind"] == "pgd"
    assert on_disk["versions"]["torch"] and on_disk["versions"]["python"]
    assert on_disk["git_commit"] is None or isinstance(on_disk["git_commit"], str)
    b = on_disk["stages"]["b"]
    assert b["config"] == {"prune": on_disk["config"]["prune"]}
    assert b["inputs"] == ["a"] and b["metrics"] == {"lambda1": 0.25}
    assert b["outputs"]["b"]["path"] == "b/b.txt" and len(b["outputs"]["b"]["sha256"]) == 64
    assert on_disk["stages"]["a"]["outputs"]["extra"]["path"] == "a/sub/extra.txt"
    import hashlib
    assert b["outputs"]["b"]["sha256"] == hashlib.sha256((tmp_path / "b" / "b.txt").read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", [b"{not json", b"\x00\xff\x10binary", b"[1, 2, 3]", b'{"stages": []}',
                                    b'{"stages": {"a": {"status": "done", "outputs": {"a": "a/a.txt"}}}}'])
def test_damaged_or_foreign_manifest_refuses_in_one_line(toy, tmp_path, damage):
    from pipeline.core.errors import ManifestError

    toy.run(tmp_path)
    (tmp_path / MANIFEST).write_bytes(damage)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ManifestError) as e:
        toy.run(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / MANIFEST) in msg and "move it aside" in msg
    assert toy.calls == Counter(a=1, b=1, c=1)                  # nothing reran
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- code fingerprints

TOY_STAGE = '''from pathlib import Path
from pipeline.run.stage import StageResult
{imports}

def run(ctx):
    p = Path(ctx.out_dir) / "{name}.txt"
    p.write_text("{name}{extra}")
    return StageResult({{"{name}": p}})
'''


@pytest.fixture
def code_toy(tmp_path, monkeypatch):
    """Stages a -> b -> c whose code lives in files under tmp_path: b imports helper.py."""
    from pipeline.run.fingerprint import code_fingerprint

    import uuid
    package = f"toycode_{uuid.uuid4().hex}"   # unique: sys.modules would hand back another test's package
    pkg = tmp_path / "src" / package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("SCALE = 1\n")
    for name, imports, extra in (("a", "", ""), ("b", "from . import helper", '{helper.SCALE}'), ("c", "", "")):
        (pkg / f"{name}.py").write_text(TOY_STAGE.format(name=name, imports=imports, extra=extra))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    import importlib
    mods = {n: importlib.import_module(f"{package}.{n}") for n in "abc"}
    stages = [Stage("a", ("seed",), (), mods["a"].run), Stage("b", ("prune",), ("a",), mods["b"].run),
              Stage("c", ("bench",), ("b",), mods["c"].run)]
    run_dir = tmp_path / "run"

    def run(reuse_stale=False):
        code_fingerprint.cache_clear()   # a new process would read the sources afresh
        logs = []
        manifest = run_pipeline(load_config(None), run_dir, stages, log=logs.append, reuse_stale=reuse_stale)
        run.logs = logs
        return manifest, {line[1] for line in logs if line.endswith("] running")}

    yield pkg, run
    code_fingerprint.cache_clear()


def test_changed_stage_code_reruns_that_stage_and_later_only(code_toy):
    pkg, run = code_toy
    first, ran = run()
    assert ran == {"a", "b", "c"}
    assert run()[1] == set()
    # b's result depends on helper.py through an import: b reruns, a is kept; b's output comes out the same
    # (its text does not depend on the helper), so c keeps its result
    (pkg / "helper.py").write_text("SCALE = 2\n")
    manifest, ran = run()
    assert ran == {"b"}
    assert manifest["stages"]["a"]["key"] == first["stages"]["a"]["key"]
    assert manifest["stages"]["b"]["code"] != first["stages"]["b"]["code"]
    # only the last stage's own module
    (pkg / "c.py").write_text((pkg / "c.py").read_text() + "# changed\n")
    assert run()[1] == {"c"}


def test_every_recomputation_of_a_finished_stage_says_why(code_toy, tmp_path):
    pkg, run = code_toy
    run()
    (pkg / "helper.py").write_text("SCALE = 3\n")
    run()
    reasons = [line for line in run.logs if "recomputed because" in line]
    assert reasons == [f"[b] recomputed because its code changed: {pkg.name}.helper (--reuse-stale keeps the old "
                       "result)"], run.logs
    (tmp_path / "run" / "a" / "a.txt").write_text("tampered\n")
    run()
    assert f"[a] recomputed because its output {tmp_path / 'run' / 'a' / 'a.txt'} changed or is damaged (sha256 " \
           "differs from the manifest)" in run.logs
    (tmp_path / "run" / "c" / "c.txt").unlink()
    run()
    assert f"[c] recomputed because its output {tmp_path / 'run' / 'c' / 'c.txt'} is missing" in run.logs


def test_a_settings_change_and_an_input_change_are_named(toy, tmp_path):
    toy.run(tmp_path)
    _, _, logs = toy.run(tmp_path, ["prune.rgsm.lambda1=0.5", "seed=0"])
    assert "[b] recomputed because its settings changed: prune.rgsm.lambda1" in logs
    assert "[c] recomputed because its input stage b was recomputed with other results" in logs
    assert not any(line.startswith("[a] recomputed") for line in logs)
    # a stage that never finished runs without a reason line
    _, _, logs = toy.run(tmp_path / "fresh")
    assert not any("recomputed" in line for line in logs)


def test_reuse_stale_keeps_stages_and_records_it(code_toy):
    pkg, run = code_toy
    run()
    (pkg / "a.py").write_text((pkg / "a.py").read_text() + "# changed\n")
    manifest, ran = run(reuse_stale=True)
    assert ran == set()
    stale = manifest["stages"]["a"]["stale_code"]
    assert stale["built_with"] != stale["current"] and "stale_code" not in manifest["stages"]["b"]
    assert read_manifest(code_toy[0].parent.parent / "run")["stages"]["a"]["stale_code"] == stale
    # without the flag the changed code reruns a; its outputs come out the same, so b and c keep theirs
    assert run()[1] == {"a"}


def test_stage_code_closure_follows_imports_not_package_inits():
    from pipeline.run.fingerprint import closure
    from pipeline.stages import prune as prune_stage, surgery as surgery_stage, train as train_stage

    # a stage's code: its module and the implementations its catalog tables name (prune: the sparsifiers)
    prune, train, surgery = (set(closure(*s.STAGE.code_modules)) for s in (prune_stage, train_stage, surgery_stage))
    assert {"pipeline.algorithms.rgsm", "pipeline.algorithms.groups", "pipeline.train.loop"} <= set(prune)
    assert "pipeline.algorithms.rgsm" not in train and "pipeline.stages.prune" not in train
    assert "pipeline.algorithms.surgery" in surgery and "pipeline.algorithms.rgsm" not in surgery
    assert "pipeline.stages" not in prune   # the package __init__ gathers every stage: not a dependency


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    from pipeline.core.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
        assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "y.json", "{}")
        assert (tmp_path / "y.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_second_run_on_the_same_folder_refuses_in_one_line(toy, tmp_path, capsys):
    import fcntl

    from pipeline import cli

    toy.run(tmp_path)
    with open(tmp_path / LOCK, "a") as held:        # another process's run, as far as flock is concerned
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirBusy, match="another 'pipeline run'"):
            toy.run(tmp_path)
        before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        smoke = Path(__file__).resolve().parent.parent / "configs" / "smoke.toml"
        assert cli.main(["run", "--config", str(smoke), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "another 'pipeline run'" in err and str(tmp_path) in err
        assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert toy.run(tmp_path)[1] == set()             # released: runs (and skips) as usual


def test_reuse_stale_accepts_entries_from_before_code_fingerprints(code_toy):
    """A run folder from older versions: keys without a code part, no config_key/code fields."""
    pkg, run = code_toy
    manifest, _ = run()
    run_dir = pkg.parent.parent / "run"
    on_disk = read_manifest(run_dir)
    for entry in on_disk["stages"].values():
        entry["key"] = entry.pop("config_key")     # what the old runner wrote as the key
        del entry["code"]
    (run_dir / MANIFEST).write_text(json.dumps(on_disk))
    assert run(reuse_stale=True)[1] == set()
    assert run()[1] == {"a", "b", "c"}           # without the flag, unknown code means rerun


def test_keys_added_later_at_their_old_value_leave_stage_keys_as_before(toy, monkeypatch):
    """A run recorded before data.dataset, data.image_size, model.kwargs and prune.budget_every existed keeps its
    stage keys: at those values the keys are left out; any other value changes the key."""
    from pipeline.run import runner

    stage = Stage("b", ("data", "model", "prune"), (), toy._b)
    cfg = load_config(None)
    now = runner.stage_key(stage, cfg, {"stages": {}})
    real = runner.to_dict

    def before_the_keys_existed(obj):
        d = real(obj)
        for section, key in runner.ADDED_LATER:
            *parents, leaf = key.split(".")
            table = d[section]
            for parent in parents:
                table = table[parent]
            table.pop(leaf, None)
        return d

    monkeypatch.setattr(runner, "to_dict", before_the_keys_existed)
    assert runner.stage_key(stage, cfg, {"stages": {}}) == now
    monkeypatch.undo()
    for changed in ("prune.budget_every=5", "prune.admm.bits=4"):
        assert runner.stage_key(stage, load_config(None, [changed]), {"stages": {}}) != now
