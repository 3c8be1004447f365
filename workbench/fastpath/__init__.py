"""The training fast path: speed-ups that keep the maths, a CPU way and a GPU way side by side.

One switch, the config's `fast_path`, turns it on; `models.with_fast_path` picks the way by
the device the model is on. Each way is checked against the plain path (transformers' and
peft's) by its own tests, the GPU's on the CPU where it can be (tests/test_fastpath_cuda.py)
and on a GPU (`pytest -m gpu`).

    cpu.py            the CPU's, tuned on a 2-core CPU: attention per packed conversation,
                      the lean LoRA forward (on a GPU too), a fused cross-entropy
    cuda.py           the GPU's: flat micro-batches through PyTorch's varlen flash kernel,
                      Liger Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy
                      (optional), compiled decoder layers, the compute dtype under autocast
    varlen_kernel.py  that varlen kernel whatever the torch version spells it
    token_budget.py   the tokens a GPU micro-batch carries, sized from free memory
    lora_dropout.py   a LoRA dropout that keeps x, not a dropped copy: the dropped positions
                      on a CPU, a seed (the mask drawn again in the backward) on a GPU
"""
