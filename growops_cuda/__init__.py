"""C++/CUDA sources of growops' CUDA kernels; ``growops.ops.extension`` builds and registers them (JIT, cached).

Importing this package compiles nothing: it only says where the sources are.
"""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = [SOURCE_DIR / "wgrad.cu"]
