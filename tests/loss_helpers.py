"""Shared by the fast-path tests (CPU, emulated CUDA, GPU): one backward, the loss and every trainable gradient;
the bytes autograd keeps for a backward; the peak bytes of a step."""
from workbench.loss import token_loss_sum


def loss_and_grads(model, batch):
    """(summed token loss as a float, {name: float32 copy of the gradient}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.float().item(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}


def saved_bytes(fn) -> int:
    """The bytes autograd keeps for the backward of fn() (each storage once)."""
    import torch

    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def layer_bytes_per_token(model, device: str, autocast: bool) -> float:
    """The bytes the decoder's layers keep for the backward per token of a row (rows of 256 and 128 tokens: what does
    not grow with the row, the weights and autocast's copies of them, cancels), under bfloat16 autocast or not."""
    import torch

    def forward(tokens: int):
        ids = torch.arange(tokens, device=device).remainder(model.config.vocab_size)[None]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            model.model(input_ids=ids)
    return (saved_bytes(lambda: forward(256)) - saved_bytes(lambda: forward(128))) / 128


def peak_bytes(fn) -> int:
    """The peak of the bytes held by tensors fn() creates (each storage once, counted until it is freed): what a step
    adds to the memory the weights already hold, on any device."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def free(self, key: int, n: int) -> None:
            self.seen.discard(key)
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                    storage = t.untyped_storage()
                    if storage.data_ptr():
                        self.seen.add(storage.data_ptr())
                        self.live += storage.nbytes()
                        weakref.finalize(storage, self.free, storage.data_ptr(), storage.nbytes())
            self.peak = max(self.peak, self.live)
            return out

    with Peak() as tracker:
        fn()
    return tracker.peak


def host_waits(fn) -> list[str]:
    """The operators fn() dispatches that would make the host wait for a GPU (nonzero, masked_select, .item(), a
    boolean index) or copy data from the host to it (a tensor made from Python data), by name: checked on any device."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    waiting = {"nonzero", "nonzero_static", "masked_select", "_local_scalar_dense", "lift_fresh", "item"}

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            boolean = name.startswith("index") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_flatten(args[1:])[0])
            if name in waiting or boolean:
                self.seen.append(name + (" (boolean index)" if boolean else ""))
            return func(*args, **(kwargs or {}))

    with Watch() as watch:
        fn()
    return watch.seen
