"""The PyTorch references of every kernel, in one place (tests and benchmarks import them here)."""

from kernels.newton_schulz import newton_schulz_reference
from kernels.relu2_mlp import matmul_fp8_reference, relu2_mlp_reference
from kernels.rope_qknorm import rope_qknorm_reference
from kernels.softcap_ce import (
    linear_softcap_cross_entropy_reference,
    softcap_cross_entropy_reference,
)

__all__ = ["rope_qknorm_reference", "relu2_mlp_reference", "newton_schulz_reference"]
__all__ += ["matmul_fp8_reference"]
__all__ += ["softcap_cross_entropy_reference", "linear_softcap_cross_entropy_reference"]
