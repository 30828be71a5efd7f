"""Configuration: the schema (``schema.py``), building and validating it from YAML and overrides
(``loading.py``), and finding config files by path or shipped name (``files.py``)."""

from centernet_ray.config.loading import config_from_dict, load_config, parse_override, read_yaml, with_overrides
from centernet_ray.config.schema import (LETTERBOX_PRESETS, ClusterConfig, Config, ConfigError, DataConfig,
                                         LossConfig, ModelConfig, ServeConfig, TargetConfig, TrackingConfig, TrainConfig, TuneConfig,
                                         check_batch_norm_batch, resolve_learning_rate)

__all__ = ["LETTERBOX_PRESETS", "ClusterConfig", "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "ServeConfig",
           "TargetConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "check_batch_norm_batch", "config_from_dict", "load_config",
           "parse_override", "read_yaml", "resolve_learning_rate", "with_overrides"]
