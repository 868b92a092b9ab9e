"""One exception family, so callers (and the CLI) can tell a user mistake from a bug.

Every error says what is wrong and how to fix it; it is raised before any work starts."""


class DPDiffError(Exception):
    """Base class of dpdiff's user-facing errors."""


class ConfigError(DPDiffError, ValueError):
    """An option or combination of options is invalid."""


class DataError(DPDiffError, ValueError):
    """The input data cannot be used as given."""


class PrivacyError(DPDiffError, ValueError):
    """A request that would break or misstate the privacy guarantee."""


class IntegrityError(DPDiffError, RuntimeError):
    """A file on disk is corrupt, truncated or not what it claims to be."""
