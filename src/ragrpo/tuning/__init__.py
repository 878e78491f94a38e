"""Tuning: GRPO with a LoRA adapter through TRL (`train`), and the label-free curriculum built from
a LanceDB table (`curriculum`, `ragrpo train --from-index`)."""
