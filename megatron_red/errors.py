"""`ConfigError`: a setting that cannot work, named by its key or option; what the command line reports as
`error: ...` with exit code 2 (any other exception keeps its traceback)."""


class ConfigError(ValueError):
    """A config key or command-line option with a value outside its valid range, or settings that contradict each
    other; the message names the key (`rollout.n=0: must be >= 1`)."""
