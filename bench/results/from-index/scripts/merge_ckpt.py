# Merge a checkpoint's LoRA adapter into the base model as RUN/merged (used when the run is stopped early).
import sys
from pathlib import Path

from peft import PeftModel

from ragrpo.models import load_model

run, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
base, tok = load_model(None)
model = PeftModel.from_pretrained(base, ckpt).merge_and_unload()
model.save_pretrained(run / "merged"); tok.save_pretrained(run / "merged")
print("merged", ckpt, "->", run / "merged")
