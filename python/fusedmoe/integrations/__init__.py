# python/fusedmoe/integrations/__init__.py — adapters that put fusedmoe layers into models of
# other libraries. Each submodule imports its library lazily, so importing this package needs
# nothing beyond fusedmoe:
#   fusedmoe.integrations.hf   Hugging Face transformers: Mixtral and Qwen3-MoE sparse MoE blocks
#                              → fusedmoe.MoE (patch / unpatch).
# Test: tests/python/test_integrations_hf.py.
__all__ = ["hf"]
