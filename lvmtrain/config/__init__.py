from lvmtrain.config.loader import load_config, save_config
from lvmtrain.config.schema import Config, ConfigError

__all__ = ["Config", "ConfigError", "load_config", "save_config"]
