"""The kernel matrix: the scenario suite inside qemu guests booted on other Linux kernels."""
