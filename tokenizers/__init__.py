"""Frozen visual tokenizers: images -> LongTensor[B, h, w] (imported as beit.tokenizers)."""
