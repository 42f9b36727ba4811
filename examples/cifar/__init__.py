"""The paper's CIFAR recipes: ResNet-20 (He et al. 2016) and Wide ResNet 16-4 (Zagoruyko & Komodakis 2016)."""
