"""Property-style: every key ``pipeline show-config`` prints, given random values -- in and out of its range, of
the wrong type, as a table merged into its section -- either loads (exit 0) or is refused with one line naming
the key (exit 2); never an internal error (exit 1) or a traceback. Seeded, so a failure reproduces."""
import json
import random
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import flatten, load_config, toml_value

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.toml")
KEYS = flatten(load_config(SMOKE))


def candidates(value, rng: random.Random) -> list:
    """TOML texts for one key: its own type in and out of range, other types, odd shapes."""
    odd = ["true", '"x"', '""', "[]", "{}", "[[1]]", "nan", "-inf", '"~nosuchuser/x"', "{a = 1}"]
    if isinstance(value, bool):
        own = ["true", "false"]
    elif isinstance(value, int):
        own = ["0", "1", "-1", str(2**31), str(10**30), str(rng.randint(-10**6, 10**6)), "1.5"]
    elif isinstance(value, float):
        own = ["0.0", "-1.0", "1e-30", "1e30", "0.5", repr(rng.uniform(-10, 10)), repr(10 ** rng.uniform(-20, 20)), "3"]
    elif isinstance(value, str):
        own = ['"auto"', '"none"', '"host"', '"cpu"', '"ssh://@h:0"', '"-x"', json.dumps(value + "x")]
    elif isinstance(value, tuple):
        own = ["[0]", "[1, 2]", "[-1]", '["x"]', "[1.5]", '["all"]', "[2, 1]", str(rng.randint(0, 9)),
               "[" + ", ".join(str(rng.randint(-3, 300)) for _ in range(rng.randint(1, 4))) + "]"]
    elif isinstance(value, dict):
        own = ['{"members.0.conv1" = [3, 8]}', '{x = []}', '{x = "y"}']
    else:   # None: an optional number (paper.*)
        own = ["1.0", "-5", '"x"']
    file_value = [] if value is None else [toml_value(value)]
    return file_value + own + rng.sample(odd, 4)


CASES = [(key, text) for i, (key, value) in enumerate(sorted(KEYS.items(), key=lambda kv: kv[0]))
         for text in candidates(value, random.Random(i))]


def _check(argv, key, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:      # argparse (never expected here)
        rc = e.code
    out = capsys.readouterr()
    assert rc in (0, 2), (argv, rc, out.err)
    if rc == 2:
        err = out.err.strip()
        assert err.count("\n") == 0 and err.startswith("pipeline: error: ") and "Traceback" not in err, (argv, err)
        section, _, leaf = key.rpartition(".")
        # the key itself, or (a value that is not a table where one is needed) the table that holds it
        assert key in err or leaf in err or (section and section in err), (argv, err)
    return rc


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_key_takes_any_value_or_names_itself(key, capsys):
    values = [text for k, text in CASES if k == key]
    codes = [_check(["show-config", "--config", SMOKE, "--set", f"{key}={text}"], key, capsys) for text in values]
    # the file's own value given back is taken (the harness does not just refuse everything)
    assert KEYS[key] is None or codes[0] == 0, (key, codes)


@pytest.mark.parametrize("section", sorted({k.split(".")[0] for k in KEYS if "." in k}))
def test_a_table_merges_into_its_section_or_names_the_key(section, capsys):
    rng = random.Random(section)
    keys = [k for k in KEYS if k.startswith(section + ".") and k.count(".") == 1]
    full = load_config(SMOKE)
    for key in rng.sample(keys, min(4, len(keys))):
        leaf = key.split(".")[1]
        for text in candidates(KEYS[key], rng)[:4]:
            rc = _check(["show-config", "--config", SMOKE, "--set", f"{section}={{{leaf} = {text}}}"], key, capsys)
            if rc == 0:
                # merged: every other key of the section keeps the file's value
                cfg = load_config(SMOKE, [f"{section}={{{leaf} = {text}}}"])
                for other in keys:
                    if other != key:
                        assert flatten(cfg)[other] == flatten(full)[other], (section, leaf, other)


def test_the_file_values_survive_a_table_override():
    cfg = load_config(SMOKE, ["train={epochs=1}"])
    base = load_config(SMOKE)
    assert cfg.train.epochs == 1
    assert cfg.train.batch_size == base.train.batch_size and cfg.train.attack == base.train.attack
    assert toml_value(cfg.train.lr_milestones) == toml_value(base.train.lr_milestones)


def test_grid_values_may_be_lists_and_tables():
    from pipeline.cli.sweep import parse_grid

    assert parse_grid(["bench.threads=[1,2],[1]"]) == [("bench.threads", [[1, 2], [1]])]
    assert parse_grid(['model.widths={a = [1, 2]},{}']) == [("model.widths", [{"a": [1, 2]}, {}])]
    assert parse_grid(['name="a,b",c']) == [("name", ["a,b", "c"])]
