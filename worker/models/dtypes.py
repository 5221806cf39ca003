"""The dtype a model's weights and activations run in (CHATBATCH_DTYPE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The dtypes CHATBATCH_DTYPE may name besides `auto`.
DTYPES = ("float32", "bfloat16", "float16")


def cpu_capabilities() -> Mapping[str, Any]:
    """The instruction sets of this CPU as torch detects them at run time (torch's cpuinfo).

    `torch.cpu.get_capabilities()` where torch has it; older torch answers the two questions
    that matter here through its own helpers."""
    import torch

    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities()
    return {
        "amx_bf16": bool(torch.cpu._is_amx_tile_supported()),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
    }


def cpu_runs_bf16(capabilities: Mapping[str, Any]) -> bool:
    """Whether a CPU with these capabilities computes bf16 natively: AMX's bf16 tiles or
    AVX-512 bf16 dot products. Without them bf16 is emulated in fp32 and runs slower than fp32."""
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def choose(name: str, device: Any) -> Any:
    """The torch dtype that `name` (CHATBATCH_DTYPE) means on `device` (a torch.device).

    `auto`: bf16 on CUDA (fp16 on cards without bf16), bf16 on a CPU that runs it natively
    (`cpu_runs_bf16`, with oneDNN, which holds torch's bf16 matrix kernels), float32 elsewhere.

    Raises:
        ValueError: `name` is none of auto, float32, bfloat16, float16.
    """
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device.type == "cpu" and torch.backends.mkldnn.is_available() and cpu_runs_bf16(cpu_capabilities()):
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"CHATBATCH_DTYPE must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """`bfloat16` for torch.bfloat16, and so on: how the heartbeat and the logs name a dtype."""
    return str(dtype).removeprefix("torch.")
