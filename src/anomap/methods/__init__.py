"""Methods register themselves on import (see anomap.registry)."""

from anomap.methods import isstad, ssl_ae  # noqa: F401
