"""The models an evaluation compares: the base (``"base"``: the same model with every adapter
switched off, no second copy) and each adapter, switched on in turn on one loaded model.

``compare.py``, ``forgetting.py`` and ``lmeval.py`` all run "each model" through
:class:`use_model`; :func:`resolve_adapters` loads the adapters to compare.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from lorakit.errors import AdapterError

BASE = "base"


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~"))


def resolve_adapters(model, tokenizer, adapters: Sequence | None) -> dict[str, str | None]:
    """Load the adapters to compare; returns ``{name: folder or None}`` in order.

    Each entry is the name of an adapter already on ``model``, a folder (named after it),
    ``"NAME=DIR"``, or a ``(name, folder)`` pair. With ``adapters=None``: every adapter
    already on the model. A bare name (no path separator, not starting with ``.`` or ``~``)
    that is an adapter on the model means that adapter, even when the working directory holds
    a folder of that name; write ``./NAME`` for the folder.

    Raises:
        AdapterError: a folder that is not an adapter, a duplicate name, or an adapter made
            for another base model (its manifest's base-config hash differs from this model's).
    """
    from lorakit.lora.inject import adapter_configs
    from lorakit.lora.io import base_config_hash, load_adapter, read_adapter_folder

    loaded = adapter_configs(model)
    if adapters is None:
        adapters = list(loaded)
    out: dict[str, str | None] = {}
    for entry in adapters:
        if isinstance(entry, (tuple, list)):
            name, folder = str(entry[0]), Path(entry[1])
        elif isinstance(entry, str) and entry in loaded and not _looks_like_path(entry):
            out[entry] = None
            continue
        else:
            text = str(entry)
            name, sep, rest = text.partition("=")
            if sep and name and not Path(text).exists():
                folder = Path(rest)
            else:
                folder = Path(text)
                name = folder.resolve().name
                if name == "adapter" and folder.resolve().parent.name:  # runs/NAME/adapter
                    name = folder.resolve().parent.name
        if name == BASE or name in out:
            raise AdapterError(f"adapter name {name!r} is {'reserved' if name == BASE else 'used twice'}; "
                               f"name it explicitly with --adapter NAME=DIR")
        read_adapter_folder(folder).check_base(
            base_config_hash(model),
            against=f"the model being evaluated ({getattr(model, 'lorakit_spec', None)!r})",
            fix="pass the right --model or drop --model to use the adapter's own base")
        if name not in loaded:
            load_adapter(model, folder, name=name, tokenizer=tokenizer)
        out[name] = str(folder)
    if not out:
        raise AdapterError("nothing to compare: give at least one adapter")
    return out


class use_model:
    """Context: run ``model`` as the base (name ``"base"``) or with one adapter active."""

    def __init__(self, model, name: str):
        self.model, self.name, self._ctx = model, name, None

    def __enter__(self):
        from lorakit.lora.inject import active_adapter, disable_adapters, set_adapter

        self._previous = active_adapter(self.model)
        if self.name == BASE:
            self._ctx = disable_adapters(self.model)
            self._ctx.__enter__()
        else:
            set_adapter(self.model, self.name)
        return self.model

    def __exit__(self, *exc):
        from lorakit.lora.inject import set_adapter

        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        elif self._previous and self._previous != self.name:
            set_adapter(self.model, self._previous)
        return False
