"""The energy model of online keystep detection: one table of constants, and the counters that
turn a model's forward pass into multiply-accumulates and bytes moved.

Energy of one step = MACs x ENERGY_PER_MAC_J + bytes moved x ENERGY_PER_BYTE_J
                     + the power of each sensor on during the step x STEP_S.
Average power of a run = its energy / its duration (steps x STEP_S).

| constant            | value    | source |
|---------------------|----------|--------|
| ENERGY_PER_MAC_J    | 4.6 pJ   | Ego-Exo4D docs, energy-efficient keystep benchmark |
| ENERGY_PER_BYTE_J   | 80 pJ    | Ego-Exo4D docs, same page |
| SENSOR_POWER_W rgb  | 15 mW    | Ego-Exo4D docs, same page |
| SENSOR_POWER_W audio| 0.5 mW   | Ego-Exo4D docs, same page |
| STEP_S              | 0.2 s    | Ego-Exo4D docs: labels at 5 fps |
| BUDGETS_W           | 20 mW, 2.8 W | Ego-Exo4D docs: high-efficiency and high-performance tiers |

Assumptions (ours, not from the docs):
- MACs are what PyTorch's FLOP counter (``torch.utils.flop_counter``) counts for one example,
  halved: matrix products and convolutions; elementwise operations are not counted.
- Bytes moved are the activations each operation reads and writes, float32 as run; weights
  and constant buffers are taken as resident on the chip and not counted, and so are views
  (reshapes, transposes), which move nothing.
- A sensor that is on draws its power for the whole step; one that is off draws nothing.
"""
from __future__ import annotations

ENERGY_PER_MAC_J = 4.6e-12
ENERGY_PER_BYTE_J = 80e-12
SENSOR_POWER_W = {"rgb": 15e-3, "audio": 0.5e-3}
STEP_S = 0.2
BUDGETS_W = {"20mW": 20e-3, "2.8W": 2.8}


def sensor_key(sensors) -> str:
    """The canonical name of a set of sensors: sorted names joined by '+' ('' for none)."""
    return "+".join(sorted(sensors))


def step_energy_j(sensors: str, compute: dict) -> float:
    """Joules of one step that ran ``compute`` ({"macs", "bytes"}) with ``sensors`` on."""
    unknown = [s for s in sensors.split("+") if s and s not in SENSOR_POWER_W]
    if unknown:
        raise ValueError(f"unknown sensor {unknown[0]!r}: the energy table knows {', '.join(SENSOR_POWER_W)}")
    sensor_w = sum(SENSOR_POWER_W[s] for s in sensors.split("+") if s)
    return compute["macs"] * ENERGY_PER_MAC_J + compute["bytes"] * ENERGY_PER_BYTE_J + sensor_w * STEP_S


def count(modules, inputs) -> dict:
    """{"macs", "bytes"} of running ``modules`` one after another, each on its input tensor of
    ``inputs`` (batch of one), in eval mode and without gradients."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    resident = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}

    class ActivationBytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            read = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            written = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            storages = {t.untyped_storage().data_ptr() for t in read}
            if any(t.untyped_storage().data_ptr() in storages for t in written):
                return out                  # a view: nothing moves
            ActivationBytes.total += sum(t.nbytes for t in read if t.untyped_storage().data_ptr() not in resident)
            ActivationBytes.total += sum(t.nbytes for t in written)
            return out

    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops, ActivationBytes():
        for module, x in zip(modules, inputs):
            module.eval()
            module(x)
    return {"macs": int(flops.get_total_flops() // 2), "bytes": int(ActivationBytes.total)}
