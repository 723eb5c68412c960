"""The notebook's toolkit: convolution from scratch and the classic kernels."""
