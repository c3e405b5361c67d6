"""launch/train.py with DeepSpeed's fp16 gate for CPUs lifted, and nothing else changed.

DeepSpeed's CPU accelerator accepts fp16 only when oneDNN has fp16 kernels (`torch.ops.mkldnn.
_is_mkldnn_fp16_supported()`: CPUs with AVX512-FP16); elsewhere `deepspeed.initialize` refuses fp16
("Type fp16 is not supported on your device"), and shardwise's validation says so before starting. torch itself
computes fp16 on any CPU (slowly), so with the gate answered True the real engine, its ZeRO optimizer and its
dynamic loss scaler run here: this is how the fp16 overflow path is tested on CPU machines.
"""

import runpy
import sys
from pathlib import Path

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True

sys.argv = [str(Path(__file__).resolve().parents[2] / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
