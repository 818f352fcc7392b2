"""Training: the ResNet50v2 model, data pipeline, objectives, trainer and pseudo-labels."""
