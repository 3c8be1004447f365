"""Shared by the fast-path tests (CPU, emulated CUDA, GPU): one backward, the loss and every trainable gradient."""
from workbench.loss import token_loss_sum


def loss_and_grads(model, batch):
    """(summed token loss as a float, {name: float32 copy of the gradient}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.float().item(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}
