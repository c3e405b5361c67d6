"""AdamW whose two moments are stored in bfloat16 (4 bytes of state per parameter instead of 8).

The update is computed in fp32 exactly as `torch.optim.AdamW` computes it; only the stored moments are
rounded to bf16. Rounding to nearest would stall the second moment: with beta2 = 0.999 an EMA step changes
`v` by 0.1 % of itself, less than half a bf16 ulp (2^-8 = 0.39 %), so `v` would never move once it is
near its target. The moments are therefore written back with *stochastic rounding* (round up with
probability equal to the discarded fraction), whose expectation is the fp32 value.

The rounding noise comes from a generator seeded by (seed, step, parameter index), so a run and its resume
draw the same noise and resume stays bitwise; there is no generator state to checkpoint.

Elementwise only: each rank updates its local shard of a DTensor parameter, so it composes with every
native strategy (DDP, FSDP2, HSDP, TP, PP); the moments are DTensors placed like their parameter, so DCP
saves and reshards them.
"""

from __future__ import annotations

import torch

from models.dtensor import local
from optim.common import evaluate_closure


def round_to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability (discarded low 16 bits) / 2^16; E[result] == x."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # adding noise below the kept 16 bits carries into them with exactly the discarded fraction's probability;
    # the sign bit is separate, so this rounds magnitudes, symmetric for negative values. Inf/NaN: unchanged
    finite = torch.isfinite(x)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000 as int32
    return torch.where(finite, rounded, x.float()).to(torch.bfloat16)


class AdamWBF16(torch.optim.Optimizer):
    """`torch.optim.AdamW` (decoupled weight decay, bias correction) with bf16 moments, stochastically rounded."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas={betas}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        # the first parameter's index in the noise seed; optim.in_backward's one-parameter optimizers set their
        # parameter's position among all, so each draws the noise the whole-model optimizer would
        self.index_base = 0
        # Optimizer.load_state_dict casts floating state to the parameter's dtype (fp32); keep bf16
        self.register_load_state_dict_post_hook(AdamWBF16._moments_to_bf16)

    @staticmethod
    def _moments_to_bf16(optimizer: AdamWBF16) -> None:
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != torch.bfloat16:
                    state[key] = state[key].to(torch.bfloat16)  # exact: the values were bf16 when saved

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + step * 65_537 + index) % (2**63 - 1))
        return g

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        index = self.index_base
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = int(state["step"])  # a CPU scalar: no device sync
                w, g = local(p), local(p.grad).float()
                m_store, v_store = local(state["exp_avg"]), local(state["exp_avg_sq"])
                m = m_store.float().lerp_(g, 1 - b1)
                v = v_store.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                gen = self._generator(w.device, t, index)
                m_store.copy_(round_to_bf16_stochastic(m, gen))
                v_store.copy_(round_to_bf16_stochastic(v, gen))
                # the step uses the fp32 values just computed (as torch's AdamW would), not the rounded copies
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                w32 = w.float()
                if wd:
                    w32.mul_(1 - lr * wd)
                w32.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)
                # bf16 parameters (training.master_weights=false): rounded stochastically too, or an update under
                # half an ulp of the weight would be lost
                w.copy_(round_to_bf16_stochastic(w32, gen) if w.dtype == torch.bfloat16 else w32)
        return loss
