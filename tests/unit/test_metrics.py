"""FLOPs per token, MFU and peak detection against hand computations."""

from __future__ import annotations

import pytest
import torch

from models.llama import FLAVORS
from trainer.metrics import MemoryMonitor, detect_peak_tflops, mfu_pct


def test_flops_per_token_debug_by_hand():
    # debug: D=256, 4 layers, 8 heads of 32, 4 kv heads, SwiGLU hidden = 64 * ceil(int(2*4*256/3)=682 / 64) = 704
    # per block: wq 256*256 + wk 256*128 + wv 256*128 + wo 256*256 = 196,608; MLP 3*256*704 = 540,672;
    # two norms 512 -> 737,792; x4 = 2,951,168; + final norm 256 + output 4096*256 = 1,048,576
    non_embedding = 2_951_168 + 256 + 1_048_576
    assert non_embedding == 4_000_000 == FLAVORS["debug"].num_params(exclude_embedding=True)
    attention = 12 * 4 * 8 * 32 * 128  # 12 x layers x heads x head_dim x seq = 1,572,864
    assert FLAVORS["debug"].flops_per_token(128) == 6 * 4_000_000 + attention == 25_572_864


def test_flops_per_token_8b_by_hand():
    # 8,030,261,248 params - the 128,256 x 4,096 embedding = 7,504,924,672
    n = 8_030_261_248 - 128_256 * 4_096
    assert n == 7_504_924_672
    assert FLAVORS["8b"].flops_per_token(8192) == 6 * n + 12 * 32 * 32 * 128 * 8192 == 57_914_449_920


def test_tied_output_projection_is_still_counted():
    tied = FLAVORS["1b"]  # Llama-3.2-1B ties its embeddings
    untied_non_embedding = tied.num_params(exclude_embedding=True) + tied.vocab_size * tied.dim
    assert tied.flops_per_token(1) == 6 * untied_non_embedding + 12 * 16 * 32 * 64


def test_mfu():
    # 1,000 tokens/s of the 8B shape at seq 8192 on a 989 TFLOP/s card: 57.914e12 / 989e12 = 5.856 %
    assert mfu_pct(57_914_449_920, 1000.0, 989.0) == pytest.approx(5.8558594, rel=1e-6)
    assert mfu_pct(10, 1.0, None) is None


def test_peak_is_unknown_on_cpu_and_memory_is_rss():
    assert detect_peak_tflops(torch.device("cpu"), "bf16") is None
    stats = MemoryMonitor(torch.device("cpu")).stats()
    assert 0.01 < stats["mem/peak_rss_gib"] < 24 and 0 < stats["mem/peak_pct"] < 100
