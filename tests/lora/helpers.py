"""Shared helpers for the LoRA tests."""

import torch

from lorakit.lora.inject import lora_layers


@torch.no_grad()
def randomize_adapter(model, name="default", seed=0, scale=0.1):
    """Give adapter ``name`` non-zero B (and perturbed DoRA magnitudes / saved modules),
    so that it actually changes the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        w = layer.lora_B[name].weight
        w.copy_(torch.randn(w.shape, generator=g) * scale)
        if name in layer.lora_magnitude_vector:
            m = layer.lora_magnitude_vector[name]
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))
    for module in model.modules():
        if type(module).__name__ == "ModulesToSaveWrapper" and name in module.modules_to_save:
            for p in module.modules_to_save[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
