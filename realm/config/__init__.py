"""Typed configuration: one dataclass per concern (``sections.py``: the shared parts;
``openqa.py``: the Open-QA stage; ``stages.py``: the other stages and the whole :class:`Config`),
YAML files and dotted ``key=value`` overrides (``load.py``). ``python -m realm.config``
regenerates docs/configuration.md."""

from realm.config.fields import DEFAULT_ENCODER, NUMERIC_LABELS
from realm.config.load import (config_reference, load_config, override, parse_override,
                               reference_markdown, save_config, write_reference)
from realm.config.sections import (DataConfig, ICTConfig, IndexConfig, MLMConfig, RefreshConfig,
                                   RetrieverConfig, SpansConfig, TrainConfig)
from realm.config.openqa import OpenQAConfig
from realm.config.stages import (Config, LoggingConfig, PretrainConfig,
                                 RetrieverTrainingConfig)

__all__ = [
    "DEFAULT_ENCODER", "NUMERIC_LABELS", "Config", "DataConfig", "ICTConfig", "IndexConfig",
    "LoggingConfig", "MLMConfig", "OpenQAConfig", "PretrainConfig", "RefreshConfig",
    "RetrieverConfig", "RetrieverTrainingConfig", "SpansConfig", "TrainConfig",
    "config_reference", "load_config", "override", "parse_override", "reference_markdown",
    "save_config", "write_reference",
]
