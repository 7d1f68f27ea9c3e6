"""The base config (every field, with defaults) lives in the library,
`jaxcompress.config`; experiment configs here import it from this module.

Run: python -m launch.main --config=configs/default.py --workdir=/tmp/run
"""
from jaxcompress.config import get_config  # noqa: F401
