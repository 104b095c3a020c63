"""Hugging Face interop: import BERT-family and ViT safetensors checkpoints as pretrax
workdirs (`hf.import_hf`), export workdirs for `transformers.from_pretrained`
(`hf.export_hf`), and encoder features of a workdir (`embed.embed`).
CLI: `python launch.py import-hf | export-hf | embed` (interop/main.py)."""
