"""The low-rank tensors of a compressed delta as a PEFT LoRA adapter directory, which ``peft`` loads onto the base.

A LoRA layer adds ``scaling · B A`` to a weight, ``scaling = lora_alpha / r``; here ``lora_alpha = r`` per module
(``rank_pattern`` and ``alpha_pattern`` give each module its own rank), so ``scaling = 1`` and

* ``nn.Linear`` (weight ``(out, in)``): ``B = U_r Σ_r`` ``(out, r)``, ``A = V_rᵀ`` ``(r, in)``;
* ``nn.Embedding`` (weight ``(num, dim)``, where peft adds ``(B A)ᵀ``): ``A = (U_r Σ_r)ᵀ`` ``(r, num)``,
  ``B = V_r`` ``(dim, r)``.

Written without importing ``peft`` (it is not a dependency of the library): ``adapter_config.json`` and
``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them. Low-rank tensors of other modules (a
GPT-2 ``Conv1D``, a bias) are left out of the adapter and listed in the header; the compressed delta itself holds
them all.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_delta.sources import resolve_model_class

__all__ = ["write_adapter"]


def _module_types(post: Any, names: list[str]) -> dict[str, str] | str:
    """``"linear"``, ``"embedding"`` or ``"other"`` for the module of each tensor name, from the model itself or,
    for a model directory, from its config (the model is built on the meta device: no weight is allocated); else why
    the architecture is unknown (a state dict, a bare safetensors file, a config that names no model class)."""
    if isinstance(post, nn.Module):
        model = post
    elif isinstance(post, (str, os.PathLike)) and (Path(post) / "config.json").is_file():
        import transformers

        config = transformers.AutoConfig.from_pretrained(post)
        model_class = resolve_model_class(None, Path(post))
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            return "the post-trained model's config.json names no transformers model class in `architectures`"
        with torch.device("meta"):
            model = model_class._from_config(config)
    else:
        return "the post-trained model was given without its architecture (no config.json)"
    kinds = {}
    for name in names:
        module_name, _, parameter = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if parameter == "weight" and isinstance(module, nn.Linear):
            kinds[name] = "linear"
        elif parameter == "weight" and isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        else:
            kinds[name] = "other"
    return kinds


def write_adapter(directory: Path, post: Any, factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """Write the PEFT LoRA adapter of the low-rank ``factors`` (name -> ``(U_r Σ_r, V_rᵀ)``) into ``directory``;
    returns what the header records: the directory, the modules, and the tensors left out (with why)."""
    from safetensors.torch import save_file

    kinds = _module_types(post, list(factors))
    if isinstance(kinds, str):
        return {"directory": None, "left_out": sorted(factors), "why": kinds}
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for name, (left, right) in factors.items():
        module = name.rpartition(".")[0]
        key = f"base_model.model.{module}"
        if kinds[name] == "linear":
            tensors[f"{key}.lora_A.weight"] = right.contiguous()
            tensors[f"{key}.lora_B.weight"] = left.contiguous()
        elif kinds[name] == "embedding":
            tensors[f"{key}.lora_embedding_A"] = left.T.contiguous()
            tensors[f"{key}.lora_embedding_B"] = right.T.contiguous()
        else:
            continue
        ranks[module] = int(left.shape[1])
    left_out = sorted(name for name, kind in kinds.items() if kind == "other")
    if not ranks:
        return {
            "directory": None,
            "left_out": left_out,
            "why": "no low-rank tensor is the weight of an nn.Linear or nn.Embedding",
        }
    directory.mkdir()
    top = max(ranks.values())
    pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != top}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(post) if isinstance(post, (str, os.PathLike)) else None,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": "^(" + "|".join(re.escape(module) for module in ranks) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"directory": directory.name, "modules": sorted(ranks), "left_out": left_out}
