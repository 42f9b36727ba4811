"""The paper's ImageNet recipe: ResNet-50 as trained by He et al. (2016)."""
