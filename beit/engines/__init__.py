"""One epoch of training / one evaluation pass for each stage (pretraining, classification, segmentation)."""
