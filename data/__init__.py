"""Shard writing, streaming, augmentation and sample sets (imported as beit.data)."""
