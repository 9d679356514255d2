"""Adapters over the chat model's weights (LoRA, issue 29): reading and checking their folders."""
