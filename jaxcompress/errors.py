"""The error users see for a bad config: one line saying what is wrong and how to fix it."""


class ConfigError(ValueError):
    """A config value that cannot work (unknown name, impossible size, ...)."""


class NonFiniteError(ConfigError):
    """A loss, parameter, reward or agent loss became NaN or inf: the job stops at once,
    naming where (phase, epoch, step), and keeps its last good checkpoint. A
    `ConfigError` (exit 2, one line) because the usual cause is a setting: a learning rate
    too high, or bad input data."""
