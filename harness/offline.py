"""Nothing downloads at run time: bitsandbytes' hub kernel is not fetched.

On a CPU with AVX512-BF16, importing bitsandbytes (0.50) asks the `kernels` package for
"kernels-community/quantization-bitsandbytes" from the Hugging Face hub, and logs "Failed to
load CPU gemm_4bit_forward from kernels-community ... trust_remote_code" when it cannot. The
harness installs, at import, a finder that refuses `import kernels` from that one module (its
own fallback, bitsandbytes' CPU kernels, then runs) and drops that one log line. Every other
import of `kernels` and every other bitsandbytes message is left alone.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys

BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _NoHubKernelFromBitsandbytes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "kernels" and _imported_by(BNB_CPU_OPS):
            raise ImportError("the harness does not fetch bitsandbytes' hub kernel: nothing downloads at run time")
        return None


def _imported_by(module: str) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == module:
            return True
        frame = frame.f_back
    return False


def _not_the_hub_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(HUB_KERNEL_WARNING)


def install() -> None:
    if not any(isinstance(finder, _NoHubKernelFromBitsandbytes) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoHubKernelFromBitsandbytes())
        logging.getLogger(BNB_CPU_OPS).addFilter(_not_the_hub_kernel_warning)
