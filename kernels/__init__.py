"""nanocode's Triton kernels, one fused operation per file, each beside its PyTorch reference.

Dispatch (kernels/common.py): CUDA tensors run Triton, CPU tensors the reference, TRITON_INTERPRET=1
runs Triton on the CPU, NANOCODE_KERNELS=torch forces the references.
"""

from kernels.newton_schulz import CLASSIC_QUINTIC, POLAR_EXPRESS, newton_schulz
from kernels.relu2_mlp import relu2_mlp
from kernels.rope_qknorm import rope_qknorm
from kernels.softcap_ce import linear_softcap_cross_entropy, softcap_cross_entropy

__all__ = ["rope_qknorm", "relu2_mlp", "softcap_cross_entropy", "linear_softcap_cross_entropy"]
__all__ += ["newton_schulz", "POLAR_EXPRESS", "CLASSIC_QUINTIC"]
