"""Bundled reference models for fxmem: small, readable models, one file each, whose ``forward`` returns the loss.

Each module (``gpt``, ``resnet``, ``vit``, ``mlp``) has a frozen config dataclass with named
``PRESETS``, a ``build(preset, *, batch_size, device, dtype, seed) -> (model, example_inputs)``
factory, and one zero-argument factory per preset (``models/gpt.py:tiny``, ``models/resnet.py:resnet50``).
They share the checks of config fields and the seeded start of ``build`` (``models/_common.py``).
"""

__all__ = ["gpt", "mlp", "resnet", "vit"]
