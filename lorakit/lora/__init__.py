"""LoRA adapters: the layer, injection, PEFT's file format, initialisations, combining.

``lorakit.lora.merge_adapters`` is :func:`lorakit.lora.combine.merge_adapters` (imported on
first use, so importing this package stays light).
"""


def __getattr__(name: str):
    if name == "merge_adapters":
        from lorakit.lora.combine import merge_adapters

        return merge_adapters
    raise AttributeError(f"module 'lorakit.lora' has no attribute {name!r}")
