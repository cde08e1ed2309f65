"""Backbones: `pull.py` builds or fetches a causal LM into the zoo (a Hugging Face folder: config.json,
model.safetensors, tokenizer files); `load.py` loads one for feature extraction or tuning; `hf.py`
keeps transformers quiet and offline where it should be."""
