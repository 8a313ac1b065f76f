"""What every run shares: checkpoints (saving, resume, loading pretrained weights), logging, scaling."""
