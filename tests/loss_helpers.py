"""Shared by the fast-path tests (CPU, emulated CUDA, GPU): one backward, the loss and every trainable gradient;
the bytes autograd keeps for a backward."""
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
