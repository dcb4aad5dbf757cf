"""Trainable parameters of LoRA on SmolLM2-135M beside the ID tokens' rows: PEFT's trainable_token_indices (genrec's
default) against modules_to_save (the whole embedding and head). Needs the smollm2 extra; no data.

    python -m bench.lora_trainable
"""

from __future__ import annotations

import logging

from genrec.config import RunConfig, apply_overrides
from genrec.modeling import load_pretrained
from genrec.training import lora_config

logger = logging.getLogger(__name__)


def main() -> None:
    from peft import get_peft_model

    logging.basicConfig(level=logging.INFO)
    cfg = apply_overrides(RunConfig(), ["model.base=smollm2-135m", "model.dtype=float32"])
    tokens = [f"<{lv}_{c}>" for lv in "abc" for c in range(32)] + [
        f"<d_{c}>" for c in range(14)
    ]  # the demo's 110
    for mechanism in ("trainable_token_indices", "modules_to_save"):
        model, tok, _ = load_pretrained(cfg.model, tokens)
        peft_cfg = lora_config(cfg, model=model, tokenizer=tok, id_tokens=tokens)
        if mechanism == "modules_to_save":
            peft_cfg.trainable_token_indices = None
            peft_cfg.modules_to_save = ["embed_tokens", "lm_head"]
        peft = get_peft_model(model, peft_cfg)
        trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        print(f"{mechanism}: {trainable:,} trainable parameters")


if __name__ == "__main__":
    main()
