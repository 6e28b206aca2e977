"""zsbir-peft: parameter-efficient fine-tuning for zsbir, as a plugin.

- backbones ``peft_lora`` (LoRA, Hu et al., ICLR 2022) and ``peft_adapter`` (bottleneck
  adapters, Houlsby et al., ICML 2019): any registered backbone, frozen, with low-rank
  updates or adapters in the layers a manifest names (:mod:`zsbir_peft.backbones`,
  :mod:`zsbir_peft.layers`);
- teacher ``peft_ema``: a momentum (EMA) copy of the student (DINO, Caron et al., ICCV
  2021, Sec. 3.1) (:mod:`zsbir_peft.teacher`);
- loss ``peft_ema_distill``: the student's embedding towards the EMA teacher's
  (:mod:`zsbir_peft.losses`).

zsbir finds them through this distribution's entry points (``pyproject.toml``); nothing in
zsbir names this package.
"""

from zsbir_peft.layers import (
    AdapterConv2d,
    AdapterLinear,
    LoRAConv2d,
    LoRALinear,
    inject,
    merge_lora,
)

__all__ = ["AdapterConv2d", "AdapterLinear", "LoRAConv2d", "LoRALinear", "inject",
           "merge_lora"]
