"""The error users see for a bad config: one line saying what is wrong and how to fix it."""


class ConfigError(ValueError):
    """A config value that cannot work (unknown name, impossible size, ...)."""
