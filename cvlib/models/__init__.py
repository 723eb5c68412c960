"""Models: the factory (torchvision backbones with visionflow's head), the zoo of ImageNet models,
SimpleCNN, and the device and precision choices."""
