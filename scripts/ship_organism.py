"""Ship a built organism as a LoRA adapter (maintainers): src/gradsift/organisms/adapters/<key>/.

The organism is built by its recipe (gradsift.organisms.ORGANISMS) and cached as a
merged model. Its difference from the embedded base is exactly the merged LoRA update
(rank r in every targeted linear layer, nothing else changed), so the adapter is
recovered from the two weight files by a truncated SVD per layer, checked, and written
in PEFT's format with the build's alignment check beside it. A fresh machine then merges
the adapter (seconds) instead of training (about half an hour on two CPU cores).

    python scripts/ship_organism.py embedded-aligned-precise [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from gradsift.models import load_model
    from gradsift.organisms.build import SHIPPED_ORGANISMS, aligned_model_path
    from gradsift.organisms.recipes import ORGANISMS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ORGANISMS))
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args()
    recipe = ORGANISMS[args.name]
    built = aligned_model_path(recipe, shipped=False)  # the cached build (built now if missing)
    merged = load_file(str(built / "model.safetensors"))
    base = load_model(recipe.base, dtype="float32")
    base_weights = {k: v.detach().clone() for k, v in base.state_dict().items()}  # before LoRA wraps the layers
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    scaling, r = recipe.lora_alpha / recipe.lora_r, recipe.lora_r
    worst = 0.0
    with torch.no_grad():
        lora_layers = {name: m for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        for name, module in lora_layers.items():
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = merged[key].float() - module.base_layer.weight.float()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            b = (u[:, :r] * s[:r]) / scaling
            module.lora_A["default"].weight.copy_(vh[:r].float())
            module.lora_B["default"].weight.copy_(b.float())
            rebuilt = scaling * (b.double() @ vh[:r].double())
            worst = max(worst, float((rebuilt - delta.double()).abs().max() / delta.abs().max()))
        changed = {k for k in merged if not torch.equal(merged[k], base_weights[k])}
        targeted = {n.removeprefix("base_model.model.") + ".weight" for n in lora_layers}
        if changed - targeted:
            raise SystemExit(f"weights outside the LoRA layers differ: {sorted(changed - targeted)[:3]}")
    print(f"{len(lora_layers)} LoRA layers; worst relative error of the rank-{recipe.lora_r} update: {worst:.2e}")
    out = SHIPPED_ORGANISMS / recipe.key()
    if out.exists():
        shutil.rmtree(out)
    if args.dtype == "float16":
        for module in lora_layers.values():
            module.lora_A["default"].half()
            module.lora_B["default"].half()
    peft_model.save_pretrained(str(out))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not this machine's cache
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # a set in PEFT: stable output
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    check = json.loads((built / "alignment.json").read_text())
    check["shipped"] = {"name": args.name, "key": recipe.key(), "dtype": args.dtype, "svd_relative_error": worst}
    (out / "alignment.json").write_text(json.dumps(check, indent=2))
    (out / "README.md").unlink(missing_ok=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
