"""One model interface for every architecture. `build_model(config)` gives an nn.Module with:

- `forward(ids, targets=None, cache=None, return_logits=True) -> (logits, loss)`;
- `new_cache(batch_size, max_len)`, whose rows each keep their own position (`grow`, `load_rows` and `keep_rows`
  let rows join and leave a running batch), and `decode_step(fast, compiled)`, a one-token step for the sampling
  engine that takes rows at different positions (`compiled`: the compiled step's dtype, compiled.py, or None);
- `unembedding_matrix()`, `max_positions`, `flops_per_token()` (training FLOPs, for MFU);
- `family`, `describe()` and `detail_rows()` for model cards; `transformers_model_type` (None: no transformers
  class, so exports are tinylm's own).
Everything that differs between architectures lives here: a new one is a module, a line in ARCHITECTURES (build.py)
and its parameter shapes in shapes.SHAPES.
The package's names load on first use, so importing it does not import torch: `tinylm recipes` and `tinylm params`
count parameters from shapes alone (shapes.py) and answer at once.
"""

from __future__ import annotations

import importlib

from tinylm.models.shapes import ParameterCount, count_from_shapes

COMPILED_DTYPES = ("float32", "int8")  # the compiled decode step's weights (compiled.py)

# name -> the module that defines it, imported when the name is first used
_LAZY = {"build_model": "build", "count_parameters": "build", "decay_split": "build", "ARCHITECTURES": "build",
         "resolve_device": "build", "parameter_roles": "build", "KVCache": "cache", "MixerState": "cache",
         "IGNORE_INDEX": "ops", "Llama": "llama", "MicroMixer": "mixer"}

__all__ = ["COMPILED_DTYPES", "build_model", "count_parameters", "count_from_shapes", "ParameterCount", "KVCache",
           "MixerState", "IGNORE_INDEX", "Llama", "MicroMixer", "decay_split", "parameter_roles", "ARCHITECTURES",
           "resolve_device"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
