"""MNIST-1D: a CPU-sized stand-in for CIFAR that regenerates offline."""
