"""BEiT: masked image modelling with a frozen visual tokenizer."""
__version__ = "0.1.0"
