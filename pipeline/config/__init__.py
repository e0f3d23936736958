"""Run configuration: frozen dataclasses (``sections.py``, one per TOML section, each checking its own values)
loaded from TOML with ``--set section.key=value`` overrides (``load.py``). Unknown keys are errors; every mistake
is one line naming the source, the key, what was expected and what was found."""
from .load import ConfigError, flatten, load_config, parse_override, show_lines, to_dict, toml_value
from .sections import (AttackConfig, BenchConfig, DataConfig, DeviceConfig, EvalConfig, ExportConfig, FinetuneConfig,
                       MobileConfig, ModelConfig,
                       PaperConfig, PruneConfig, QuantizeConfig, RunConfig, Sections, SurgeryConfig, TrainConfig)

__all__ = ["ConfigError", "flatten", "load_config", "parse_override", "show_lines", "to_dict", "toml_value",
           "AttackConfig", "BenchConfig", "DataConfig", "DeviceConfig", "EvalConfig", "ExportConfig", "FinetuneConfig",
           "MobileConfig", "ModelConfig",
           "PaperConfig", "PruneConfig", "QuantizeConfig", "RunConfig", "Sections", "SurgeryConfig", "TrainConfig"]
