"""Offline data preparation: raw books → clean text → BPE tokenizer → WebDataset shards."""
