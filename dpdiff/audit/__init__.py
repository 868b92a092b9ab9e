"""The empirical privacy audit (`dpdiff audit`): an application of the DP engine, like `mepf/` or
`sampling/`. It trains runs and scores canaries (`canaries.py`); the statistics that turn guesses into a
lower bound on epsilon are mechanism-level and live in `dpdiff.privacy.audit_bounds`."""

from dpdiff.audit.canaries import *  # noqa: F401,F403
from dpdiff.audit.canaries import __all__  # noqa: F401
