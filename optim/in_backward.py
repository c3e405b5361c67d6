"""`optim.in_backward=true`: each parameter is updated inside the backward, the moment its gradient is complete.

One optimizer per parameter, each stepped by a post-accumulate-grad hook that then drops the gradient, so the
step never holds every gradient at once: on one process a parameter's gradient lives from its accumulation to
its update; under FSDP2 (whose reduce-scatter calls the hooks on the sharded parameters, torch >= 2.5) a block's
gradient shards live until the block's reduce-scatter output has been consumed.

What the early update rules out, and `parallel/plan.py::layout_problems` refuses: clipping by the global norm (it
needs every gradient before the first update), gradient accumulation (the first micro-batch would update),
fp16's loss scaler (it unscales and checks all gradients before the step), `numerics.on_nonfinite=skip` (the
update has happened when the verdict comes), DDP (its bucketed all-reduce completes after the hooks fire) and
DeepSpeed (it owns the step). The global gradient norm is still measured, from the squares each hook adds up,
so `train/grad_norm` is logged and `numerics.on_nonfinite=raise` stops the run at the first non-finite step.

The wrapper is what the trainer, the LR schedule and the memory tracker see: its `param_groups` are the
per-parameter optimizers' own group dicts (LambdaLR writes their lr), step hooks go to every inner optimizer,
`state` reads theirs (both read live: loading a checkpoint replaces the inner groups). Checkpoints save and load
the inner optimizers through torch's distributed state-dict API, keyed by parameter name like the ordinary
optimizer's (trainer/checkpoint.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class InBackward(torch.optim.Optimizer):
    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        optimizers = [make([{**g, "params": [p]}]) for g in groups for p in g["params"]]
        for i, o in enumerate(optimizers):  # a seeded noise stream per parameter, as without in_backward (adamw_bf16)
            if hasattr(o, "index_base"):
                o.index_base = i
        params = [o.param_groups[0]["params"][0] for o in optimizers]
        super().__init__(params, dict(optimizers[0].defaults))  # (the hook registries, the step's profiling)
        self.optimizers = optimizers
        first = params[0].to_local() if isinstance(params[0], DTensor) else params[0]
        self._squares = torch.zeros((), dtype=torch.float32, device=first.device)
        self._hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(self._update, o))
            for p, o in zip(params, self.optimizers)
        ]

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizers' groups, read live: loading a checkpoint replaces their dicts, and the schedule
        must write its lr into the ones they step with."""
        if "optimizers" not in self.__dict__:  # inside Optimizer.__init__
            return self.__dict__.setdefault("_own_groups", [])
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.__dict__["_own_groups"] = value

    @property
    def state(self):  # the inner optimizers' states (the tracker and model_state_bytes read them)
        # a new dict each time (a ChainMap would not do: the inner states are defaultdicts, and a lookup in the
        # first one would create an empty entry for every other optimizer's parameter)
        return {p: st for o in self.__dict__.get("optimizers", ()) for p, st in o.state.items()}

    @state.setter
    def state(self, value) -> None:  # Optimizer.__init__ assigns an empty one: nothing of ours to keep
        pass

    def _update(self, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
        grad = param.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        self._squares += torch.linalg.vector_norm(local, dtype=torch.float32).square()
        optimizer.step()
        param.grad = None

    def step(self, closure=None):
        """Nothing left to do: every parameter was updated during the backward."""
        return None

    def grad_norm(self, group=None, replicas: int = 1) -> torch.Tensor:
        """The global norm of the gradients the hooks applied since the last call (one all-reduce of a scalar
        over `group`, whose `replicas` copies of each shard are counted once), on the device, no host sync."""
        squares, self._squares = self._squares, torch.zeros_like(self._squares)
        if group is not None:
            dist.all_reduce(squares, group=group)
        return (squares / replicas).sqrt()

    def register_step_pre_hook(self, hook):
        return _Handles([o.register_step_pre_hook(hook) for o in self.optimizers])

    def register_step_post_hook(self, hook):
        return _Handles([o.register_step_post_hook(hook) for o in self.optimizers])

    def state_dict(self):
        raise RuntimeError(
            "optim.in_backward: save the inner optimizers (`.optimizers`) with "
            "torch.distributed.checkpoint.state_dict.get_state_dict, as trainer/checkpoint.py does"
        )

    def load_state_dict(self, state_dict) -> None:
        raise RuntimeError(
            "optim.in_backward: load the inner optimizers (`.optimizers`) with "
            "torch.distributed.checkpoint.state_dict.set_state_dict, as trainer/checkpoint.py does"
        )
