"""Methods register themselves on import (see anomap.registry)."""

from anomap.methods import gtrans, isstad, ssl_ae  # noqa: F401
