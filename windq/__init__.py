"""windq: fit a language model into a fixed number of bits, shipped as a GGUF that stock llama.cpp runs."""

__version__ = "0.1.0"

import logging as _logging

# Library code never prints: without an application handler, windq's log records go nowhere.
_logging.getLogger("windq").addHandler(_logging.NullHandler())
