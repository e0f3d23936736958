"""What a stage is: a name, the config sections and upstream stages its result depends on, and a ``run``
function from a ``StageContext`` to a ``StageResult``. Types only -- stages import this, never the runner, so
that editing the runner reruns nothing."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class StageContext:
    cfg: object                            # the RunConfig (read as values: the stage key hashes them)
    run_dir: Path
    out_dir: Path                          # the stage's own (temporary) folder: write only here
    inputs: dict[str, dict[str, Path]]     # upstream stage -> output name -> path
    metrics_of: dict[str, dict]            # upstream stage -> its recorded metrics
    log: Callable[[str], None] = print
    # where a long stage keeps its mid-stage checkpoint (pipeline/train/resume.py); tagged with the stage key
    resume_dir: Path | None = None


@dataclass
class StageResult:
    outputs: dict[str, Path]
    metrics: dict = field(default_factory=dict)
    # finished, but not everything it was asked for (e.g. an unreachable bench device): the results are kept and
    # reported, and the next run retries the stage instead of skipping it
    incomplete: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]   # config sections (or top-level keys) that the stage's result depends on
    inputs: tuple[str, ...]     # upstream stages whose outputs it reads
    run: Callable[[StageContext], StageResult]
    # catalog tables (pipeline/catalog) whose implementations the stage loads by name: its code fingerprint
    # covers every module they name, as if the stage imported them
    tables: tuple = ()

    @property
    def code_modules(self) -> tuple[str, ...]:
        """The modules whose import closure is the stage's code: its own, and its tables' implementations."""
        return (self.run.__module__, *(m for t in self.tables for m in t.modules()))
