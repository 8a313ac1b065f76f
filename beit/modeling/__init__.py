"""Models: the masked-image-modelling BEiT (mim), the fine-tune classifiers and the segmenter."""
