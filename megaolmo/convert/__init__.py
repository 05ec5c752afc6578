"""Conversion between megaolmo checkpoints and other formats; the CLI is `python -m megaolmo.convert`.

hf.py            Hugging Face `Olmo`/`Olmo2`/`Olmo3ForCausalLM` directories <-> megaolmo state dicts
allenai_olmo.py  allenai/OLMo's unsharded checkpoints (config.yaml + model.pt | model.safetensors)
__main__.py      from-hf, to-hf, from-olmo, consolidate
"""
