"""Configuration: every environment variable of the contract, parsed and checked, every problem at once.

Three modules, one way: ``values`` (parsers and the rules of a single value), ``settings`` (the model and the
rules across variables, problems as typed values), ``loading`` (environment and ``.env`` file to settings,
one path for ``run`` and ``check``). Configuration flows from here to the wiring, never back.
"""

from consumer.audit import display_url
from consumer.config.loading import (
    Loaded,
    did_you_mean,
    load,
    load_settings,
    load_settings_with_problems,
    unknown_variables,
)
from consumer.config.settings import SETTING_VARIABLES, Problem, Settings
from consumer.config.values import (
    KNOWN_REGIONS,
    SECRET_VARIABLES,
    ConfigError,
    DeadLetterTarget,
    ListenAddress,
    SourceSpec,
    StateLocation,
    commercetools_region,
    parse_dead_letter_url,
    parse_listen_address,
    parse_source,
    parse_state_url,
)

__all__ = [
    "KNOWN_REGIONS",
    "SECRET_VARIABLES",
    "SETTING_VARIABLES",
    "ConfigError",
    "DeadLetterTarget",
    "ListenAddress",
    "Loaded",
    "Problem",
    "Settings",
    "SourceSpec",
    "StateLocation",
    "commercetools_region",
    "did_you_mean",
    "display_url",
    "load",
    "load_settings",
    "load_settings_with_problems",
    "parse_dead_letter_url",
    "parse_listen_address",
    "parse_source",
    "parse_state_url",
    "unknown_variables",
]
